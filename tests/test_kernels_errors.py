"""Bad inputs to the kernels raise clear errors (naming the argument and what was expected)
instead of computing garbage."""

import pytest
import torch

from kernels.attention import attention
from kernels.cross_entropy import fused_linear_cross_entropy
from kernels.rmsnorm import rms_norm
from kernels.rope import apply_rope
from kernels.swiglu import swiglu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def test_attention_bad_inputs():
    q, k = r(1, 4, 8, 16), r(1, 2, 8, 16)
    with pytest.raises(TypeError, match="q must have dtype"):
        attention(q.double(), k.double(), k.double())
    with pytest.raises(TypeError, match="k has dtype"):
        attention(q, k.half(), k.half())
    with pytest.raises(ValueError, match="head dim 48 is not supported"):
        attention(r(1, 4, 8, 48), r(1, 2, 8, 48), r(1, 2, 8, 48))
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        attention(r(1, 4, 8, 16), r(1, 3, 8, 16), r(1, 3, 8, 16))
    with pytest.raises(ValueError, match="do not match q"):
        attention(q, r(1, 2, 9, 16), r(1, 2, 9, 16))
    with pytest.raises(ValueError, match="k .* and v .* must match"):
        attention(q, k, r(1, 1, 8, 16))
    with pytest.raises(ValueError, match="must be 4-D"):
        attention(r(4, 8, 16), k, k)
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        attention(r(1, 4, 16, 8).transpose(2, 3), k, k)
    with pytest.raises(ValueError, match=r"doc_ids has shape \(1, 7\)"):
        attention(q, k, k, doc_ids=torch.zeros(1, 7, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="doc_ids must be an integer"):
        attention(q, k, k, doc_ids=torch.zeros(1, 8, device=DEVICE))
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        attention(q, k, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-only checks")
def test_interpreter_limits(monkeypatch):
    q, k = r(1, 2, 8, 16), r(1, 2, 8, 16)
    with pytest.raises(TypeError, match="bfloat16 matmuls are wrong"):
        attention(q.bfloat16(), k.bfloat16(), k.bfloat16())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors without the interpreter
    with pytest.raises(ValueError, match="need CUDA tensors"):
        swiglu(q, k)


def test_rms_norm_bad_inputs():
    with pytest.raises(ValueError, match="must equal weight's length"):
        rms_norm(r(3, 8), r(16), 1e-5)
    with pytest.raises(TypeError, match="x must have dtype"):
        rms_norm(torch.ones(3, 8, dtype=torch.long, device=DEVICE), r(8), 1e-5)
    with pytest.raises(ValueError, match="weight must be 1-D"):
        rms_norm(r(3, 8), r(8, 1), 1e-5)
    with pytest.raises(ValueError, match="eps must be a non-negative"):
        rms_norm(r(3, 8), r(8), -1.0)


def test_rope_bad_inputs():
    x, cos = r(1, 2, 8, 16), r(8, 16)
    with pytest.raises(ValueError, match=r"cos has shape \(9, 16\), expected \(T, D\)"):
        apply_rope(x, r(9, 16), r(9, 16))
    with pytest.raises(ValueError, match="x must be 4-D"):
        apply_rope(r(2, 8, 16), cos, cos)
    with pytest.raises(ValueError, match="must be even"):
        apply_rope(r(1, 2, 8, 15), r(8, 15), r(8, 15))
    with pytest.raises(TypeError, match="sin must be a float"):
        apply_rope(x, cos, torch.ones(8, 16, dtype=torch.long, device=DEVICE))


def test_swiglu_bad_inputs():
    with pytest.raises(ValueError, match="gate .* and up .* differ"):
        swiglu(r(3, 8), r(3, 9))
    with pytest.raises(TypeError, match="gate is torch.float32 but up is torch.float16"):
        swiglu(r(3, 8), r(3, 8).half())


def test_cross_entropy_bad_inputs():
    h, w, t = r(6, 16), r(10, 16), torch.randint(0, 10, (6,), device=DEVICE)
    with pytest.raises(ValueError, match="expected \\(V, dim\\) with dim = 16"):
        fused_linear_cross_entropy(h, r(10, 8), t)
    with pytest.raises(ValueError, match="targets has 5 entries but hidden has 6 rows"):
        fused_linear_cross_entropy(h, w, t[:5])
    with pytest.raises(TypeError, match="targets must be an integer"):
        fused_linear_cross_entropy(h, w, t.float())
    with pytest.raises(ValueError, match=r"targets must be in \[0, 10\)"):
        fused_linear_cross_entropy(h, w, torch.full_like(t, 10))
    with pytest.raises(ValueError, match="hidden must be 2-D"):
        fused_linear_cross_entropy(r(2, 3, 16), w, t)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        fused_linear_cross_entropy(h, w, t, chunk_size=0)
