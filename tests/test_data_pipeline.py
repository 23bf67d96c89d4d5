"""The cleaning pipeline end to end: manifest counts equal what was planted, bad input counted
with file and line, worker processes give the serial result, a killed preparation rerun gives the
shards of an uninterrupted one, and the domain-mixture loader."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data.decontaminate import DecontamConfig
from data.pipeline import build_pipeline
from data.sources import Document
from job_config import DataConfig, load_config
from tests.data_helpers import planted_corpus, small_data_config
from tests.helpers import REPO, prose


def test_manifest_counts_equal_planted_and_bad_input_reported(tmp_path):
    from data.prepare import prepare

    rng = random.Random()
    sources, plan = planted_corpus(tmp_path, rng)
    manifest = prepare(small_data_config(tmp_path, sources))
    stages = manifest["stages"]
    assert list(stages) == ["normalize", "quality", "exact_dedup", "near_dedup", "pii",
                            "decontaminate"]
    assert stages["quality"]["removed"] == plan["junk"]
    assert stages["exact_dedup"]["removed"] == plan["exact"]
    assert stages["near_dedup"]["removed"] == plan["near"]
    assert stages["pii"]["counts"] == {"email": plan["email"], "phone": plan["phone"]}
    assert stages["decontaminate"]["counts"]["toy"] == plan["contaminated"]
    assert stages["decontaminate"]["counts"]["cut_docs"] == plan["contaminated"]
    kept = 30 + 3 + 2 + 2 - plan["junk"] - plan["exact"] - plan["near"]
    assert manifest["train"]["documents"] + manifest["val"]["documents"] == kept
    # Bad input: counted and reported with file and line, the run went on.
    errors = manifest["source_errors"]["first"]
    assert any("corpus.jsonl:5: not JSON" in e for e in errors), errors
    assert any("corpus.jsonl:10: no string field 'text'" in e for e in errors), errors
    assert any("latin1.txt: invalid UTF-8" in e for e in errors), errors


def test_unreadable_file_does_not_stop_the_run(tmp_path, monkeypatch):
    from data.prepare import prepare

    rng = random.Random()
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(12):
        (folder / f"doc{i}.txt").write_text(prose(rng, 200))
    (tmp_path / "bench.jsonl").write_text(json.dumps({"text": prose(rng, 30)}) + "\n")
    real_read = Path.read_bytes

    def read_bytes(self):
        if self.name == "doc3.txt":
            raise PermissionError(13, "Permission denied")
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    # workers=0: the tasks run in this process, where the patch is.
    manifest = prepare(small_data_config(tmp_path, [str(folder)], workers=0))
    assert manifest["train"]["documents"] + manifest["val"]["documents"] == 11
    assert any("doc3.txt: unreadable" in e for e in manifest["source_errors"]["first"])


def test_workers_give_the_serial_result():
    rng = random.Random()
    base = [prose(rng, 200) for _ in range(60)]
    texts = base + [base[3], base[7] + " ", base[11].replace("the", "The", 1)]
    texts += [f"mail me at someone{i}@gmail.com. " + prose(rng, 200) for i in range(6)]
    docs = [Document(t, f"doc{i}.txt") for i, t in enumerate(texts)]
    cfg = DataConfig(decontaminate=DecontamConfig(benchmarks=[]))
    serial, parallel = build_pipeline(cfg), build_pipeline(cfg)
    out_serial = [t for t, _ in serial.run(docs, workers=0)]
    out_parallel = [t for t, _ in parallel.run(docs, workers=2, chunk_chars=5000)]
    assert out_serial == out_parallel
    strip = lambda stats: {k: {f: v for f, v in s.items() if f != "seconds"}  # noqa: E731
                           for k, s in stats.items()}
    assert strip(serial.stats_dict()) == strip(parallel.stats_dict())
    assert serial.stats_dict()["pii"]["counts"]["email"] == 6


def _prepare_cmd(config: Path, path: Path, tokenizer: str) -> list[str]:
    return [sys.executable, "-m", "data.prepare", "--config", str(config),
            f"--data.path={path}", f"--data.tokenizer={tokenizer}"]


def test_killed_preparation_reruns_to_the_same_shards(tmp_path):
    """Kill `python -m data.prepare` after its first shard, rerun: the shards are byte-equal to
    those of an uninterrupted run (cleaning is deterministic; finished shards are skipped)."""
    rng = random.Random()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": prose(rng, 400)}) + "\n" for _ in range(300)))
    (tmp_path / "bench.jsonl").write_text(json.dumps({"text": prose(rng, 30)}) + "\n")
    config = tmp_path / "job.toml"
    config.write_text(
        f'[data]\nsources = ["{corpus}"]\nvocab_size = 300\nshard_tokens = 20000\nworkers = 1\n'
        f'val_fraction = 0.05\n[data.decontaminate]\nbenchmarks = ["toy={tmp_path}/bench.jsonl"]\n'
    )
    load_config(config)  # the file is a valid job config
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    full = tmp_path / "full"
    subprocess.run(_prepare_cmd(config, full, "train"), cwd=REPO, env=env, check=True,
                   capture_output=True)
    tokenizer = str(full / "tokenizer.tiktoken")
    shards = sorted(p.name for p in full.glob("*.bin"))
    assert len(shards) >= 4

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_prepare_cmd(config, killed, tokenizer), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while not (killed / "train_000000.bin").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the worker processes too
    proc.wait()
    assert (killed / "train_000000.bin").exists() and not (killed / "manifest.json").exists()
    done_before = sorted(p.name for p in killed.glob("*.bin"))
    assert len(done_before) < len(shards)  # really killed halfway

    subprocess.run(_prepare_cmd(config, killed, tokenizer), cwd=REPO, env=env, check=True,
                   capture_output=True)
    assert sorted(p.name for p in killed.glob("*.bin")) == shards
    for name in shards:
        assert (killed / name).read_bytes() == (full / name).read_bytes(), name
    stages_full = json.loads((full / "manifest.json").read_text())["stages"]
    stages_killed = json.loads((killed / "manifest.json").read_text())["stages"]
    assert {k: v["docs_out"] for k, v in stages_full.items()} == {
        k: v["docs_out"] for k, v in stages_killed.items()
    }


def test_mixture_loader_draws_by_weight_and_resumes(tmp_path):
    from data.loader import MixtureLoader, TokenStream
    from data.shards import write_shard

    streams = {}
    for d, name in enumerate(["code", "web"]):
        path = tmp_path / name
        path.mkdir()
        tokens = np.full(20000, d, np.uint16)  # every token names its domain
        write_shard(path / "train_000000.bin", tokens, 300)
        manifest = {"train": {"shards": [{"file": "train_000000.bin", "tokens": 20000}]}}
        streams[name] = TokenStream(path, "train", manifest)
    weights = {"code": 3.0, "web": 1.0}

    def make():
        return MixtureLoader(streams, weights, seq_len=16, batch_size=8, micro_batch_size=4,
                             seed=5)

    loader = make()
    drawn = []
    for _ in range(100):
        for batch in loader.next_step():
            drawn += batch.inputs[:, 0].tolist()
    frac = np.mean(np.array(drawn) == 0)
    # 800 draws at p = 0.75: std 0.015, so 0.06 is 4 sigma.
    assert abs(frac - 0.75) < 0.06
    assert loader.mixture_seen()["code"] == pytest.approx(frac)
    state = loader.state_dict()
    after = [b.inputs for b in loader.next_step()]
    resumed = make()
    resumed.load_state_dict(state)
    assert all((a == b).all() for a, b in zip(after, [b.inputs for b in resumed.next_step()]))
    other = MixtureLoader(streams, {"code": 1.0, "web": 1.0}, 16, 8, 4, seed=5)
    with pytest.raises(ValueError, match="mixture"):
        other.load_state_dict(state)


def test_map_over_files_then_merge_equals_run():
    """The cluster mode: map each "file" on a pickled copy (as a remote worker would), merge in
    file order: same output and counters as a local run."""
    import pickle

    rng = random.Random()
    base = [prose(rng, 150) for _ in range(20)]
    files = [
        [Document(t, "f1.jsonl", i) for i, t in enumerate(base[:10] + [base[2]])],
        [Document(t, "f2.jsonl", i) for i, t in enumerate(base[10:] + [base[4], "x@gmail.com"])],
    ]
    cfg = DataConfig(decontaminate=DecontamConfig(benchmarks=[]))
    local = build_pipeline(cfg)
    expected = [t for t, _ in local.run([d for f in files for d in f])]
    driver = build_pipeline(cfg)
    mapped = [pickle.loads(pickle.dumps(driver)).map(f) for f in files]  # "remote" workers
    merged = [t for m in mapped for t, _ in driver.merge(m)]
    assert merged == expected
    assert driver.stats_dict()["exact_dedup"]["removed"] == 2
    strip = lambda stats: {k: {f: v for f, v in s.items() if f != "seconds"}  # noqa: E731
                           for k, s in stats.items()}
    assert strip(driver.stats_dict()) == strip(local.stats_dict())


def test_stage_list_from_config():
    assert build_pipeline(DataConfig(stages=[])).stages == []
    assert build_pipeline(DataConfig(stages=["pii", "normalize"])).names == ["pii", "normalize"]
    with pytest.raises(ValueError, match="unknown cleaning stage"):
        build_pipeline(stages=["nope"])


def test_build_train_loader_from_the_mixture_config(tmp_path):
    from data.loader import DataLoader, MixtureLoader, build_train_loader, parse_mixture
    from data.shards import write_shard

    dirs = []
    for d, sha in enumerate(["same", "same", "other"]):
        path = tmp_path / f"domain{d}"
        path.mkdir()
        write_shard(path / "train_000000.bin", np.full(5000, d, np.uint16), 300)
        manifest = {"tokenizer": {"name": "bpe", "sha256": sha, "n_vocab": 300, "eot_id": 0},
                    "train": {"shards": [{"file": "train_000000.bin", "tokens": 5000}]}}
        (path / "manifest.json").write_text(json.dumps(manifest))
        dirs.append((path, manifest))
    (p0, m0), (p1, _), (p2, _) = dirs
    single = build_train_loader(DataConfig(path=str(p0)), m0, 16, 8, 4)
    assert isinstance(single, DataLoader)
    cfg = DataConfig(path=str(p0), mixture=[f"{p0}=1", f"{p1}=2.5"])
    mixed = build_train_loader(cfg, m0, 16, 8, 4)
    assert isinstance(mixed, MixtureLoader) and mixed.weights.tolist() == [1 / 3.5, 2.5 / 3.5]
    with pytest.raises(ValueError, match="one tokenizer"):
        build_train_loader(DataConfig(path=str(p0), mixture=[f"{p0}=1", f"{p2}=1"]), m0, 16, 8, 4)
    with pytest.raises(ValueError, match="prepared_dir=weight"):
        parse_mixture(["no-weight"])
