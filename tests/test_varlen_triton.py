"""The Triton varlen kernels (IS_VARLEN) against the float64 oracle (tests/varlen_oracle.py):
outputs, lse and dq/dk/dv; their ops (opcheck, torch.compile), dispatch and paths.

On a CPU-only machine they run under the Triton interpreter (conftest.py), fp32/fp16 only (the
interpreter computes bf16 tl.dot wrongly; bf16 runs on a GPU). The interpreter's tiles are
BLOCK_M=32, BLOCK_N=16 in the forward and dQ and 16 x 32 in dK/dV, so the lengths below put
sequence ends inside tiles, on tile edges, and a long sequence (97) over several tiles next to
empty and one-token ones.
"""

import pytest
import torch
from oracle import DEVICE, INTERPRETED, random_tensors, rounding_floor
from varlen_oracle import (
    check_one_graph_for_all_totals,
    check_varlen_against_float64,
    cu_seqlens,
    random_varlen,
    varlen_oracle,
)

import fastgpt
from fastgpt.varlen import attention_varlen_with_lse

pytest.importorskip("triton")
if DEVICE.type != "cuda" and not INTERPRETED:
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from fastgpt.kernels import attention as ka  # noqa: E402

# (query lengths, key lengths) per sequence: empty sequences (0 queries, 0 keys, both), one
# token, 17 and 97 (no multiple of a tile), Tq > Tk (causal rows that see no key) and Tq < Tk.
MIX = ([0, 1, 17, 97, 6, 0, 3], [5, 1, 30, 97, 0, 0, 1])
SMALL = ([3, 0, 17, 5, 1], [9, 4, 17, 2, 0])  # the same kinds of sequence, cheaper


def triton_varlen(lens_q, lens_k, causal, scale=None):
    """fn(q, k, v): fastgpt.attention_varlen on the Triton backend for these lengths."""
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    max_q, max_k = max(lens_q), max(lens_k)

    def fn(q, k, v):
        return fastgpt.attention_varlen(
            q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, scale=scale, backend="triton"
        )

    return fn


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_matches_float64_oracle(causal):
    """GQA (2 query heads per KV head) over MIX."""
    lens_q, lens_k = MIX
    q, k, v, grad_out = random_varlen(lens_q, lens_k, 2, 1, 16, seed=int(causal))
    fn = triton_varlen(lens_q, lens_k, causal)
    check_varlen_against_float64(fn, [q, k, v], grad_out, lens_q, lens_k, causal, what="mix")


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float16,
        pytest.param(
            torch.bfloat16,
            marks=pytest.mark.skipif(
                INTERPRETED, reason="the interpreter computes bf16 tl.dot wrongly"
            ),
        ),
    ],
    ids=str,
)
def test_dtypes_mqa_padded_head_dim(dtype):
    """MQA (one KV head for 4 query heads), head dim 40 (padded to 64), scale 0.2, causal."""
    lens_q, lens_k = SMALL
    q, k, v, grad_out = random_varlen(lens_q, lens_k, 4, 1, 40, dtype, seed=3)
    fn = triton_varlen(lens_q, lens_k, True, scale=0.2)
    check_varlen_against_float64(fn, [q, k, v], grad_out, lens_q, lens_k, True, scale=0.2)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_lse_matches_float64_oracle(causal):
    """lse (H, total_q) fp32 within 2x plain PyTorch's error, +inf exactly where a query sees no
    key (causal Tq > Tk rows, sequences without keys); their outputs are 0."""
    lens_q, lens_k = SMALL
    q, k, v, _ = random_varlen(lens_q, lens_k, 4, 2, 16, seed=5)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    out, lse = attention_varlen_with_lse(
        q, k, v, cu_q, cu_k, 17, 17, causal=causal, backend="triton"
    )
    _, exact = varlen_oracle(*(t.double() for t in (q, k, v)), lens_q, lens_k, causal)
    _, plain = varlen_oracle(q, k, v, lens_q, lens_k, causal)
    assert lse.shape == (4, sum(lens_q)) and lse.dtype == torch.float32
    blind = torch.isinf(exact)
    assert blind.any() and torch.equal(torch.isinf(lse), blind) and (lse[blind] > 0).all()
    assert (out.transpose(0, 1)[blind] == 0).all()
    err = (lse[~blind].double() - exact[~blind]).abs().max().item()
    bound = 2 * (plain[~blind].double() - exact[~blind]).abs().max().item()
    assert err <= bound + rounding_floor(exact[~blind], torch.float32), (err, bound)


def test_strided_views_of_one_projection():
    """q, k, v as strided views of one packed projection (total, H + 2 Hkv, D), head dim
    contiguous, no copies; gradients land in the projection."""
    lens = [9, 1, 20, 0]
    H, Hkv, D = 4, 2, 16
    total = sum(lens)
    qkv, grad_out = random_tensors((total, H + 2 * Hkv, D), (total, H, D), seed=11)

    def views(qkv):  # (total, H + 2 Hkv, D) -> q (total, H, D), k, v (total, Hkv, D)
        return qkv[:, :H], qkv[:, H : H + Hkv], qkv[:, H + Hkv :]

    assert not views(qkv)[1].is_contiguous()
    fn = triton_varlen(lens, lens, True)
    check_varlen_against_float64(fn, [qkv], grad_out, lens, lens, True, views=views)


def test_equal_lengths_equal_the_dense_kernels_bit_for_bit():
    """B equal-length sequences packed run the dense kernels' tiles: out, lse, dq, dk, dv are the
    dense Triton functions' results bit for bit (causal, GQA, a ragged last tile)."""
    B, H, Hkv, T, D = 2, 4, 2, 21, 16
    q, k, v, grad_out = random_varlen([T] * B, [T] * B, H, Hkv, D, seed=2)
    cu = cu_seqlens([T] * B)
    dense = [t.unflatten(0, (B, T)).transpose(1, 2) for t in (q, k, v, grad_out)]  # (B, h, T, D)

    def packed(t):  # (B, h, T, D) -> (B T, h, D)
        return t.transpose(1, 2).flatten(0, 1)

    out, lse = ka.attention_varlen_forward(q, k, v, cu, cu, T, T, True, 0.3)
    d_out, d_lse = ka.attention_forward(*dense[:3], True, 0.3)
    assert torch.equal(out, packed(d_out)) and torch.equal(lse, d_lse.transpose(0, 1).flatten(1))
    grads = ka.attention_varlen_backward(grad_out, q, k, v, out, lse, cu, cu, T, T, True, 0.3)
    d_grads = ka.attention_backward(dense[3], *dense[:3], d_out, d_lse, True, 0.3)
    for got, want in zip(grads, d_grads, strict=True):
        assert torch.equal(got, packed(want))


def test_descriptor_path_and_dkdv_split():
    """The tensor-descriptor path (sm_90's, forced here) gives the pointer path's forward bit for
    bit, and its backward with the GQA group split over 2 dK/dV programs (fp32 partials summed
    in a fixed order) meets the float64 rule."""
    lens_q, lens_k = SMALL
    q, k, v, grad_out = random_varlen(lens_q, lens_k, 4, 2, 16, seed=7)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    lengths = (cu_q, cu_k, 17, 17, True, 0.25)
    out, lse = ka.attention_varlen_forward(q, k, v, *lengths, use_tma=True)
    out_ptr, lse_ptr = ka.attention_varlen_forward(q, k, v, *lengths, use_tma=False)
    assert torch.equal(out, out_ptr) and torch.equal(lse, lse_ptr)

    class Split(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):  # (total_q, H, D), (total_k, Hkv, D) x2 -> (total_q, H, D)
            out, lse = ka.attention_varlen_forward(q, k, v, *lengths, use_tma=True)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            args = (grad, *ctx.saved_tensors, *lengths)
            return ka.attention_varlen_backward(*args, dkdv_split=2, use_tma=True)

    check_varlen_against_float64(Split.apply, [q, k, v], grad_out, lens_q, lens_k, True, scale=0.25)


def test_backward_is_deterministic():
    lens_q, lens_k = SMALL
    q, k, v, grad_out = random_varlen(lens_q, lens_k, 4, 1, 16, seed=8)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    lengths = (cu_q, cu_k, 17, 17, True, 0.25)
    out, lse = ka.attention_varlen_forward(q, k, v, *lengths)
    first = ka.attention_varlen_backward(grad_out, q, k, v, out, lse, *lengths)
    again = ka.attention_varlen_backward(grad_out, q, k, v, out, lse, *lengths)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_empty_batches():
    """No tokens at all, no sequences, and queries without any key (total_k = 0)."""
    for lens_q, lens_k in (([0, 0], [0, 0]), ([], []), ([2, 3], [0, 0])):
        q, k, v, _ = random_varlen(lens_q, lens_k, 2, 1, 16, requires_grad=True)
        cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
        max_q, max_k = max(lens_q, default=0), max(lens_k, default=0)
        out, lse = attention_varlen_with_lse(q, k, v, cu_q, cu_k, max_q, max_k, backend="triton")
        assert out.shape == q.shape and lse.shape == (2, q.shape[0])
        assert (out == 0).all() and (lse == float("inf")).all()
        out.sum().backward()
        assert q.grad.shape == q.shape and (q.grad == 0).all()


# --- dispatch and torch.library ops -------------------------------------------------------------


def test_triton_backend_runs_its_varlen_ops(debug_log, monkeypatch):
    """backend="triton" and an automatic pick of it (FASTGPT_BACKEND) run the Triton varlen ops:
    the debug log says so and the profiler shows them."""
    lens_q, lens_k = SMALL
    q, k, v, _ = random_varlen(lens_q, lens_k, 2, 1, 16, requires_grad=True)
    args = (q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), 17, 17)
    with torch.profiler.profile() as prof:
        fastgpt.attention_varlen(*args, backend="triton").sum().backward()
    names = {event.key for event in prof.key_averages()}
    assert "fastgpt::triton_attention_varlen_forward" in names
    assert "fastgpt::triton_attention_varlen_backward" in names
    monkeypatch.setenv("FASTGPT_BACKEND", "triton")
    fastgpt.attention_varlen(*args)
    lines = [m for m in debug_log() if m.startswith("attention_varlen")]
    assert "-> triton (requested)" in lines[0] and "-> triton (FASTGPT_BACKEND)" in lines[1]


def test_opcheck():
    forward = torch.ops.fastgpt.triton_attention_varlen_forward
    backward = torch.ops.fastgpt.triton_attention_varlen_backward
    lens_q, lens_k = [3, 0, 5], [2, 4, 5]
    q, k, v, grad_out = random_varlen(lens_q, lens_k, 1, 1, 16, requires_grad=True)
    args = (q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), 5, 5, True, 0.25)
    torch.library.opcheck(forward, args)
    out, lse = forward(*args)
    detached = [t.detach() for t in (q, k, v, out)]
    torch.library.opcheck(backward, (grad_out.detach(), *detached, lse, *args[3:]))


@pytest.mark.slow
def test_compiles_fullgraph_with_dynamic_totals():
    """torch.compile(fullgraph=True) over the Triton varlen op: a second mix of lengths with other
    totals reuses the graph; outputs and gradients equal eager bit for bit."""

    def fn(q, k, v, cu_q, cu_k):  # q: (total_q, H, D); k, v: (total_k, Hkv, D)
        out = fastgpt.attention_varlen(
            q, k, v, cu_q, cu_k, 32, 32, causal=True, scale=0.3, backend="triton"
        )
        return out * 2  # (total_q, H, D)

    check_one_graph_for_all_totals(fn, 2, 1, 16)
