"""The shape of the code base, checked: model/ is a leaf, the training loop holds only its
cadence, and no source file outgrows a sitting (550 lines outside kernels/)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from tests.helpers import REPO

MODEL = REPO / "model"
# The model's tools that need a tokenizer (sampling, Hugging Face conversion) may read one, and
# the job config; the network, its config and checkpoint I/O may not.
TOOLS = {"generate", "hf", "load"}
TOKENIZER_MODULES = {"data.tokenizer", "data.hf_tokenizer", "data.manifest"}
NEVER_FROM_MODEL = ("parallel", "eval", "bench", "train", "training", "objectives", "inference")


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, delayed?, line) for every import of a file; delayed = not at the top
    level of the module (inside a function, a class or a conditional)."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module in ("model", "data"):  # from model import moe
                names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        out += [(name, id(node) not in top, node.lineno) for name in names]
    return out


def model_graph() -> dict[str, list[tuple[str, bool, int]]]:
    return {p.stem: imports(p) for p in sorted(MODEL.glob("*.py")) if p.stem != "__init__"}


def test_model_is_a_leaf():
    problems = []
    for name, found in model_graph().items():
        for module, delayed, line in found:
            where = f"model/{name}.py:{line}"
            root = module.split(".")[0]
            if root in NEVER_FROM_MODEL:
                problems.append(f"{where} imports {module}: model/ must not depend on {root}")
            if root == "model" and delayed:
                problems.append(f"{where}: delayed import of the sibling {module} (a hidden cycle?)")
            if root == "data" and (module not in TOKENIZER_MODULES or name not in TOOLS):
                problems.append(f"{where} imports {module}: from data/, only tokenizer modules, "
                                f"only in the tools {sorted(TOOLS)}")
            if root == "job_config" and name not in TOOLS:
                problems.append(f"{where} imports job_config: the network, its config and "
                                "checkpoint I/O do not know about jobs")
    assert not problems, "\n".join(problems)


def test_model_imports_have_no_cycle():
    graph = {
        name: {m.split(".")[1] for m, _, _ in found if m.startswith("model.")}
        for name, found in model_graph().items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt in graph and not state.get(nxt):
                visit(nxt, [*path, node])
        state[node] = 2

    for node in graph:
        if not state.get(node):
            visit(node, [])


def test_the_checker_sees_cycles_and_delayed_imports(tmp_path, monkeypatch):
    """The two checks above can fail: a planted cycle made of a delayed import trips both."""
    fake = tmp_path / "model"
    fake.mkdir()
    (fake / "a.py").write_text("from model.b import f\n")
    (fake / "b.py").write_text("def f():\n    from model.a import g\n")
    monkeypatch.setattr(sys.modules[__name__], "MODEL", fake)
    expected = {
        test_model_is_a_leaf: "model/b.py:2: delayed import of the sibling model.a",
        test_model_imports_have_no_cycle: "import cycle: a -> b -> a",
    }
    for check, message in expected.items():
        try:
            check()
        except AssertionError as e:
            assert message in str(e), str(e)
        else:
            raise AssertionError(f"{check.__name__} missed the planted problem")


# Names that, inside the loop, would mean it branches on what kind of run this is.
FEATURE_NAMES = {
    "model", "raw", "moe", "is_moe", "n_experts", "engine", "deepspeed", "is_deepspeed",
    "parallel", "tp", "ep", "pp", "dp", "dims", "mesh", "fsdp", "ddp", "data_parallel", "loader",
    "mixture", "hasattr", "isinstance", "type", "fused_loss", "fused_kernels", "device",
    "is_main", "rank", "world_size",
}


def loop_branch_names(source: str) -> list[tuple[int, set[str]]]:
    """(line, names) of every `if` / conditional expression inside train()'s while loop."""
    tree = ast.parse(source)
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    loops = [n for n in ast.walk(train) if isinstance(n, ast.While)]
    assert loops, "train() has no while loop"
    out = []
    for loop in loops:
        for node in ast.walk(loop):
            if isinstance(node, (ast.If, ast.IfExp)):
                names = {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}
                names |= {n.attr for n in ast.walk(node.test) if isinstance(n, ast.Attribute)}
                out.append((node.lineno, names))
    return out


def test_training_loop_holds_only_its_cadence():
    branches = loop_branch_names((REPO / "train.py").read_text())
    bad = [(line, sorted(names & FEATURE_NAMES)) for line, names in branches if names & FEATURE_NAMES]
    assert not bad, f"train.py's loop branches on the kind of run at (line, names): {bad}"
    # The checker itself: the old loop's flags are caught.
    planted = "def train():\n    while True:\n        if moe:\n            pass\n        if hasattr(loader, 'x'):\n            pass\n"
    assert [sorted(n & FEATURE_NAMES) for _, n in loop_branch_names(planted)] == [["moe"], ["hasattr", "loader"]]


def test_no_source_file_over_550_lines():
    skip = {".venv", "kernels", "runs", "data_cache", "build", ".git"}
    long = []
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in skip or "site-packages" in rel.parts:
            continue
        n = len(path.read_text().splitlines())
        if n > 550:
            long.append(f"{rel}: {n} lines")
    assert not long, "split along its seams: " + ", ".join(long)


def test_readme_layout_names_every_module():
    """The README's layout map lists every module of the packages, under its folder."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```")[1]
    listed: dict[str, set[str]] = {}
    folder = ""
    for line in block.splitlines():
        if line and not line.startswith(" "):
            folder = line.split()[0].rstrip("/") if line.split()[0].endswith("/") else ""
        listed.setdefault(folder, set()).update(re.findall(r"[\w]+\.py", line))
    missing = [
        f"{path.parent.name}/{path.name}"
        for pkg in ("common", "training", "model", "data", "parallel", "eval", "kernels", "bench",
                "inference")
        for path in sorted((REPO / pkg).glob("*.py"))
        if path.name != "__init__.py" and path.name not in listed.get(pkg, set())
    ]
    missing += [f"tests/{n}" for n in ("helpers.py",) if n not in listed.get("tests", set())]
    assert not missing, f"README.md's layout map does not name: {missing}"


def test_data_preparation_does_not_import_torch():
    """data.prepare's driver and its tasks (data/job.py) run without torch: importing it costs
    ~2 s and ~190 MB in every process of a preparation job (job_config once pulled it in
    through model.lora)."""
    import subprocess

    code = "import sys, data.prepare, data.job; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))[:3])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", f"data.prepare imports {out}"
