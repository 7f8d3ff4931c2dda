"""The C++ extension's packed variable-length ops (fastgpt::cpp_attention_varlen_*) against the
float64 oracle (tests/varlen_oracle.py): outputs, lse, dq/dk/dv through fastgpt.attention_varlen
with backend="cpp", and the ops called directly (opcheck, gradcheck, errors, memory).

Head dims: 64 takes the kernel's register-tile path (whole 16-float panels), 24 its BLAS path.
Lengths cross the CPU tiles (64 query rows, 256 keys): 257 keys span two key blocks, 97 queries
two query blocks; 0 and 1 are the edge cases.
"""

import re

import pytest
import torch
from oracle import random_tensors
from varlen_oracle import (
    check_varlen_against_float64,
    cu_seqlens,
    random_varlen,
    varlen_oracle,
)

import fastgpt
from fastgpt import _extension

pytestmark = pytest.mark.skipif(
    not _extension.cpp_available(), reason=f"fastgpt._C not built ({_extension.load_error})"
)

forward_op = torch.ops.fastgpt.cpp_attention_varlen_forward
backward_op = torch.ops.fastgpt.cpp_attention_varlen_backward

# (query lengths, key lengths) per sequence
MIXES = {
    "brief": ([0, 1, 17, 97, 257], [0, 1, 17, 97, 257]),
    "tq!=tk": ([97, 0, 17, 257, 1, 40], [257, 5, 3, 97, 0, 40]),
}
HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA
# The CPU kernel everywhere; the CUDA one where a GPU and a CUDA build of the extension exist.
DEVICES = ["cpu"] + (
    ["cuda"] if torch.cuda.is_available() and _extension.cpp_supports("cuda") else []
)


def cpp_call(lens_q, lens_k, causal, scale=None, device="cpu"):
    """fn(q, k, v) running fastgpt.attention_varlen on the cpp backend."""
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    max_q, max_k = max(lens_q), max(lens_k)

    def fn(q, k, v):
        return fastgpt.attention_varlen(
            q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, scale=scale, backend="cpp"
        )

    return fn


def draw(lens_q, lens_k, heads, kv_heads, D, dtype=torch.float32, seed=0, device="cpu"):
    return random_varlen(lens_q, lens_k, heads, kv_heads, D, dtype, seed=seed, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("heads,kv_heads", HEADS, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("D", [64, 24])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_float32_matches_float64_oracle(device, mix, heads, kv_heads, D, causal):
    lens_q, lens_k = MIXES[mix]
    q, k, v, grad_out = draw(lens_q, lens_k, heads, kv_heads, D, device=device)
    fn = cpp_call(lens_q, lens_k, causal, device=device)
    check_varlen_against_float64(fn, [q, k, v], grad_out, lens_q, lens_k, causal, what=mix)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [64, 24])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_half_precisions_match_float64_oracle(device, dtype, D, causal):
    lens_q, lens_k = MIXES["tq!=tk"]
    q, k, v, grad_out = draw(lens_q, lens_k, 4, 2, D, dtype, seed=1, device=device)
    fn = cpp_call(lens_q, lens_k, causal, scale=0.2, device=device)
    check_varlen_against_float64(fn, [q, k, v], grad_out, lens_q, lens_k, causal, scale=0.2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("D", [64, 24])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_float64_output_lse_and_grads_equal_oracle(device, mix, D, causal):
    """In float64 the op and the oracle agree to rounding: out, lse (+inf exactly where a
    causal query sees no key), dq, dk, dv."""
    lens_q, lens_k = MIXES[mix]
    q, k, v, grad_out = draw(lens_q, lens_k, 6, 2, D, torch.float64, seed=2, device=device)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    args = (cu_q, cu_k, max(lens_q), max(lens_k), causal, 0.3)
    out, lse = forward_op(q, k, v, *args)
    grads = backward_op(grad_out, q, k, v, out, lse, *args)[:3]  # then dsinks: empty
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want_out, want_lse = varlen_oracle(*leaves, lens_q, lens_k, causal, 0.3)
    want_grads = torch.autograd.grad(want_out, leaves, grad_out)
    assert lse.shape == (6, sum(lens_q)) and lse.dtype == torch.float64
    torch.testing.assert_close(lse, want_lse.detach(), atol=1e-12, rtol=1e-12)
    for name, got, want in zip(
        ["out", "dq", "dk", "dv"], [out, *grads], [want_out, *want_grads], strict=True
    ):
        assert got.is_contiguous() and got.dtype == torch.float64, name
        torch.testing.assert_close(
            got, want, atol=1e-12, rtol=1e-12, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_rows_without_keys_give_zero_and_infinite_lse():
    """Causal Tq > Tk leaves queries without keys, and a sequence with queries but no keys: out 0,
    lse +inf, finite gradients (float32, lse float32)."""
    lens_q, lens_k = [70, 3, 5], [2, 0, 5]
    q, k, v, grad_out = draw(lens_q, lens_k, 2, 1, 16)
    cu_q, cu_k = cu_seqlens(lens_q, "cpu"), cu_seqlens(lens_k, "cpu")
    args = (cu_q, cu_k, 70, 5, True, 0.25)
    out, lse = forward_op(q, k, v, *args)
    blind = torch.zeros(78, dtype=torch.bool)
    blind[:68] = True  # sequence 0: query i sees keys j <= i - 68
    blind[70:73] = True  # sequence 1: no keys at all
    assert lse.dtype == torch.float32 and torch.isposinf(lse[:, blind]).all()
    assert torch.isfinite(lse[:, ~blind]).all() and (out[blind] == 0).all()
    dq, dk, dv, _ = backward_op(grad_out, q, k, v, out, lse, *args)
    assert (dq[blind] == 0).all() and all(torch.isfinite(g).all() for g in (dq, dk, dv))


def test_packed_equal_lengths_are_the_dense_op_bit_for_bit():
    """One kernel: B equal sequences packed give the dense op's numbers exactly, both passes."""
    B, H, Hkv, Tq, Tk, D = 3, 4, 2, 100, 300, 32
    q, k, v, grad_out = draw([Tq] * B, [Tk] * B, H, Hkv, D, seed=4)
    args = (cu_seqlens([Tq] * B, "cpu"), cu_seqlens([Tk] * B, "cpu"), Tq, Tk, True, 0.2)
    out, lse = forward_op(q, k, v, *args)
    grads = backward_op(grad_out, q, k, v, out, lse, *args)
    dense = [t.unflatten(0, (B, -1)).transpose(1, 2) for t in (q, k, v, grad_out)]  # (B, H, T, D)
    d_out, d_lse = torch.ops.fastgpt.cpp_attention_forward(*dense[:3], True, 0.2)
    d_grads = torch.ops.fastgpt.cpp_attention_backward(
        dense[3], *dense[:3], d_out, d_lse, True, 0.2
    )
    packed = lambda t: t.transpose(1, 2).flatten(0, 1)  # (B, H, T, D) -> (B T, H, D)
    assert torch.equal(out, packed(d_out)) and torch.equal(lse, d_lse.transpose(0, 1).flatten(1))
    for got, want in zip(grads[:3], d_grads[:3], strict=True):  # then both dsinks: empty
        assert torch.equal(got, packed(want))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "lens,kv_heads",
    [([600, 3, 40], 1), ([130, 140, 120, 150], 2)],
    ids=["one long MQA sequence (two-pass backward)", "even mix (fused backward)"],
)
def test_both_backward_schedules_and_thread_counts(lens, kv_heads, threads):
    """With 2 threads one long MQA sequence cannot be spread as (sequence, kv head) tasks: the
    two-pass backward runs; an even mix runs fused. Both against the oracle, and the same bits
    with 1 and 2 threads."""
    q, k, v, grad_out = draw(lens, lens, 2, kv_heads, 16, torch.float64, seed=5)
    args = (cu_seqlens(lens, "cpu"), cu_seqlens(lens, "cpu"), max(lens), max(lens), True, 0.25)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (threads, 3 - threads):
            torch.set_num_threads(n)
            out, lse = forward_op(q, k, v, *args)
            results.append([out, *backward_op(grad_out, q, k, v, out, lse, *args)[:3]])
    finally:
        torch.set_num_threads(before)
    for got, want in zip(results[0], results[1], strict=True):
        assert torch.equal(got, want)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want_out = varlen_oracle(*leaves, lens, lens, True, 0.25)[0]
    wants = [want_out, *torch.autograd.grad(want_out, leaves, grad_out)]
    for got, want in zip(results[0], wants, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_strided_views_of_one_projection_and_expanded_grad():
    """q, k, v cut from one (total, (H + 2 Hkv) D) projection (head dim contiguous), and
    out.sum().backward()'s grad_out with all strides 0: the results of contiguous copies."""
    lens, H, Hkv, D = [9, 0, 70, 1], 4, 2, 16
    (qkv,) = random_tensors((80, H + 2 * Hkv, D), dtype=torch.float64, device="cpu", seed=6)
    q, k, v = qkv[:, :H], qkv[:, H : H + Hkv], qkv[:, H + Hkv :]
    assert not q.is_contiguous() and q.stride(-1) == 1
    args = (cu_seqlens(lens, "cpu"), cu_seqlens(lens, "cpu"), 70, 70, True, 0.3)
    out, lse = forward_op(q, k, v, *args)
    contiguous = [t.contiguous() for t in (q, k, v)]
    want_out, want_lse = forward_op(*contiguous, *args)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    grad_out = torch.ones(1, dtype=q.dtype).expand_as(out)  # strides (0, 0, 0)
    grads = backward_op(grad_out, q, k, v, out, lse, *args)[:3]
    want_grads = backward_op(grad_out.contiguous(), *contiguous, out, lse, *args)[:3]
    for got, want in zip(grads, want_grads, strict=True):
        assert torch.equal(got, want)
    # and through the API, gradients landing in the projection, against the oracle
    (grad,) = random_tensors((80, H, D), device="cpu", seed=7)
    check_varlen_against_float64(
        cpp_call(lens, lens, True),
        [qkv.float()],
        grad,
        lens,
        lens,
        True,
        views=lambda p: (p[:, :H], p[:, H : H + Hkv], p[:, H + Hkv :]),
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_opcheck(causal):
    lens_q, lens_k = [0, 6, 11, 1, 4], [3, 0, 2, 13, 4]
    q, k, v, grad_out = draw(lens_q, lens_k, 4, 2, 16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    args = (q, k, v, cu_seqlens(lens_q, "cpu"), cu_seqlens(lens_k, "cpu"), 11, 13, causal, 0.25)
    torch.library.opcheck(forward_op, args)
    out, lse = forward_op(*args)
    detached = [t.detach() for t in (q, k, v, out)]
    torch.library.opcheck(backward_op, (grad_out, *detached, lse, *args[3:]))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gradcheck_float64(causal):
    lens_q, lens_k = [3, 0, 5, 2], [4, 2, 5, 0]
    q, k, v, _ = draw(lens_q, lens_k, 2, 1, 4, torch.float64, seed=8)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(cpp_call(lens_q, lens_k, causal, scale=0.7), leaves)


def bad_call(**change):
    lens_q, lens_k = [5, 3], [2, 6]
    q, k, v, _ = draw(lens_q, lens_k, 4, 2, 8)
    inputs = dict(q=q, k=k, v=v, cu_q=cu_seqlens(lens_q, "cpu"), cu_k=cu_seqlens(lens_k, "cpu"))
    inputs.update(change)
    return forward_op(*inputs.values(), 5, 6, True, 1.0)


BAD_INPUTS = {  # a direct op call: the same one-sentence errors, never a crash
    "cu decreasing": (dict(cu_k=torch.tensor([0, 6, 2], dtype=torch.int32)), "without decreasing"),
    "cu total": (dict(cu_q=torch.tensor([0, 5, 7], dtype=torch.int32)), "packed length 8"),
    "cu int64": (dict(cu_q=torch.tensor([0, 5, 8])), "int32 cu_seqlens"),
    "cu sizes": (dict(cu_k=torch.tensor([0, 8], dtype=torch.int32)), "of one size"),
    "rank": (dict(q=torch.randn(1, 8, 4, 8)), "3-d q (total_q, H, D)"),
    "heads": (dict(q=torch.randn(8, 3, 8)), "multiple of the key-value heads"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_one_sentence(case):
    change, words = BAD_INPUTS[case]
    with pytest.raises((ValueError, TypeError), match=re.escape(words)) as raised:
        bad_call(**change)
    assert str(raised.value).rstrip().endswith(".")


def test_bad_lse_raises():
    lens = [4, 4]
    q, k, v, _ = draw(lens, lens, 2, 2, 8)
    args = (cu_seqlens(lens, "cpu"), cu_seqlens(lens, "cpu"), 4, 4, True, 1.0)
    out, lse = forward_op(q, k, v, *args)
    with pytest.raises(ValueError, match=re.escape("lse of shape (H, total_q)")):
        backward_op(q, q, k, v, out, lse[None], *args)
    with pytest.raises(TypeError, match="lse in Float"):
        backward_op(q, q, k, v, out, lse.double(), *args)


def test_memory_grows_linearly_with_tokens():
    """fp32 forward + backward over 4 sequences of 2048 tokens: no allocation of the ops' children
    is (T, T) per sequence (16 MiB), nor more than the (total, D) tensors' size."""
    lens, D = [2048] * 4, 64
    q, k, v, _ = draw(lens, lens, 1, 1, D)
    args = (cu_seqlens(lens, "cpu"), cu_seqlens(lens, "cpu"), 2048, 2048, True, D**-0.5)
    with torch.profiler.profile(profile_memory=True) as prof:
        out, lse = forward_op(q, k, v, *args)
        backward_op(out, q, k, v, out, lse, *args)
    children = [e for e in prof.events() if not e.name.startswith("fastgpt::")]
    allocations = [e.cpu_memory_usage for e in children if e.cpu_memory_usage > 0]
    tensor_bytes = sum(lens) * D * 4
    assert allocations and max(allocations) <= tensor_bytes, f"largest: {max(allocations)} bytes"
    assert sum(allocations) <= 8 * tensor_bytes, f"{sum(allocations) / 2**20:.1f} MiB allocated"


def test_automatic_pick_on_cpu_is_cpp(debug_log):
    lens = [3, 5]
    q, k, v, _ = draw(lens, lens, 2, 2, 8)
    cu = cu_seqlens(lens, "cpu")
    got = fastgpt.attention_varlen(q, k, v, cu, cu, 5, 5)
    want = fastgpt.attention_varlen(q, k, v, cu, cu, 5, 5, backend="cpp")
    assert torch.equal(got, want)
    lines = [m for m in debug_log() if m.startswith("attention_varlen")]
    assert lines[0].endswith("-> cpp (auto: the C++ extension has cpu kernels)")
