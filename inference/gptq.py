"""GPTQ (Frantar et al. 2022, arXiv 2210.17323): int4 weights chosen so that each Linear layer's
output on calibration inputs changes least, instead of rounding every weight to its nearest
level (RTN, model/quant.py's default). The storage is the same packed int4 (model/quant.py).

For a layer y = W x with inputs X (calibration tokens), the error ||(W - Q) X||^2 has Hessian
H = X X^T. Columns are quantized left to right; each column's rounding error, divided by the
diagonal of the upper Cholesky factor U of H^-1, is pushed onto the columns not yet quantized
(W[:, j:] -= err * U[i, j:]), in blocks of 128 columns with the update deferred between
blocks. A group's scale and zero come from its weights as updated when the group starts.
Damping: 1% of the mean diagonal added to H. Blocks are quantized in order: the inputs a block
sees are the outputs of the already quantized blocks before it (sequential GPTQ). Options:
act_order (columns by decreasing H diagonal, group parameters fixed beforehand: "static
groups") and clip (each group's range searched, model/quant.py's int4_scale_zero_searched).

    from inference.gptq import gptq_quantize_model
    gptq_quantize_model(model, calibration_batches, group_size=64)   # in place
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from data.loader import TokenStream, make_batch
from data.manifest import load_manifest
from model.quant import (
    SKIP,
    QuantEmbedding,
    QuantLinear,
    TiedHead,
    int4_codes,
    int4_scale_zero,
    int4_scale_zero_searched,
    pack_int4,
    scales_zeros,
)
from model.transformer import Transformer


def gptq_int4(w: torch.Tensor, H: torch.Tensor, group: int, block: int = 128, damp: float = 0.01,
              act_order: bool = False, clip: bool = False):  # fmt: skip
    """w (N, K), H (K, K) -> (packed uint8 (N, K / 2), scales and zeros bf16 (K / G, N, 2)).

    act_order: quantize the columns in order of decreasing H diagonal (the inputs that matter
    most first, while the most columns remain to absorb their error); each group's scale and
    zero are then fixed before the loop, from the unquantized weights ("static groups").
    clip: each group's range from int4_scale_zero_searched, weighted by H's diagonal."""
    W = w.detach().double().clone()
    N, K = W.shape
    if K % group:
        raise ValueError(f"int4 group size {group} does not divide the input size {K}")
    H = H.double().clone()
    dead = torch.diag(H) == 0  # inputs that are always zero: any value is exact
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(K, dtype=H.dtype)
    diag = torch.diag(H).float()

    def params(cols: torch.Tensor, k0: int):  # (N, G) weights of the group starting at k0
        if clip:
            return int4_scale_zero_searched(cols.float(), diag[k0 : k0 + group])
        return int4_scale_zero(cols.float())

    scale = torch.zeros(N, K // group, dtype=W.dtype)
    zero = torch.zeros_like(scale)
    order = torch.arange(K)
    if act_order:
        for g in range(K // group):
            scale[:, g], zero[:, g] = params(W[:, g * group : (g + 1) * group], g * group)
        order = torch.argsort(diag, descending=True)
        W, H = W[:, order], H[order][:, order]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    block = max(group, block - block % group)  # blocks hold whole groups (in order)
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        W1, U1 = W[:, b0:b1].clone(), U[b0:b1, b0:b1]
        err = torch.zeros_like(W1)
        for i in range(b1 - b0):
            col = b0 + i
            g = int(order[col]) // group
            if not act_order and col % group == 0:
                scale[:, g], zero[:, g] = params(W1[:, i : i + group], col)
            s, z = scale[:, g], zero[:, g]
            Q[:, col] = codes = int4_codes(W1[:, i], s, z)
            e = (W1[:, i] - ((codes - 8) * s + z)) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            err[:, i] = e
        W[:, b1:] -= err @ U[b0:b1, b1:]
    if act_order:
        Q = Q[:, torch.argsort(order)]
    return pack_int4(Q), scales_zeros(scale.float(), zero.float())


def calibration_batches(data_dir, windows: int, seq_len: int, device="cpu") -> list[torch.Tensor]:
    """The first `windows` windows of seq_len tokens of a prepared dataset's train split, in
    batches of 8 (B, T): GPTQ's calibration inputs."""
    stream = TokenStream(data_dir, "train", load_manifest(data_dir))
    return [make_batch(stream, np.arange(i, min(i + 8, windows)), seq_len).inputs.to(device)
            for i in range(0, windows, 8)]  # fmt: skip


class _Hessians:
    """Forward hooks summing X X^T of every Linear's input (one matrix per distinct input)."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.H: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            h = x.T @ x
            self.H[name] = self.H[name] + h if name in self.H else h

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def gptq_quantize_model(model: Transformer, batches: list[torch.Tensor], group_size: int = 64,
                        log=print, act_order: bool = False, clip: bool = False) -> Transformer:  # fmt: skip
    """GPTQ int4 for every Linear of every block (calibration: token batches (B, T)); the
    embedding (and a tied head) int8, an untied head int4 by RTN, as quantize_model does."""
    t0 = time.time()
    T = batches[0].shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    xs = [model.embed(b) for b in batches]  # the inputs of block 0, (B, T, dim) each
    for i, block in enumerate(model.blocks):
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)
                   and n.split(".")[-1] not in SKIP}  # fmt: skip
        hooks = _Hessians(linears)
        for x in xs:
            block(x, cos, sin)
        hooks.remove()
        for name, linear in linears.items():
            packed, sz = gptq_int4(linear.weight, hooks.H[name], group_size, act_order=act_order, clip=clip)
            parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
            setattr(parent, name.rsplit(".", 1)[-1],
                    QuantLinear.from_packed(packed, sz, "int4", group_size, linear.bias))  # fmt: skip
        xs = [block(x, cos, sin) for x in xs]  # what the quantized block passes on
        log(f"gptq: block {i + 1}/{len(model.blocks)} ({time.time() - t0:.0f} s)")
    if model.lm_head is not None:
        model.lm_head = QuantLinear.from_linear(model.lm_head, "int4", group_size)
    model.embed = QuantEmbedding.from_embedding(model.embed)
    if model.cfg.tie_embeddings:
        model.lm_head = TiedHead(model.embed)
    return model
