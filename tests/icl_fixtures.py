"""Benchmark files for the eval tests, made here in the layouts of ../shared/benchmarks
(llm-foundry's in-context-learning files, our HellaSwag file): tests never depend on ../shared."""

from __future__ import annotations

import json
import random
from pathlib import Path

# --- in-context-learning task files (llm-foundry's layouts), made here -----------------------

_NOUNS = ["river", "teacher", "garden", "engine", "planet", "violin", "forest", "doctor",
          "window", "market", "castle", "rocket", "island", "farmer", "mirror", "bridge"]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]
HUMAN_EVAL_PROBLEMS = [
    ("add", "def add(a: int, b: int) -> int:\n    \"\"\"Return the sum of a and b.\n    >>> add(2, 3)\n    5\n    \"\"\"\n",
     "    return a + b\n", "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"),
    ("is_even", "def is_even(n: int) -> bool:\n    \"\"\"Whether n is even.\n    >>> is_even(4)\n    True\n    \"\"\"\n",
     "    return n % 2 == 0\n", "def check(candidate):\n    assert candidate(4) is True\n    assert candidate(7) is False\n"),
    ("reverse", "def reverse(s: str) -> str:\n    \"\"\"Reverse a string.\n    >>> reverse('ab')\n    'ba'\n    \"\"\"\n",
     "    return s[::-1]\n", "def check(candidate):\n    assert candidate('abc') == 'cba'\n"),
]


def write_icl_fixtures(root: Path, n: int = 14, seed: int = 0) -> Path:
    """A benchmark dir in the layouts of ../shared/benchmarks: icl/<category>/<task>.jsonl for
    one task of each ICL type (arc_easy MC, winogrande schema, lambada_openai LM), the probes,
    gsm8k and human_eval, and hellaswag/hellaswag_val.jsonl (CORE's HellaSwag is rebuilt from
    it). `n` items each, made from a fixed word list (seeded)."""
    rng = random.Random(seed)

    def write(rel: str, rows: list[dict]) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    mc = []
    for _ in range(n):
        noun = rng.choice(_NOUNS)
        choices = rng.sample(_COLORS, 4)
        mc.append({"query": f"Question: Which color is the {noun} in the old story?",
                   "choices": choices, "gold": rng.randrange(4)})
    write("icl/world_knowledge/arc_easy.jsonl", mc)
    schema = []
    for _ in range(n):
        a, b = rng.sample(_NOUNS, 2)
        stem = f"The {a} was taller than the {b} because the"
        schema.append({"context_options": [f"{stem} {a}", f"{stem} {b}"],
                       "continuation": rng.choice(["grew for years.", "was new."]),
                       "gold": rng.randrange(2)})
    write("icl/language_understanding/winogrande.jsonl", schema)
    lm = [{"context": f"The {rng.choice(_NOUNS)} near the {rng.choice(_NOUNS)} was painted "
                      f"{rng.choice(_COLORS)} and then the",
           "continuation": rng.choice(_NOUNS)} for _ in range(n)]
    write("icl/language_understanding/lambada_openai.jsonl", lm)
    tf = [{"query": f"Is the following statement true or false?\nQ: A {rng.choice(_NOUNS)} is "
                    f"{rng.choice(_COLORS)}.\nA:", "choices": ["T", "F"], "gold": rng.randrange(2)}
          for _ in range(n)]
    write("icl/world_knowledge/bigbench_misconceptions.jsonl", tf)
    for pronoun in ("she", "he"):
        rows = []
        for _ in range(n):
            a, b = rng.sample(_NOUNS, 2)
            rows.append({"query": f"Sentence: \"The {a} told the {b} that {pronoun} was late.\"\n"
                                  f"Q: Who does the pronoun \"{pronoun}\" refer to? A:",
                         "choices": [f"the {a}", f"the {b}"], "gold": rng.randrange(2)})
        write(f"icl/safety/winogender_mc_{'female' if pronoun == 'she' else 'male'}.jsonl", rows)
    gsm = []
    for _ in range(n):
        x, y = rng.randrange(2, 20), rng.randrange(2, 20)
        gsm.append({"context": f"Ann has {x} apples and buys {y} more. How many apples has she?",
                    "chain_of_thought": f"She has {x} + {y} = <<{x}+{y}={x + y}>>{x + y} apples.",
                    "answer": str(x + y)})
    write("icl/symbolic_problem_solving/gsm8k.jsonl", gsm)
    write("icl/programming/human_eval.jsonl", [
        {"task_id": f"HumanEval/{i}", "prompt": prompt, "entry_point": name,
         "canonical_solution": body, "test": test}
        for i, (name, prompt, body, test) in enumerate(HUMAN_EVAL_PROBLEMS)
    ])
    hs = []
    for _ in range(n):
        noun = rng.choice(_NOUNS)
        hs.append({"activity_label": "Painting", "ctx_a": f"A man paints the {noun}.",
                   "ctx_b": "then he", "label": rng.randrange(4),
                   "endings": [f"paints it {c}." for c in rng.sample(_COLORS, 4)]})
    write("hellaswag/hellaswag_val.jsonl", hs)
    return root


def icl_fixture_texts(root: Path) -> list[str]:
    """Every string of the fixture files, for training a tokenizer on them."""
    texts = []
    for path in sorted(root.rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            texts += [v for v in _strings(json.loads(line))]
    return texts


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
