"""Weight-only quantization: every nn.Linear becomes int8 (per output channel) or int4 (per group
of inputs), the token embedding int8 per row; activations stay in floating point.

    quantize_model(model, "int8")                  # in place, from the trained weights
    quantize_model(model, "int4", group_size=64)

int8: symmetric per output row, scale = max|w| / 127, q = round(w / scale) in [-127, 127].
int4: asymmetric per group of G inputs (gpt-fast's convention), scale = (max - min) / 15,
zero = min + 8 * scale, q = round((w - zero) / scale) + 8 in [0, 15], w ~ (q - 8) * scale + zero;
scales and zeros in bfloat16 as (K / G, N, 2). The packed layout (kernels/quant_matmul.py's
docstring) is the state dict's and the same on every device.

The embedding is int8 in both modes: a lookup reads only its rows, and when the output head is
tied to it the two share the one int8 matrix (int4 rows would have to be read back out of
ATen's CPU packing). The MoE router stays in floating point (it decides which experts run);
stacked expert weights are not nn.Linear and stay as they are.

The product, by device: CUDA runs the Triton kernel (kernels/quant_matmul.py). On an x86 CPU,
int8 runs fbgemm's integer GEMM (the engine of PyTorch's quantized ops) with the activations
written exactly as two 7-bit digits (`fbgemm_int8_mm`): ~13 bits per activation and products
exact in int32 (ATen's weight-only int8 op runs on bfloat16 activations, which AVX2 emulates,
and is slower); a compiled batch-1 decode step of SmolLM2 runs 2.2x our eager fp32 one on a
2-core AVX2 CPU (bench/results/generate-*). int4 on the CPU runs ATen's `_weight_int4pack_mm_for_cpu` on bfloat16 activations
(in fp32 it is several times slower than a plain fp32 matmul), as does int8 where fbgemm is not
the quantized engine (ARM: qnnpack); anything else dequantizes and multiplies (the reference).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
QUANT_FILE = "quantization.json"  # in a quantized checkpoint: {"mode", "group_size"}
SKIP = ("router",)  # module names kept in floating point


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (q int8 (N, K), scale fp32 (N,))."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int4_scale_zero(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., G) weights of groups -> (scale, zero) (...,) as stored (bf16-rounded, in fp32)."""
    return _range_scale_zero(groups.amin(dim=-1), groups.amax(dim=-1))


def _range_scale_zero(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored (bf16-rounded) scale and zero of the 16-level grid spanning [lo, hi]."""
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16).float()
    zero = (lo + 8 * scale).to(torch.bfloat16).float()
    return scale, zero


def int4_scale_zero_searched(groups: torch.Tensor, importance: torch.Tensor | None = None,
                             steps: int = 10, max_clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Like int4_scale_zero, but each group's range [min, max] shrunk from below and above by
    whichever of (steps + 1)^2 fractions up to max_clip gives the least squared error of the
    dequantized group (weighted per input by `importance` (G,) or (..., G): GPTQ passes the
    Hessian's diagonal). Clipping a group's outliers buys finer steps for all its other weights;
    with 16 levels across 64 weights that is most often the better trade."""
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    span = hi - lo
    weight = torch.ones_like(groups) if importance is None else importance.expand_as(groups)
    best = torch.full_like(lo, float("inf"))
    best_scale, best_zero = torch.zeros_like(lo), torch.zeros_like(lo)
    fractions = [max_clip * i / steps for i in range(steps + 1)]
    for a in fractions:
        for b in fractions:
            scale, zero = _range_scale_zero(lo + a * span, hi - b * span)
            deq = (int4_codes(groups, scale[..., None], zero[..., None]) - 8) * scale[..., None] + zero[..., None]
            err = ((deq - groups) ** 2 * weight).sum(dim=-1)
            better = err < best
            best = torch.where(better, err, best)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w (...) with broadcastable scale, zero -> codes in [0, 15] (float); dequantized they are
    (q - 8) * scale + zero. From the stored (rounded) scale and zero, so dequantization is as
    close to w as it can be."""
    return (torch.round((w - zero) / scale) + 8).clamp(0, 15)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """codes (N, K) -> uint8 (N, K / 2): column 2j in the low nibble of byte j, 2j + 1 high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (packed uint8 (N, K / 2), scales and zeros bf16 (K / G, N, 2))."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the input size {K}")
    g = w.float().view(N, K // group_size, group_size)
    scale, zero = int4_scale_zero(g)  # (N, K / G)
    q = int4_codes(g, scale[..., None], zero[..., None]).view(N, K)
    return pack_int4(q), scales_zeros(scale, zero)


def scales_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(N, K / G) scales and zeros -> the stored bf16 (K / G, N, 2)."""
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K / 2) -> the nibbles (N, K) as uint8, column k from byte k // 2."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(1)


# --- ATen's CPU int4 layout -----------------------------------------------------------------
# `_convert_weight_to_int4pack_for_cpu` moves the nibbles around in a layout that depends on the
# CPU's vector width; it is a permutation of nibbles, so it is undone by finding where each
# element lands (index-coded inputs, one base-16 digit at a time).


def _to_cpu_layout(packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(packed).int(), 1)


def _from_cpu_layout(cpu_packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    index = torch.arange(n * k, dtype=torch.int64)
    source = torch.zeros(n * k, dtype=torch.int64)  # source[i] = element held by nibble i
    for digit in range(0, max(1, (n * k - 1).bit_length()), 4):
        coded = ((index >> digit) & 0xF).view(n, k).int()
        out = torch.ops.aten._convert_weight_to_int4pack_for_cpu(coded, 1).view(-1)
        source |= torch.stack([out & 0xF, out >> 4], dim=-1).view(-1).long() << digit
    nibbles = torch.stack([cpu_packed.view(-1) & 0xF, cpu_packed.view(-1) >> 4], dim=-1).view(-1)
    q = torch.empty(n * k, dtype=torch.uint8)
    q[source] = nibbles
    q = q.view(n, k)
    return q[:, 0::2] | (q[:, 1::2] << 4)


# --- fbgemm's int8 GEMM, activations as exact integer digits ---------------------------------
# fbgemm's dynamic linear quantizes its input to 7-bit integers with one scale for the whole
# tensor (reduce_range: AVX2's u8 x s8 pair sums saturate int16 at 8 bits), far too coarse for
# activations as they come (SmolLM2's perplexity +15%). Written as integers it takes them
# exactly: each row scaled by its own absmax to [-63, 63] is two digits, x / r * 63 = d1 + d2 /
# 126 to within 1/252, and one sentinel row holding -64 and 63 pins fbgemm's scale to 1 and its
# zero point to 64, so every digit passes its quantization unchanged. Both digit rows go through
# one GEMM (batch-1 decode stays memory-bound at three rows) and recombine in fp32: ~13 bits per
# activation relative to its row's largest, products exact in int32, each row independent of the
# others in the batch.
DIGIT = 63


def fbgemm_available() -> bool:
    """Whether int8 products can run on fbgemm (x86 builds of torch: engine 'x86' or 'fbgemm')."""
    return torch.backends.quantized.engine in ("x86", "fbgemm")


# fbgemm's packed weights live here, by handle: a handle (an int) is what a compiled graph can
# hold and pass to the custom op below (a torchbind object it cannot). Each entry goes when its
# layer is garbage collected or unpacks.
_FBGEMM_WEIGHTS: dict[int, object] = {}
_handles = itertools.count()


def fbgemm_pack(q: torch.Tensor, scale: torch.Tensor) -> int:
    """int8 (N, K) and fp32 scales (N,) -> the handle of fbgemm's packed weight (which holds the
    only copy of it)."""
    zero = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated (pytorch#184982); the
        warnings.simplefilter("ignore", UserWarning)  # packed weight is all this makes of one
        weight = torch._make_per_channel_quantized_tensor(q.cpu(), scale.cpu().double(), zero, 0)
    _define_fbgemm_linear()
    handle = next(_handles)
    _FBGEMM_WEIGHTS[handle] = torch.ops.quantized.linear_prepack(weight, None)
    return handle


def fbgemm_unpack(handle: int) -> torch.Tensor:
    """The int8 (N, K) matrix back out of fbgemm's packing (exact)."""
    weight, _ = torch.ops.quantized.linear_unpack(_FBGEMM_WEIGHTS[handle])
    return weight.int_repr()


@functools.cache
def _define_fbgemm_linear() -> torch.library.Library:
    """torch.ops.llm.fbgemm_linear(digits (M, K), handle, N) -> (M, N): fbgemm's dynamic linear
    as an opaque op, so that torch.compile fuses the code around it. Defined when the first
    weight is packed (eagerly: not while a graph is traced) with torch.library's low-level API:
    its call costs ~6 us here, a `torch.library.custom_op` ~21 us (autograd and aliasing
    wrappers in Python), which at ~200 calls a token was ~3 ms a token."""
    lib = torch.library.Library("llm", "DEF")
    lib.define("fbgemm_linear(Tensor digits, int handle, int n) -> Tensor")
    lib.impl("fbgemm_linear", lambda digits, handle, n: torch.ops.quantized.linear_dynamic(
        digits, _FBGEMM_WEIGHTS[handle], True), "CPU")
    lib.impl("fbgemm_linear", lambda digits, handle, n: digits.new_empty(digits.shape[0], n),
             "Meta")
    return lib  # held by the cache: the op lives as long as the process


def fbgemm_int8_mm(x: torch.Tensor, handle: int, n: int) -> torch.Tensor:
    """x (M, K) fp32 @ the packed int8 weight (n, K), scaled per output row -> (M, n) fp32."""
    M, K = x.shape
    r = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)  # (M, 1)
    u = x * (DIGIT / r)  # rows in [-63, 63]
    high = torch.round(u)
    low = torch.round((u - high) * (2 * DIGIT))  # the remainder, in [-63, 63]
    sentinel = F.pad(torch.tensor([[-64.0, DIGIT]], device=x.device), (0, K - 2))
    digits = torch.cat([high, low, sentinel])
    if torch.compiler.is_compiling():  # the custom op: opaque to dynamo, costly to dispatch eagerly
        y = torch.ops.llm.fbgemm_linear(digits, handle, n)  # (2M + 1, n)
    else:
        y = torch.ops.quantized.linear_dynamic(digits, _FBGEMM_WEIGHTS[handle], True)
    return (y[:M] + y[M : 2 * M] / (2 * DIGIT)) * (r / DIGIT)


class QuantLinear(nn.Module):
    """y = x @ dequant(W)^T with W stored int8 or packed int4 (buffers, not parameters)."""

    keeps_weight = False  # int8 on fbgemm: keep `weight` beside the packed copy (an embedding)

    def __init__(self, in_features: int, out_features: int, mode: str = "int8",
                 group_size: int = 64, device=None, bias: bool = False):  # fmt: skip
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"quantization mode {mode!r}: expected one of {MODES}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.group_size = group_size if mode == "int4" else 0
        N, K = out_features, in_features
        if mode == "int8":
            self.register_buffer("weight", torch.empty(N, K, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.empty(N, dtype=torch.float32, device=device))
        else:
            if group_size not in GROUP_SIZES or K % group_size:
                raise ValueError(
                    f"int4 group size {group_size}: expected one of {GROUP_SIZES} dividing the "
                    f"input size {K}"
                )
            self.register_buffer("weight", torch.empty(N, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer(
                "scale", torch.empty(K // group_size, N, 2, dtype=torch.bfloat16, device=device)
            )
        # a bias (Qwen2's q/k/v) stays in floating point
        self.register_buffer("bias", torch.empty(N, device=device) if bias else None)
        # the weight currently in a CPU op's layout (see forward): int4 in ATen's nibble order,
        # int8 packed by fbgemm (`handle`; `weight` then holds nothing unless keeps_weight)
        self.cpu_layout = False
        self.handle: int | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str, group_size: int = 64) -> QuantLinear:
        """Round to nearest (RTN) from the float layer."""
        weight = linear.weight.detach()
        q, s = quantize_int8(weight) if mode == "int8" else quantize_int4(weight, group_size)
        return cls.from_packed(q, s, mode, group_size, linear.bias)

    @classmethod
    def from_packed(cls, weight, scale, mode: str, group_size: int = 64, bias=None) -> QuantLinear:
        """From stored tensors (int8 weight and scale, or packed int4 and scales-and-zeros)."""
        N = weight.shape[0]
        K = weight.shape[1] * (2 if mode == "int4" else 1)
        layer = cls(K, N, mode, group_size, weight.device, bias=bias is not None)
        layer.weight.copy_(weight)
        layer.scale.copy_(scale)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def canonical_weight(self) -> torch.Tensor:
        """The weight in the state dict's layout (it may sit in a CPU op's layout)."""
        if not self.cpu_layout or (self.mode == "int8" and self.keeps_weight):
            return self.weight
        if self.mode == "int8":
            return fbgemm_unpack(self.handle).to(self.weight.device)
        cpu = _from_cpu_layout(self.weight.cpu(), self.out_features, self.in_features)
        return cpu.to(self.weight.device)

    def _set_layout(self, cpu: bool) -> None:
        """Repack the weight in place of the other layout (memory stays one copy)."""
        if cpu == self.cpu_layout:
            return
        if self.mode == "int4":
            self.weight = _to_cpu_layout(self.weight) if cpu else self.canonical_weight()
        elif cpu:
            self.handle = fbgemm_pack(self.weight, self.scale)
            self._release = weakref.finalize(self, _FBGEMM_WEIGHTS.pop, self.handle, None)
            if not self.keeps_weight:
                self.weight = self.weight.new_empty(0)
        else:
            self.weight = self.canonical_weight()
            self._release()
            self.handle = None
        self.cpu_layout = cpu

    def __getstate__(self):
        """Copies and pickles hold the canonical layout (a handle is this process's, this layer's)."""
        state = self.__dict__.copy()
        if self.cpu_layout:
            state["_buffers"] = dict(self._buffers, weight=self.canonical_weight())
            state.update(cpu_layout=False, handle=None)
            state.pop("_release", None)
        return state

    def dequantize(self) -> torch.Tensor:
        """The (N, K) fp32 matrix this layer multiplies by."""
        if self.mode == "int8":
            return self.canonical_weight().float() * self.scale[:, None]
        G = self.group_size
        q = unpack_int4(self.canonical_weight()).float()
        scale = self.scale[..., 0].float().T.repeat_interleave(G, dim=1)  # (N, K)
        zero = self.scale[..., 1].float().T.repeat_interleave(G, dim=1)
        return (q - 8) * scale + zero

    def _use_cpu_op(self, x2d: torch.Tensor) -> bool:
        if x2d.device.type != "cpu":
            return False
        if self.mode == "int8":  # M > 1 with K % 8 != 0 crashes the op (REFERENCE-POSTTRAIN §7)
            return self.in_features % 8 == 0
        return self.out_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if x2d.device.type == "cuda":
            from kernels.quant_matmul import quant_matmul

            self._set_layout(cpu=False)
            bits = 8 if self.mode == "int8" else 4
            y = quant_matmul(x2d, self.weight, self.scale, bits, self.group_size)
        elif x2d.device.type == "cpu" and self.mode == "int8" and fbgemm_available():
            if not self.cpu_layout:  # once: fbgemm packs the weight for its GEMM
                self._set_layout(cpu=True)
            y = fbgemm_int8_mm(x2d.float().contiguous(), self.handle, self.out_features).to(x.dtype)
        elif self._use_cpu_op(x2d):
            xb = x2d.to(torch.bfloat16)
            if self.mode == "int8":
                y = torch.ops.aten._weight_int8pack_mm(xb, self.weight, self.scale.to(torch.bfloat16))
            else:
                self._set_layout(cpu=True)  # once: ATen's op wants its own nibble order
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                    xb, self.weight, self.group_size, self.scale
                )
            y = y.to(x.dtype)
        else:
            y = F.linear(x2d, self.dequantize().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.canonical_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._set_layout(cpu=False)  # the state dict holds the canonical layout
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"in={self.in_features}, out={self.out_features}, {self.mode}{group}"


class QuantEmbedding(QuantLinear):
    """An int8 embedding table (V, dim): rows looked up and scaled; `linear` is the tied head."""

    keeps_weight = True  # rows are looked up in it; fbgemm's copy serves the tied head

    def __init__(self, num_embeddings: int, dim: int, device=None):
        super().__init__(dim, num_embeddings, "int8", device=device)

    @classmethod
    def from_embedding(cls, embed: nn.Embedding) -> QuantEmbedding:
        layer = cls(*embed.weight.shape, device=embed.weight.device)
        q, s = quantize_int8(embed.weight)
        layer.weight.copy_(q)
        layer.scale.copy_(s)
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].float() * self.scale[ids, None]  # (..., dim)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class TiedHead(nn.Module):
    """The output projection of a tied model: the embedding's int8 matrix, saved once (under
    `embed.`: the embedding is held in a tuple, not as a submodule)."""

    def __init__(self, embed: QuantEmbedding):
        super().__init__()
        self._embed = (embed,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._embed[0].linear(x)


def quantize_model(model: nn.Module, mode: str, group_size: int = 64, weights: bool = True):
    """Swap the Linear layers and the embedding of a Transformer for quantized ones, in place.

    weights=False builds empty quantized layers (the skeleton a quantized checkpoint loads into).
    Returns the model."""
    if mode not in MODES:
        raise ValueError(f"--quantize {mode!r}: expected one of {MODES}")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name not in SKIP:
                shape = child.in_features, child.out_features, mode, group_size
                new = (QuantLinear.from_linear(child, mode, group_size) if weights else
                       QuantLinear(*shape, child.weight.device, bias=child.bias is not None))  # fmt: skip
                setattr(parent, name, new)
    embed = model.embed
    model.embed = (QuantEmbedding.from_embedding(embed) if weights
                   else QuantEmbedding(*embed.weight.shape, device=embed.weight.device))  # fmt: skip
    if model.cfg.tie_embeddings:
        model.lm_head = TiedHead(model.embed)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict, each tensor once: what a checkpoint of it holds (RoPE
    tables and caches are not weights; packed CPU layouts count as their canonical tensors)."""
    total, seen = 0, set()
    for t in model.state_dict().values():
        key = (t.data_ptr(), t.numel(), t.dtype) if t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """--quantize int8|int4 and --group-size G, as generate, eval, serve and bench take them."""
    parser.add_argument("--quantize", choices=MODES, default=None,
                        help="weight-only quantization of the Linear layers and the embedding")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64,
                        help="inputs per int4 scale and zero (default: 64)")
