"""Helpers shared by the kernel launchers: input checks with clear errors, interpreter detection,
and lazily built autotuners (so no environment is read and nothing is tuned at import time)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
import triton

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels in its NumPy interpreter (TRITON_INTERPRET=1, CPU tests).

    Read at call time, never at import; the interpreter itself is fixed when @triton.jit runs.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | Iterable[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
    last_dim_contiguous: bool = False,
    where: str = "",
) -> torch.Tensor:
    """Raise TypeError / ValueError naming `name` unless `t` is a tensor of the expected kind."""
    prefix = f"{where}: " if where else ""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{prefix}{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(f"{n}-D" for n in allowed)
            raise ValueError(f"{prefix}{name} must be {want}, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{prefix}{name} must have dtype in ({want}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{prefix}{name} is on {t.device}, expected {device} like the others")
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{prefix}{name} must be contiguous in its last dimension (stride(-1) == 1), "
            f"got strides {t.stride()}; call .contiguous() first"
        )
    return t


def check_device(where: str, t: torch.Tensor) -> None:
    """Kernels run on CUDA, or on the CPU only under the interpreter."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreting():
        return
    raise ValueError(
        f"{where}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
        f"got a tensor on {t.device}"
    )


def check_no_bf16_dot(where: str, dtype: torch.dtype, device: torch.device) -> None:
    """The interpreter computes bf16 tl.dot wrongly (it multiplies bit patterns): refuse it."""
    if dtype == torch.bfloat16 and device.type == "cpu" and interpreting():
        raise TypeError(
            f"{where}: bfloat16 matmuls are wrong under TRITON_INTERPRET=1; use float32 or float16 "
            "on the CPU (bfloat16 is supported on CUDA)"
        )


def num_programs_hint(device: torch.device) -> int:
    """How many persistent programs to launch for row-loop kernels: a few per SM on a GPU, a
    handful under the interpreter (it runs programs one after another)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


AUTOTUNE_CONFIGS_ENV = "KERNELS_AUTOTUNE_CONFIGS"


def autotune_limit() -> int | None:
    """KERNELS_AUTOTUNE_CONFIGS=N: autotune over at most the first N configs (of those the
    kernel's prune keeps), for runs that cannot afford to compile every config (a short GPU
    lease: bench/gpu_check.py). Unset or 0: every config. Read when an autotuner is built."""
    raw = os.environ.get(AUTOTUNE_CONFIGS_ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"{AUTOTUNE_CONFIGS_ENV}={raw!r}: expected a whole number >= 0")
    return n or None


class LazyAutotune:
    """Wrap a @triton.jit kernel in triton.autotune on first use.

    On a GPU the kernel is autotuned over `gpu_configs` (ordered best guess first, so that
    KERNELS_AUTOTUNE_CONFIGS=N keeps the likeliest N); under the interpreter (which runs one
    program at a time in NumPy) it is launched with the single small `interpreter_config`.
    Building the autotuner lazily keeps imports free of environment reads.
    """

    def __init__(
        self,
        kernel: Callable,
        gpu_configs: list[triton.Config],
        interpreter_config: dict,
        key: list[str],
        prune: Callable | None = None,
    ):
        self.kernel = kernel
        self.gpu_configs = gpu_configs
        self.interpreter_config = interpreter_config
        self.key = key
        self.prune = prune
        self._tuned = None

    def __getitem__(self, grid):
        if interpreting():
            cfg = self.interpreter_config
            return lambda *args, **kw: self.kernel[grid](*args, **kw, **cfg)
        if self._tuned is None:
            prune_fn, limit = self.prune, autotune_limit()
            if limit is not None:
                prune_fn = _first_configs(self.prune, limit)
            prune = {"early_config_prune": prune_fn} if prune_fn else None
            self._tuned = triton.autotune(self.gpu_configs, key=self.key, prune_configs_by=prune)(
                self.kernel
            )
        return self._tuned[grid]


def _first_configs(prune: Callable | None, limit: int) -> Callable:
    """An early_config_prune that applies `prune` (if any), then keeps the first `limit`."""

    def keep_first(configs, named_args, **kwargs):
        kept = prune(configs, named_args, **kwargs) if prune else configs
        return list(kept)[:limit]

    return keep_first
