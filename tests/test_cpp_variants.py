"""The C++ CPU kernel's attention variants (window, softcap, sinks) at sizes that cross its tiles.

tests/test_variants.py runs every variant combination on cpp at small sizes (one tile); here the
lengths span several query blocks (64 rows) and key blocks (256 keys), so a window skips whole key
blocks and masks only the ones it crosses, in the fused backward (one task per (sequence, kv head)
spread evenly) and the split one (fewer tasks than threads), on the register-tile path (D a whole
number of panels) and the BLAS one (D = 12). float64 against the independent oracle of
tests/variant_oracle.py; opcheck of the extended ops.
"""

import pytest
import torch
from oracle import F64, random_tensors
from variant_oracle import oracle

import fastgpt
from fastgpt import _extension

pytestmark = pytest.mark.skipif(
    not _extension.cpp_available(), reason=f"fastgpt._C not built ({_extension.load_error})"
)

# (B, H, Hkv, Tq, Tk, D): B * Hkv = 4 tasks (fused backward on 2+ threads) or 1 (split), a BLAS D.
SHAPES = [(2, 4, 2, 300, 600, 16), (1, 2, 1, 600, 600, 16), (1, 2, 2, 333, 290, 12)]
VARIANTS = [  # causal, window, softcap, sinks
    (True, (100, 0), 0.0, False),
    (True, (300, 20), 1.5, True),
    (False, (50, 70), 0.0, True),
    (False, (-1, 10), 2.0, False),
    (True, (-1, -1), 1.0, True),
]


def draw(B, H, Hkv, Tq, Tk, D, sinks, dtype=torch.float64):
    q, k, v, do, s = random_tensors(
        (B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D), (B, H, Tq, D), (H,),
        dtype=dtype, device="cpu", seed=Tq + Tk,
    )  # fmt: skip
    return [t.requires_grad_() for t in (q, k, v)], do, s.requires_grad_() if sinks else None


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal,window,softcap,sinks", VARIANTS)
def test_cpp_variants_across_tiles_match_the_oracle(shape, causal, window, softcap, sinks):
    (q, k, v), do, s = draw(*shape, sinks)
    variants = dict(causal=causal, window=window, softcap=softcap, sinks=s)
    out, lse = fastgpt.attention(q, k, v, backend="cpp", return_lse=True, **variants)
    want_out, want_lse = oracle(q, k, v, causal, window, softcap, s)
    torch.testing.assert_close(out, want_out, **F64)
    torch.testing.assert_close(lse, want_lse.detach(), **F64)
    leaves = [t for t in (q, k, v, s) if t is not None]
    got = torch.autograd.grad(out, leaves, do)
    want = torch.autograd.grad(want_out, leaves, do)
    for name, g, w in zip(["dq", "dk", "dv", "dsinks"], got, want, strict=False):
        torch.testing.assert_close(g, w, **F64, msg=lambda m, n=name: f"{n}: {m}")


def test_cpp_float32_variants_across_tiles_are_close_to_the_oracle():
    """float32 (the kernel's exp_u20 and tanh) within the variant suite's float32 rule."""
    (q, k, v), do, s = draw(1, 4, 2, 300, 600, 64, True)
    args = dict(causal=True, window=(200, 0), softcap=5.0)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    s32 = s.detach().float().requires_grad_()
    out, lse = fastgpt.attention(q32, k32, v32, sinks=s32, backend="cpp", return_lse=True, **args)
    want_out, want_lse = oracle(q, k, v, sinks=s, **args)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(out, (q32, k32, v32, s32), do.float())
    want = torch.autograd.grad(want_out, (q, k, v, s), do)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_dense_ops_with_variants(dtype):
    (q, k, v), do, s = draw(2, 4, 2, 19, 23, 16, True, dtype)
    s = s.detach().float().requires_grad_()
    forward, backward = (
        torch.ops.fastgpt.cpp_attention_forward,
        torch.ops.fastgpt.cpp_attention_backward,
    )
    for variants in [dict(window=[3, 2], softcap=1.5, sinks=s), dict(window=[-1, 0]), {}]:
        torch.library.opcheck(forward, (q, k, v, True, 0.25), variants)
        out, lse = forward(q, k, v, True, 0.25, **variants)
        args = (do, q.detach(), k.detach(), v.detach(), out.detach(), lse, True, 0.25)
        detached = {n: x.detach() if n == "sinks" else x for n, x in variants.items()}
        torch.library.opcheck(backward, args, detached)


def test_opcheck_varlen_ops_with_variants():
    (q, k, v), do, s = draw(1, 4, 2, 20, 20, 16, True)
    packed = [t.detach()[0].transpose(0, 1).contiguous().requires_grad_() for t in (q, k, v)]
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    forward = torch.ops.fastgpt.cpp_attention_varlen_forward
    variants = dict(window=[2, 1], softcap=2.0, sinks=s)
    torch.library.opcheck(forward, (*packed, cu, cu, 13, 13, True, 0.25), variants)
    out, lse = forward(*packed, cu, cu, 13, 13, True, 0.25, **variants)
    grad_out = do.detach()[0].transpose(0, 1).contiguous()
    args = (grad_out, *(t.detach() for t in packed), out.detach(), lse, cu, cu, 13, 13, True, 0.25)
    variants["sinks"] = s.detach()  # the backward op itself is not differentiable
    torch.library.opcheck(torch.ops.fastgpt.cpp_attention_varlen_backward, args, variants)


def test_backward_returns_empty_dsinks_without_sinks_and_bad_variants_raise():
    (q, k, v), do, _ = draw(1, 2, 2, 5, 5, 8, False)
    out, lse = torch.ops.fastgpt.cpp_attention_forward(q, k, v, True, 0.5)
    *_, dsinks = torch.ops.fastgpt.cpp_attention_backward(do, q, k, v, out, lse, True, 0.5)
    assert dsinks.shape == (0,)
    with pytest.raises(ValueError, match="window"):
        torch.ops.fastgpt.cpp_attention_forward(q, k, v, True, 0.5, window=[1, 2, 3])
    with pytest.raises(ValueError, match="sinks of shape"):
        torch.ops.fastgpt.cpp_attention_forward(q, k, v, True, 0.5, sinks=torch.zeros(3))


@pytest.mark.parametrize("causal,window,softcap,sinks", VARIANTS)
def test_cpp_kvcache_variants_across_splits_match_the_oracle(causal, window, softcap, sinks):
    """Decode against long caches (several 256-key splits, 64-key runs): a window starts the
    splits at its first key; each sequence against the oracle on its own keys."""
    from fastgpt.kvcache import attention_with_kvcache

    lengths, Tq, H, Hkv, D = [700, 0, 301], 3, 4, 2, 16
    q, kc, vc = random_tensors(
        (3, Tq, H, D), (3, 720, Hkv, D), (3, 720, Hkv, D), dtype=torch.float64, device="cpu", seed=9
    )  # fmt: skip
    s = torch.randn(H, dtype=torch.float64) if sinks else None
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    out = attention_with_kvcache(
        q, kc, vc, cache_seqlens=seqlens, causal=causal, window=window, softcap=softcap, sinks=s,
        backend="cpp",
    )  # fmt: skip
    for b, n in enumerate(lengths):
        heads_first = [t.transpose(0, 1)[None] for t in (q[b], kc[b, :n], vc[b, :n])]
        want, _ = oracle(*heads_first, causal, window, softcap, s)  # (1, H, Tq, D)
        torch.testing.assert_close(out[b], want[0].transpose(0, 1), **F64)
