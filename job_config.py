"""The job config: one typed dataclass per section, loaded from TOML, overridden from the CLI.

    python train.py --config configs/tiny.toml --optim.lr=1e-3 --train.steps=200

Precedence: dataclass defaults < the TOML file < `--section.key=value` overrides. Unknown
sections or keys and values of the wrong type stop with a message naming the key. The
resolved config (every field, derived model fields filled in) is saved with each run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from common.errors import PretrainError
from data.decontaminate import DecontamConfig
from data.dedup import NearDedupConfig
from data.pii import PIIConfig
from data.pipeline import DEFAULT_STAGES
from data.quality import QualityConfig
from model.config import LoRAConfig, ModelConfig, model_config


@dataclass
class DataConfig:
    path: str = "data_cache/stdlib-bpe4k"  # prepared data directory (shards + manifest.json)
    sources: list[str] = field(default_factory=lambda: ["stdlib"])  # see data/sources.py
    text_field: str = "text"  # field holding the text in jsonl / parquet / HF datasets
    tokenizer: str = "train"  # "train" (byte-level BPE on the corpus), a tiktoken name, or a file
    vocab_size: int = 4096  # size of the BPE trained when tokenizer = "train"
    tokenizer_train_bytes: int = 40_000_000  # corpus bytes sampled to train the BPE
    # Script balance of that sample (data/scripts.py): each Unicode script gets the share
    # n^a / sum n^a of the bytes (n: its bytes); 1 keeps the sample as it is, 0 evens scripts out.
    tokenizer_script_balance: float = 1.0
    val_fraction: float = 0.02  # fraction of documents (by hash) held out for validation
    shard_tokens: int = 4_000_000  # tokens per shard file
    # Where the preparation's tasks run (data/executor.py): "local" processes or "ray".
    executor: str = "local"
    workers: int = 2  # local: processes (0: all in this one); ray: CPUs of a Ray started for the job
    ray_address: str = ""  # ray: cluster to join ("auto", "ray://head:10001"); "": start one
    task_retries: int = 3  # ray: reruns of a task whose worker died
    docs_per_task: int = 1000  # documents per read/clean task: bounds each task's memory
    dedup_partitions: int = 8  # a dedup task holds 1 / dedup_partitions of the dedup state
    max_bytes: int = 0  # stop reading sources after this many bytes (0: no limit)
    document_masking: bool = False  # loader yields per-token document ids for attention
    # Domain mixture for training: "prepared_dir=weight" entries; the loader draws each
    # sequence from a domain with probability weight / sum (validation stays on `path`).
    mixture: list[str] = field(default_factory=list)
    # Cleaning stages run by data.prepare, in this order (data/pipeline.py); [] for none.
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    quality: QualityConfig = field(default_factory=QualityConfig)  # [data.quality]
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)  # [data.near_dedup]
    pii: PIIConfig = field(default_factory=PIIConfig)  # [data.pii]
    decontaminate: DecontamConfig = field(default_factory=DecontamConfig)  # [data.decontaminate]


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to min_lr
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices only; norms and embeddings are not decayed
    grad_clip: float = 1.0  # max global gradient norm (0: off)


@dataclass
class TrainConfig:
    run_dir: str = "runs/tiny"
    seed: int = 1337
    steps: int = 400
    seq_len: int = 256
    batch_size: int = 32  # global batch in sequences (all ranks, all micro-batches)
    micro_batch_size: int = 16  # sequences per rank per forward/backward
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16
    compile: bool = False  # torch.compile the model
    fused_loss: bool = False  # chunked Triton linear + cross-entropy (kernels/cross_entropy.py)
    z_loss: float = 0.0  # coefficient of the output softmax z-loss
    val_every: int = 100  # validate every N steps (and at step 0 and the end); 0: never
    val_batches: int = 8  # micro-batches per validation
    log_every: int = 10
    threads: int = 0  # torch CPU threads per process (0: PyTorch's default)
    eval_tasks: list[str] = field(default_factory=list)  # benchmarks scored while training
    eval_every: int = 0  # score eval_tasks every N steps (and at the end); 0: never
    eval_limit: int = 200  # first N items of each task (0: all)
    # What a step optimizes (objectives/): pretrain (next token on data.path's shards), sft
    # (chat conversations, loss on the assistant's tokens) or dpo (preference pairs); sft and dpo
    # fine-tune checkpoint.init_from and read [posttrain].
    objective: str = "pretrain"


@dataclass
class CheckpointConfig:
    every: int = 100  # save every N steps (and at the end, and on SIGTERM / SIGINT); 0: end only
    keep: int = 2  # newest checkpoints kept on disk
    resume: str = ""  # "" (fresh run), "latest" (newest in run_dir), or a checkpoint directory
    # Start a fresh run (step 0, new optimizer) from these weights: a checkpoint or run directory,
    # e.g. one written by `python -m model.hf import`. Ignored when resuming.
    init_from: str = ""
    # Keys a resumed run may change although they change what a step computes (see
    # training/resume.py), e.g. ["train.seq_len"]; ["*"] for all such keys. Model, data and
    # tokenizer changes are refused whatever this says.
    allow_changes: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    wandb: bool = False  # log to Weights & Biases (offline mode when no API key is set)
    wandb_project: str = "pretrain"
    plot: bool = True  # write loss.png into the run directory


@dataclass
class PostTrainConfig:
    """Data and settings of the fine-tuning objectives (train.objective = sft | dpo)."""

    # Tasks: "source" or "source=weight"; a source is a .jsonl / .jsonl.gz / .json file or
    # hf:NAME[:CONFIG]:SPLIT (data/conversations.py lists the record shapes). Each task is
    # drawn by weight / sum and named after its file (or dataset) for the per-task metrics.
    data: list[str] = field(default_factory=list)
    holdout: int = 0  # records of each task held out (seeded) for validation
    val_data: list[str] = field(default_factory=list)  # extra held-out sources, one task each
    max_records: int = 0  # read at most N records of each source (0: all)
    # "" (the tokenizer's own chat template; the default one when it has none), "default"
    # (objectives/chat_tokens.py DEFAULT_TEMPLATE), or a .jinja file
    chat_template: str = ""
    packing: bool = True  # sft: pack conversations into rows, attention masked per conversation
    beta: float = 0.1  # dpo: strength of the pull towards the reference (the KL coefficient)
    label_smoothing: float = 0.0  # dpo: assumed fraction of flipped labels (cDPO), < 0.5

    def __post_init__(self) -> None:
        if self.holdout < 0 or self.max_records < 0:
            raise ValueError("posttrain.holdout and posttrain.max_records must be >= 0")
        if self.beta <= 0:
            raise ValueError(f"posttrain.beta = {self.beta}: expected > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"posttrain.label_smoothing = {self.label_smoothing}: expected "
                             "0 <= label_smoothing < 0.5")


@dataclass
class ParallelConfig:
    """How the world of processes is split (see parallel/mesh.py): pp x dp_replicate x dp_shard
    x tp ranks; ep (expert parallel, MoE) borrows its ranks from dp_shard and tp."""

    backend: str = "auto"  # process-group backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo
    engine: str = "native"  # native (PyTorch: DDP / FSDP2 / DTensor TP) | deepspeed (ZeRO)
    dp_replicate: int = 1  # data-parallel replicas (HSDP: FSDP inside a replica, DDP-like across)
    dp_shard: int = -1  # data-parallel ranks that shard parameters; -1: the rest of the world
    tp: int = 1  # tensor-parallel ranks (Megatron-style column/row split + sequence parallel)
    # Expert-parallel ranks for MoE layers, borrowed from dp_shard (ep / tp of them) and the
    # whole tensor-parallel group: a multiple of tp when tp > 1
    ep: int = 1
    pp: int = 1  # pipeline stages' ranks (torch.distributed.pipelining), outermost in the mesh
    pp_schedule: str = "1F1B"  # 1F1B | GPipe | Interleaved1F1B | InterleavedZeroBubble
    pp_stages_per_rank: int = 0  # model chunks per pp rank: 0 = 1, or 2 for interleaved ones
    data_parallel: str = "fsdp"  # fsdp (FSDP2 fully_shard) | ddp (DistributedDataParallel)
    activation_checkpointing: str = "none"  # none | selective (keep matmuls, recompute rest) | full
    param_dtype: str = "auto"  # FSDP2 compute dtype: auto (= train dtype) | float32 | bfloat16
    reduce_dtype: str = "float32"  # FSDP2 gradient reduction dtype
    zero_stage: int = 2  # deepspeed engine: ZeRO stage 1, 2 or 3
    offload_optimizer: bool = False  # deepspeed engine: optimizer states and step on the CPU

    def __post_init__(self) -> None:
        choices = {
            "engine": ("native", "deepspeed"),
            "data_parallel": ("fsdp", "ddp"),
            "activation_checkpointing": ("none", "selective", "full"),
            "param_dtype": ("auto", "float32", "bfloat16"),
            "reduce_dtype": ("float32", "bfloat16"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"parallel.{name} = {getattr(self, name)!r}: expected one of {allowed}")
        for name in ("dp_replicate", "tp", "ep", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} = {getattr(self, name)}: expected >= 1")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ValueError(f"parallel.dp_shard = {self.dp_shard}: expected >= 1, or -1 (the rest)")
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"parallel.zero_stage = {self.zero_stage}: expected 1, 2 or 3")


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    posttrain: PostTrainConfig = field(default_factory=PostTrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # adapters (model/lora.py); rank 0: off

    @classmethod
    def from_dict(cls, raw: dict, origin: str = "config") -> JobConfig:
        """Build from nested dicts, rejecting unknown sections / keys and wrong types."""
        sections = _section_types(cls)
        for name in raw:
            if name not in sections:
                raise ConfigError(f"{origin}: unknown section [{name}]; known: {sorted(sections)}")
        values = {}
        for name, section_cls in sections.items():
            section = raw.get(name, {})
            if not isinstance(section, dict):
                raise ConfigError(f"{origin}: [{name}] must be a table of keys")
            if name == "model":
                values[name] = _model_section(section, origin)
            else:
                values[name] = _build_section(section_cls, name, section, origin)
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        t = self.train
        if t.objective == "pretrain" and t.seq_len > self.model.max_seq_len:  # else: the base's
            raise ConfigError(
                f"train.seq_len = {t.seq_len} exceeds model.max_seq_len = {self.model.max_seq_len}"
            )
        if self.optim.schedule not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"optim.schedule = {self.optim.schedule!r}: expected cosine|wsd|constant")
        unknown = [s for s in self.data.stages if s not in DEFAULT_STAGES]
        if unknown or len(set(self.data.stages)) != len(self.data.stages):
            raise ConfigError(
                f"data.stages = {self.data.stages}: each at most once, from {DEFAULT_STAGES}"
            )
        if t.objective not in ("pretrain", "sft", "dpo"):
            raise ConfigError(f"train.objective = {t.objective!r}: expected pretrain, sft or dpo")
        if t.objective != "pretrain" and not self.posttrain.data:
            raise ConfigError(f"train.objective = {t.objective!r} needs posttrain.data")
        if self.lora.rank and (self.parallel.engine == "deepspeed" or self.parallel.tp > 1):
            raise ConfigError("lora.rank > 0 runs on the native engine without tensor "
                              "parallelism (parallel.engine = 'native', parallel.tp = 1)")
        for name in ("steps", "seq_len", "batch_size", "micro_batch_size"):
            if getattr(t, name) <= 0:
                raise ConfigError(f"train.{name} = {getattr(t, name)}: expected a positive integer")


class ConfigError(PretrainError, ValueError):
    """A config file, section, key or value that is not what its field expects."""


def _section_types(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_type(key: str, value, expected, origin: str):
    """Return value converted to `expected` (int -> float allowed), or raise naming the key."""
    origin_type = typing.get_origin(expected)
    if origin_type in (typing.Union, types.UnionType):
        for option in typing.get_args(expected):
            try:
                return _check_type(key, value, option, origin)
            except ConfigError:
                continue
        raise ConfigError(f"{origin}: {key} = {value!r}: expected {expected}")
    if dataclasses.is_dataclass(expected):  # a nested table, e.g. [data.quality]
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: {key} must be a table of keys")
        return _build_section(expected, key, value, origin)
    if origin_type is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, list):
            raise ConfigError(f"{origin}: {key} = {value!r}: expected a list of {item_type.__name__}")
        return [_check_type(f"{key}[{i}]", v, item_type, origin) for i, v in enumerate(value)]
    if expected is type(None):
        if value is None:
            return None
    elif expected is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif expected is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif expected in (bool, str) and type(value) is expected:
        return value
    name = getattr(expected, "__name__", str(expected))
    raise ConfigError(f"{origin}: {key} = {value!r} ({type(value).__name__}): expected {name}")


def _build_section(cls, name: str, section: dict, origin: str):
    types_ = _section_types(cls)
    kwargs = {}
    for key, value in section.items():
        if key not in types_:
            raise ConfigError(
                f"{origin}: unknown key {name}.{key}; known keys of [{name}]: {sorted(types_)}"
            )
        kwargs[key] = _check_type(f"{name}.{key}", value, types_[key], origin)
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{origin}: {e}") from e


def _model_section(section: dict, origin: str) -> ModelConfig:
    section = dict(section)
    size = section.pop("size", None)
    if size is not None and not isinstance(size, str):
        raise ConfigError(f"{origin}: model.size = {size!r}: expected the name of a size")
    types_ = _section_types(ModelConfig)
    checked = {}
    for key, value in section.items():
        if key not in types_:
            raise ConfigError(
                f"{origin}: unknown key model.{key}; known keys of [model]: "
                f"{sorted(['size', *types_])}"
            )
        checked[key] = _check_type(f"model.{key}", value, types_[key], origin)
    try:
        return model_config(size, **checked)
    except ValueError as e:
        raise ConfigError(f"{origin}: {e}") from e


def parse_overrides(args: list[str]) -> dict:
    """["--optim.lr=1e-3", "--data.sources=['a','b']"] -> {"optim": {"lr": 0.001}, ...}.

    Values are parsed as TOML values (numbers, booleans, quoted strings, arrays); anything that
    does not parse is taken as a bare string.
    """
    out: dict = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"override {arg!r}: expected --section.key=value")
        key, text = arg[2:].split("=", 1)
        *tables, name = key.split(".")  # --data.quality.profile=x sets [data.quality] profile
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        node = out
        for i, table in enumerate(tables):
            node = node.setdefault(table, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r}: {'.'.join(tables[: i + 1])} was given a "
                                  f"value by an earlier override, it is not a table")
        if isinstance(node.get(name), dict):
            raise ConfigError(f"override {arg!r}: {key} is a table ([{key}]), not a value")
        node[name] = value
    return out


def merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, nested tables merged key by key."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def flat_dict(tree: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}: nested tables as dotted keys."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_diff(old: dict, new: dict) -> dict[str, tuple]:
    """{key: (old value, new value)} for the keys of two flat dicts whose values differ (a key
    missing on one side shows as None there)."""
    keys = sorted(set(old) | set(new))
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_bytes().decode("utf-8"))
        except OSError as e:
            raise ConfigError(f"config file {path}: unreadable ({e.strerror or e})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); expected TOML") from None
        except (tomllib.TOMLDecodeError, RecursionError) as e:
            raise ConfigError(f"{path}: not valid TOML ({e or 'nested too deeply'})") from None
    origin = str(path) if path is not None else "config"
    if overrides:
        raw = merge(raw, parse_overrides(overrides))
        origin += " + command line"
    cfg = JobConfig.from_dict(raw, origin)
    cfg.validate()
    return cfg


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}


def toml_value(value, key: str = "value") -> str:
    """A config value as TOML that tomllib reads back to the same value (JSON is not TOML:
    it writes inf as Infinity, and escapes characters TOML cannot take as \\u surrogates)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # 0.001, 1e-05, inf, -inf, nan: all TOML floats
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v, f"{key}[{i}]") for i, v in enumerate(value)) + "]"
    if isinstance(value, str):
        out = []
        for ch in value:
            code = ord(ch)
            if 0xD800 <= code <= 0xDFFF:  # e.g. undecodable bytes of a command-line argument
                raise ConfigError(f"{key} = {value!r}: not valid Unicode, cannot be saved")
            if ch in _TOML_ESCAPES:
                out.append(_TOML_ESCAPES[ch])
            elif code < 0x20 or code == 0x7F:
                out.append(f"\\u{code:04x}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    raise ConfigError(f"{key} = {value!r}: a {type(value).__name__} cannot be saved as TOML")


def to_toml(cfg: JobConfig) -> str:
    """The resolved config as TOML (scalars and lists of scalars only)."""
    lines: list[str] = []

    def table(name: str, values: dict) -> None:
        lines.append(f"[{name}]")
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        for key, value in values.items():
            if key not in nested:
                lines.append(f"{key} = {toml_value(value, f'{name}.{key}')}")
        lines.append("")
        for key, value in nested.items():  # e.g. [data.quality], after data's own keys
            table(f"{name}.{key}", value)

    for section, values in cfg.to_dict().items():
        table(section, values)
    return "\n".join(lines)
