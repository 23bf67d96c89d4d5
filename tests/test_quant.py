"""Weight-only quantization (model/quant.py, kernels/quant_matmul.py): the rounding bounds, every
product path against the dequantize-then-matmul reference, quantized models and checkpoints."""

import pytest
import torch

from kernels.quant_matmul import quant_matmul, reference_quant_matmul
from model.quant import (
    QuantLinear,
    _from_cpu_layout,
    _to_cpu_layout,
    fbgemm_int8_mm,
    fbgemm_pack,
    fbgemm_unpack,
    quantize_int4,
    quantize_int8,
    quantize_model,
    unpack_int4,
    weight_bytes,
)
from tests.helpers import tiny_model


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_int8_rounding_is_within_half_a_step(seed):
    w = torch.randn(48, 80) * torch.rand(48, 1) * 3  # rows of different ranges
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()
    assert (q.abs().amax(1) == 127).all()  # each row's largest weight uses the full range


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_rounding_is_within_half_a_step(seed, group):
    w = torch.randn(32, 256) + torch.linspace(-2, 2, 256)  # groups with different offsets
    packed, sz = quantize_int4(w, group)
    assert packed.shape == (32, 128) and packed.dtype == torch.uint8 and sz.shape == (256 // group, 32, 2)
    q = unpack_int4(packed).float()
    scale = sz[..., 0].float().T.repeat_interleave(group, 1)
    zero = sz[..., 1].float().T.repeat_interleave(group, 1)
    deq = (q - 8) * scale + zero
    # half a step, plus the bf16 rounding of the stored zero (<= 2^-9 of the group's range)
    slack = scale / 2 + 2**-8 * (zero.abs() + 8 * scale)
    assert ((deq - w).abs() <= slack).all()


def test_cpu_int4_layout_round_trips(seed):
    """ATen's CPU packing is undone exactly, for shapes with and without a partial block."""
    for n, k in [(16, 64), (48, 128), (64, 64), (96, 256)]:
        packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
        cpu = _to_cpu_layout(packed)
        assert cpu.shape == packed.shape and not torch.equal(cpu, packed)
        assert torch.equal(_from_cpu_layout(cpu, n, k), packed)


@pytest.mark.parametrize("mode,group", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_cpu_ops_match_the_dequantized_reference(seed, mode, group):
    linear = torch.nn.Linear(256, 96, bias=False)
    layer = QuantLinear.from_linear(linear, mode, group or 64)
    x = torch.randn(2, 5, 256)
    ref = x @ layer.dequantize().T
    out = layer(x)  # int8: fbgemm with activation digits; int4: ATen's op on bf16 activations
    assert out.shape == (2, 5, 96) and out.dtype == torch.float32
    assert rel_err(out, ref) < (1e-3 if mode == "int8" else 1e-2)  # ~13 bits / bf16's 8 bits
    # the quantized layer approximates the float one: int8 closely, int4 roughly
    assert rel_err(ref, linear(x)) < (0.02 if mode == "int8" else 0.2)


def test_fbgemm_int8_product_is_exact_on_integer_digits(seed):
    """Rows whose largest entry is 63 and whose entries are integers are one digit each: fbgemm
    must then return the exact integer product times the scales (its quantization of the
    digits, pinned by the sentinel row, changes nothing); any row is within 2^-12 of its own
    largest entry's contribution and does not depend on the rest of the batch."""
    q, scale = quantize_int8(torch.randn(40, 96))
    handle = fbgemm_pack(q, scale)
    x = torch.randint(-63, 64, (7, 96)).float()
    x[:, 0] = 63  # each row's absmax
    exact = (x.double() @ q.double().T) * scale.double()
    out = fbgemm_int8_mm(x, handle, 40)
    assert (out.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    assert torch.equal(fbgemm_unpack(handle), q)
    y = torch.randn(5, 96) * torch.logspace(-3, 3, 5)[:, None]  # rows of very different sizes
    ref = (y.double() @ q.double().T) * scale.double()
    batched = fbgemm_int8_mm(y, handle, 40)
    for i in range(5):  # each row alone gives the same numbers, relative to its own size
        assert torch.equal(fbgemm_int8_mm(y[i : i + 1], handle, 40), batched[i : i + 1])
        bound = 2**-12 * (y[i].abs().max() * q.double().abs().sum(1) * scale.double()).max()
        assert (batched[i].double() - ref[i]).abs().max() <= bound


def test_fbgemm_layer_keeps_one_copy_and_round_trips(seed):
    """After a CPU forward the int8 weight lives in fbgemm's packing only; the state dict, a deep
    copy and weight_bytes still see the canonical int8 matrix; loading a state dict repacks."""
    import copy

    layer = QuantLinear.from_linear(torch.nn.Linear(64, 32, bias=False), "int8")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 64)
    y = layer(x)
    assert layer.cpu_layout and layer.weight.numel() == 0
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert weight_bytes(layer) == 32 * 64 + 32 * 4
    clone = copy.deepcopy(layer)
    assert not clone.cpu_layout and torch.equal(clone.weight, before["weight"])
    assert torch.equal(clone(x), y)
    layer.load_state_dict(before)
    assert torch.equal(layer(x), y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32), (4, 64), (4, 128)])
def test_triton_kernel_matches_reference(seed, dtype, bits, group):
    """In the interpreter (fp32 and fp16; bf16 dots are wrong there), odd M and N (masks)."""
    M, N, K = 3, 40, 256
    x = torch.randn(M, K, dtype=dtype)
    if bits == 8:
        w, s = quantize_int8(torch.randn(N, K))
        s = s.to(dtype)
    else:
        w, s = quantize_int4(torch.randn(N, K), group)
    out = quant_matmul(x, w, s, bits, group)
    ref = reference_quant_matmul(x, w, s, bits, group)
    assert out.dtype == dtype and out.shape == (M, N)
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3)


def test_triton_kernel_rejects_bad_inputs():
    x = torch.randn(2, 64)
    w, s = quantize_int4(torch.randn(32, 64), 32)
    with pytest.raises(ValueError, match="group size"):
        quant_matmul(x, w, s, 4, 48)
    with pytest.raises(ValueError, match=r"\(K / G, N, 2\)"):
        quant_matmul(x, w, s[:1], 4, 32)
    with pytest.raises(TypeError, match="int8"):
        quant_matmul(x, w, s, 8)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_logits_and_memory(seed, mode, tied):
    model = tiny_model(256, seed=seed, max_seq_len=64, tie_embeddings=tied)
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model(tokens)
        before = weight_bytes(model)
        quantize_model(model, mode, group_size=32)
        out = model(tokens)
    assert rel_err(out, ref) < (0.03 if mode == "int8" else 0.25)
    ratio = before / weight_bytes(model)
    # int8 ~ 4x; int4 with group 32 and the int8 embedding ~ 5x on this tiny shape; norms fp32
    assert ratio > (3.5 if mode == "int8" else (4.5 if tied else 5.0)), ratio


def test_state_dict_is_canonical_after_a_cpu_forward(seed):
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 32, bias=False), "int4", 32)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(torch.randn(3, 64))
    assert layer.cpu_layout  # repacked for ATen's op
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_checkpoint_round_trip(tmp_path, seed, mode):
    """inference.quantize writes packed weights that load back (model.load) into a model with
    the very logits of quantizing in memory; --quantize on the float run gives them too."""
    import json as _json

    from inference.quantize import main
    from job_config import JobConfig
    from model.checkpoint import save_checkpoint
    from model.load import load_model

    model = tiny_model(256, seed=seed, max_seq_len=64, tie_embeddings=True)
    save_checkpoint(tmp_path / "run", 3, model.state_dict(), {}, JobConfig(model=model.cfg).to_dict())
    main(["--run", str(tmp_path / "run"), "--mode", mode, "--group-size", "32",
          "--out-dir", str(tmp_path / "q"), "--out", str(tmp_path / "q.json")])  # fmt: skip
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        expected = quantize_model(model, mode, group_size=32)(tokens)
        loaded, _, ckpt = load_model(tmp_path / "q")
        on_the_fly, _, _ = load_model(tmp_path / "run", quantize=mode, group_size=32)
        assert ckpt.name == "step_000003"
        assert torch.equal(loaded(tokens), expected) and torch.equal(on_the_fly(tokens), expected)
    info = _json.loads((tmp_path / "q.json").read_text())
    assert info["mode"] == mode and info["float_weight_bytes"] / info["weight_bytes"] > 3
    with pytest.raises(ValueError, match="cannot be loaded as"):
        load_model(tmp_path / "q", quantize="int8" if mode == "int4" else "int4")


def test_clip_search_never_loses_to_the_full_range(seed):
    """The full range is one of the searched candidates, so the searched grid's error is never
    larger; on groups with an outlier, clipping it wins clearly."""
    from model.quant import int4_codes, int4_scale_zero, int4_scale_zero_searched

    groups = torch.randn(64, 8, 64)
    groups[..., 0] = 4 + 2 * torch.rand(64, 8)  # one outlier per group, 4 to 6 sigma

    def error(scale, zero):
        deq = (int4_codes(groups, scale[..., None], zero[..., None]) - 8) * scale[..., None] + zero[..., None]
        return ((deq - groups) ** 2).sum(-1)

    full, searched = error(*int4_scale_zero(groups)), error(*int4_scale_zero_searched(groups))
    assert (searched <= full * (1 + 1e-6)).all()
    ratio = (searched / full).median().item()
    print(f"median error ratio, searched / full range: {ratio:.3f}")
    assert ratio < 0.92  # ~0.86 here; 1.0 if the search did nothing


@pytest.mark.parametrize("act_order,clip", [(False, False), (True, False), (False, True), (True, True)])
def test_gptq_lowers_the_output_error_below_round_to_nearest(seed, act_order, clip):
    """GPTQ minimizes ||(W - Q) X||^2 on its calibration inputs: on correlated inputs it must
    beat rounding each weight to its nearest level by a wide margin, in every variant."""
    from inference.gptq import gptq_int4

    N, K, G = 48, 128, 32
    w = torch.randn(N, K)
    x = torch.randn(1024, K) @ (torch.eye(K) + 0.3 * torch.randn(K, K))  # correlated inputs
    packed, sz = gptq_int4(w, x.double().T @ x.double(), G, act_order=act_order, clip=clip)
    gptq = QuantLinear.from_packed(packed, sz, "int4", G).dequantize()
    linear = torch.nn.Linear(K, N, bias=False)
    linear.weight.data = w
    rtn = QuantLinear.from_linear(linear, "int4", G).dequantize()
    error = lambda q: ((x @ (q - w).T) ** 2).sum().item()  # noqa: E731
    print(f"output error: GPTQ {error(gptq):.4g}, round to nearest {error(rtn):.4g}")
    assert error(gptq) < 0.7 * error(rtn)


def test_gptq_checkpoint_beats_round_to_nearest_on_held_out_data(tmp_path, seed, tiny_data):
    """inference.quantize --gptq --clip writes an int4 checkpoint (calibrated on the run's train
    split) that loads back as int4 and whose logits on validation tokens are nearer the float
    model's than round to nearest's are."""
    import json as _json

    import numpy as np

    from data.loader import TokenStream, make_batch
    from data.manifest import load_manifest
    from inference.quantize import main
    from job_config import DataConfig, JobConfig, TrainConfig
    from model.checkpoint import save_checkpoint
    from model.load import load_model

    model = tiny_model(512, seed=seed, max_seq_len=64, dim=64, multiple_of=32, init_std=0.1)
    cfg = JobConfig(model=model.cfg, data=DataConfig(path=str(tiny_data)), train=TrainConfig(seq_len=64))
    save_checkpoint(tmp_path / "run", 1, model.state_dict(), {}, cfg.to_dict())
    main(["--run", str(tmp_path / "run"), "--mode", "int4", "--group-size", "32", "--gptq", "--clip",
          "--calibration", "16", "--out-dir", str(tmp_path / "gptq")])  # fmt: skip
    stream = TokenStream(tiny_data, "val", load_manifest(tiny_data))
    tokens = make_batch(stream, np.arange(4), 64).inputs
    with torch.no_grad():
        ref = model(tokens)
        gptq, _, ckpt = load_model(tmp_path / "gptq")
        rtn, _, _ = load_model(tmp_path / "run", quantize="int4", group_size=32)
        err_gptq, err_rtn = ((gptq(tokens) - ref) ** 2).mean(), ((rtn(tokens) - ref) ** 2).mean()
    print(f"logit mse vs float: GPTQ {err_gptq:.3g}, round to nearest {err_rtn:.3g}")
    assert isinstance(gptq.blocks[0].attn.wq, QuantLinear) and gptq.blocks[0].attn.wq.mode == "int4"
    # GPTQ / RTN was 0.63-0.91 over 9 seeds (random weights, 16 calibration batches; 0.91 at
    # seed 1504501144, which failed the bound of 0.9 this had); 1.0 is no gain at all
    assert err_gptq < 0.95 * err_rtn
    info = _json.loads((ckpt / "quantization.json").read_text())
    assert info["gptq"] == {"calibration": 16, "data": None, "act_order": False, "clip": True}
