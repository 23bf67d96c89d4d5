"""The human_eval sandbox: a program that writes outside its directory, opens a socket, forks
without end or loops forever is stopped and scored as a failure, and the run goes on to the
next problem; a correct program passes and may use its own directory. gsm8k answers are read as
the harness promises. Each attack is checked by its effect (no file appears, the listening
socket sees no connection, no process is left), not only by the exit status."""

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from eval.generation import (
    GenItem,
    cut_at_stops,
    evaluate_generation,
    gsm8k_score,
    human_eval_items,
    score_human_eval,
)
from eval.sandbox import run_python
from tests.icl_fixtures import HUMAN_EVAL_PROBLEMS, icl_fixture_texts, write_icl_fixtures

# The layers this machine gives the sandbox (every one on Linux 6.x with user namespaces and
# Landlock); a test of a layer the kernel lacks would test nothing.
LAYERS = run_python("pass", timeout_s=10).layers


def needs(layer: str):
    return pytest.mark.skipif(layer not in LAYERS, reason=f"this kernel gives no {layer}")


def leftover_processes(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


def test_a_correct_program_passes_and_may_use_its_directory():
    r = run_python("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())")
    assert r.passed and r.stdout.strip() == "ok", r.stderr
    assert {"rlimits", "temp_cwd", "isolated_env"} <= set(r.layers)


@needs("landlock_fs")
def test_writing_outside_its_directory_fails(tmp_path):
    target = tmp_path / "escaped.txt"
    os.chmod(tmp_path, 0o777)  # writable by anyone: only the sandbox can stop the write
    for path in (target, Path("/tmp") / f"escaped-{os.getpid()}.txt"):
        r = run_python(f"open({str(path)!r}, 'w').write('x')")
        assert not r.passed and "PermissionError" in r.stderr
        assert not path.exists()


@needs("network_namespace")
def test_a_socket_reaches_nothing():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        r = run_python(
            "import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
            "s.sendall(b'leak')\n"
        )
        assert not r.passed and r.status == "error"
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()  # nobody connected
    r = run_python("import socket\nsocket.getaddrinfo('pypi.org', 443)")
    assert not r.passed and "gaierror" in r.stderr


def test_an_endless_loop_is_stopped_at_the_timeout():
    start = time.perf_counter()
    r = run_python("while True:\n    pass\n", timeout_s=1.5)
    assert r.status == "timeout" and not r.passed
    assert time.perf_counter() - start < 30  # killed, not waited for


@needs("pid_namespace")
def test_a_fork_bomb_is_stopped_and_leaves_no_process():
    marker = f"forkbomb-{os.getpid()}"
    r = run_python(
        f"# {marker}\nimport os\nwhile True:\n    try:\n        os.fork()\n"
        "    except OSError:\n        pass\n",
        timeout_s=2, max_processes=16,
    )
    assert not r.passed and r.status == "timeout"
    time.sleep(0.5)
    assert not leftover_processes("program.py"), leftover_processes("program.py")


@needs("pid_namespace")
def test_a_child_that_leaves_its_process_group_dies_with_the_program():
    r = run_python(
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n",
        timeout_s=5,
    )
    assert r.passed  # the parent exits 0 at once
    time.sleep(0.5)
    assert not leftover_processes("program.py")


def test_memory_beyond_the_limit_fails():
    r = run_python("x = bytearray(3 << 30)", memory_mb=512)
    assert not r.passed and "MemoryError" in r.stderr


def test_human_eval_run_goes_on_past_every_attack(tmp_path):
    """Six completions of the fixture's `add`: the correct one passes, the five attacks fail,
    each within its time limit, and every problem gets a score."""
    bench = write_icl_fixtures(tmp_path / "bench")
    add = human_eval_items(bench)[0]
    attacks = [
        f"    open({str(tmp_path / 'x')!r}, 'w').write('x')\n    return a + b\n",
        "    import socket\n    socket.create_connection(('127.0.0.1', 9), timeout=2)\n    return a + b\n",
        "    import os\n    while True:\n        os.fork()\n",
        "    while True:\n        pass\n",
        "    return a - b\n",
    ]
    completions = [HUMAN_EVAL_PROBLEMS[0][2], *attacks]
    scores = score_human_eval([add] * len(completions), completions, timeout_s=3)
    assert [s["pass@1"] for s in scores] == [1.0, 0, 0, 0, 0, 0]
    statuses = [s["status"] for s in scores]
    # the fork bomb dies of its own BlockingIOError at RLIMIT_NPROC, or at the timeout
    assert statuses[:3] == ["ok", "error", "error"] and statuses[3] in ("error", "timeout")
    assert statuses[4:] == ["timeout", "error"]
    assert all(s["seconds"] < 30 for s in scores)
    assert not (tmp_path / "x").exists()


class CannedModel:
    """A GenerativeModel that answers from a table (prompt suffix -> completion text)."""

    max_seq_len = 512

    def __init__(self, tokenizer, answers):
        self.tok, self.answers = tokenizer, answers

    def generate(self, prompts, max_new_tokens, stop=None, progress=None):
        out = []
        for p in prompts:
            text = self.tok.decode(p)
            out.append(self.tok.encode(next(a for k, a in self.answers if text.endswith(k))))
        return out


def test_evaluate_generation_scores_human_eval_and_gsm8k(tmp_path):
    from data.tokenizer import train_bpe

    bench = write_icl_fixtures(tmp_path / "bench")
    tok = train_bpe(icl_fixture_texts(bench), 300)
    items = human_eval_items(bench)
    answers = [(items[0].prompt[-20:], "    return a + b\n\ndef unused():\n    pass\n"),
               (items[1].prompt[-20:], "    while True:\n        pass\n"),
               (items[2].prompt[-20:], "    return s[::-1]\n")]
    r = evaluate_generation(CannedModel(tok, answers), tok, "human_eval", items, progress=False,
                            log_samples=True, sandbox_timeout_s=2)
    assert r["metrics"]["all"]["pass@1"] == pytest.approx(2 / 3)
    assert r["statuses"]["ok"] == 2 and r["samples"][0]["completion"] == "    return a + b\n"


@pytest.mark.parametrize("completion, answer, strict, flexible", [
    (" She has 3 + 4 = 7 apples. #### 7", "7", 1, 1),
    (" 1,200 + 34 = 1,234 #### $1,234.", "1234", 1, 1),
    (" The answer is 12", "12", 0, 1),
    (" #### 5\nQ: next", "6", 0, 0),
])
def test_gsm8k_answer_extraction(completion, answer, strict, flexible):
    s = gsm8k_score(cut_at_stops(completion, ("\n\n", "Q:")), answer)
    assert s == {"exact_match": strict, "exact_match_flexible": flexible}


def test_gsm8k_prompts_hold_three_examples(tmp_path):
    from eval.generation import gsm8k_items

    items = gsm8k_items(write_icl_fixtures(tmp_path), limit=2)
    assert items[0].prompt.count(" #### ") == 3 and items[0].prompt.endswith("step by step.")
    assert isinstance(items[0], GenItem) and items[0].target.isdigit()
