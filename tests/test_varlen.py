"""fastgpt.attention_varlen and its reference against the independent float64 oracle
(tests/varlen_oracle.py), outputs and dq/dk/dv; its input rules, dispatch and torch.library ops.

Length mixes (query lengths, key lengths per sequence) hit: empty sequences (0 queries, 0 keys,
both), one token, lengths that are no multiple of 16, Tq < Tk and Tq > Tk within one batch (rows
that see no key under causal), and one long sequence among short ones.
"""

import re

import pytest
import torch
from oracle import DEVICE, random_tensors
from varlen_oracle import (
    check_one_graph_for_all_totals,
    check_varlen_against_float64,
    cu_seqlens,
    random_varlen,
    varlen_oracle,
)

import fastgpt
from fastgpt import varlen
from fastgpt.model import GPT, GPTConfig
from fastgpt.reference import reference_attention_varlen
from fastgpt.varlen import VARLEN_BACKENDS, attention_varlen_with_lse, cu_seqlens_from_lengths

LENGTH_MIXES = {
    "equal": ([16, 16], [16, 16]),
    "ragged": ([5, 1, 17, 0, 33], [5, 1, 17, 0, 33]),
    "tq<tk": ([3, 1, 9], [7, 20, 9]),
    "tq>tk": ([7, 20, 9], [3, 1, 9]),
    "both ways, empties": ([0, 6, 11, 1, 4], [3, 0, 2, 13, 4]),
    "one long": ([2, 70, 1], [2, 70, 1]),
}
HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA
# The 2x-of-PyTorch rule; float64 is compared to the oracle directly (both exact to ~1e-15).
TOLERANCE_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def varlen_call(lens_q, lens_k, causal, scale=None, **kwargs):
    """fn(q, k, v) running fastgpt.attention_varlen on the packed lengths."""
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    max_q, max_k = max(lens_q, default=0), max(lens_k, default=0)

    def fn(q, k, v):
        return fastgpt.attention_varlen(
            q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, scale=scale, **kwargs
        )

    return fn


@pytest.mark.parametrize("mix", LENGTH_MIXES)
@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_matches_float64_oracle(mix, heads, kv_heads, causal):
    lens_q, lens_k = LENGTH_MIXES[mix]
    q, k, v, grad_out = random_varlen(lens_q, lens_k, heads, kv_heads, 24, torch.float32)
    fn = varlen_call(lens_q, lens_k, causal)
    check_varlen_against_float64(fn, [q, k, v], grad_out, lens_q, lens_k, causal, what=mix)


@pytest.mark.parametrize("dtype", TOLERANCE_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_dtypes(dtype, causal):
    lens_q, lens_k = LENGTH_MIXES["both ways, empties"]
    q, k, v, grad_out = random_varlen(lens_q, lens_k, 6, 2, 40, dtype, seed=3)
    fn = varlen_call(lens_q, lens_k, causal, scale=0.2)
    check_varlen_against_float64(fn, [q, k, v], grad_out, lens_q, lens_k, causal, scale=0.2)


@pytest.mark.parametrize("mix", ["both ways, empties", "ragged"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_float64_matches_oracle(mix, causal):
    """In float64 the API (its op and explicit backward) and the oracle agree to rounding."""
    lens_q, lens_k = LENGTH_MIXES[mix]
    q, k, v, grad_out = random_varlen(lens_q, lens_k, 6, 3, 16, torch.float64, seed=9)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    got = varlen_call(lens_q, lens_k, causal, scale=0.7)(*leaves)
    want = varlen_oracle(*leaves, lens_q, lens_k, causal, 0.7)[0]
    got_grads = torch.autograd.grad(got, leaves, grad_out)
    want_grads = torch.autograd.grad(want, leaves, grad_out)
    for name, a, b in zip(
        ["out", "dq", "dk", "dv"], [got, *got_grads], [want, *want_grads], strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def test_reference_function_matches_oracle_in_float64():
    """reference_attention_varlen itself (plain autograd, no op) and its lse, in float64."""
    lens_q, lens_k = LENGTH_MIXES["both ways, empties"]
    q, k, v, grad_out = random_varlen(lens_q, lens_k, 4, 2, 8, torch.float64, seed=5)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    for causal in (True, False):
        out, lse = reference_attention_varlen(q, k, v, cu_q, cu_k, causal, 0.5)
        want_out, want_lse = varlen_oracle(q, k, v, lens_q, lens_k, causal, 0.5)
        torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-12)
        assert lse.shape == (4, sum(lens_q)) and lse.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_lse_layout_and_rows_without_keys(dtype):
    """lse (H, total_q) in float32 (float64 for float64), +inf exactly where a causal query sees
    no key (Tq > Tk), where the output is 0 and the gradients finite."""
    lens_q, lens_k = [5, 2, 0], [2, 0, 3]  # sequence 0: 3 rows see nothing; sequence 1: both
    q, k, v, _ = random_varlen(lens_q, lens_k, 4, 2, 8, dtype, seed=7, requires_grad=True)
    out, lse = attention_varlen_with_lse(q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), 5, 3)
    assert lse.shape == (4, 7) and lse.dtype == (dtype if dtype == torch.float64 else torch.float32)
    assert not lse.requires_grad
    blind = torch.tensor([1, 1, 1, 0, 0, 1, 1], dtype=torch.bool)  # queries that see no key
    assert torch.isinf(lse[:, blind]).all() and (lse[:, blind] > 0).all()
    assert torch.isfinite(lse[:, ~blind]).all()
    assert (out[blind] == 0).all()
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    _, want_lse = varlen_oracle(*(t.detach().double() for t in (q, k, v)), lens_q, lens_k, True)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_equal_lengths_equal_dense_attention():
    """B equal-length sequences packed are the dense batch (B, H, T, D), causal or not."""
    B, H, Hkv, T, D = 3, 4, 2, 13, 16
    q, k, v, _ = random_varlen([T] * B, [T] * B, H, Hkv, D, torch.float64)
    cu = cu_seqlens([T] * B)
    for causal in (True, False):
        got = fastgpt.attention_varlen(q, k, v, cu, cu, T, T, causal=causal)  # (B T, H, D)
        dense = fastgpt.attention(
            *(t.unflatten(0, (B, T)).transpose(1, 2) for t in (q, k, v)), causal=causal
        )  # (B, H, T, D)
        torch.testing.assert_close(got, dense.transpose(1, 2).flatten(0, 1), atol=1e-12, rtol=0)


def test_strided_views_of_one_projection():
    """q, k, v cut from one packed projection (total, (H + 2 Hkv) D): strided views, head dim
    contiguous, no copies; gradients land in the projection."""
    lens = [9, 1, 20]
    H, Hkv, D = 4, 2, 8
    total = sum(lens)
    qkv, grad_out = random_tensors((total, H + 2 * Hkv, D), (total, H, D), seed=11)

    def views(qkv):  # (total, H + 2 Hkv, D) -> q (total, H, D), k, v (total, Hkv, D)
        return qkv[:, :H], qkv[:, H : H + Hkv], qkv[:, H + Hkv :]

    q, k, _ = views(qkv)
    assert not q.is_contiguous() and not k.is_contiguous() and q.stride(-1) == 1
    fn = varlen_call(lens, lens, True)
    check_varlen_against_float64(fn, [qkv], grad_out, lens, lens, True, views=views)


def test_empty_batches():
    """No tokens at all (every sequence empty), and no sequences (cu_seqlens = [0])."""
    for lens in ([0, 0], []):
        q, k, v, _ = random_varlen(lens, lens, 2, 1, 8, requires_grad=True)
        cu = cu_seqlens(lens)
        out, lse = attention_varlen_with_lse(q, k, v, cu, cu, 0, 0)
        assert out.shape == (0, 2, 8) and lse.shape == (2, 0)
        out.sum().backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape


def test_keys_of_empty_query_sequences_get_zero_gradient():
    """A sequence with keys but no queries: nothing reads its keys, their gradients are 0."""
    lens_q, lens_k = [4, 0, 3], [4, 5, 3]
    q, k, v, _ = random_varlen(lens_q, lens_k, 2, 2, 8, requires_grad=True)
    out = fastgpt.attention_varlen(q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), 4, 5)
    out.square().sum().backward()
    assert (k.grad[4:9] == 0).all() and (v.grad[4:9] == 0).all()
    assert k.grad[:4].abs().sum() > 0 and v.grad[9:].abs().sum() > 0


# --- input rules --------------------------------------------------------------------------------


def good_inputs():
    """A valid call's arguments: 3 sequences, q (12, 4, 8), k, v (10, 2, 8)."""
    lens_q, lens_k = [5, 3, 4], [2, 6, 2]
    q, k, v, _ = random_varlen(lens_q, lens_k, 4, 2, 8)
    return dict(
        q=q,
        k=k,
        v=v,
        cu_seqlens_q=cu_seqlens(lens_q),
        cu_seqlens_k=cu_seqlens(lens_k),
        max_seqlen_q=5,
        max_seqlen_k=6,
    )


def int32(*values):
    return torch.tensor(values, dtype=torch.int32)


# (what to change, exception, words the message must contain)
BAD_INPUTS = {
    "cu int64": (dict(cu_seqlens_q=int32(0, 5, 8, 12).long()), TypeError, "int32"),
    "cu a list": (dict(cu_seqlens_k=[0, 2, 8, 10]), TypeError, "int32 tensor"),
    "cu on meta": (dict(cu_seqlens_q=int32(0, 5, 8, 12).to("meta")), ValueError, "device"),
    "cu 2-d": (dict(cu_seqlens_q=int32(0, 5, 8, 12)[None]), ValueError, "1-d"),
    "cu not from 0": (dict(cu_seqlens_q=int32(1, 5, 8, 12)), ValueError, "start at 0"),
    "cu decreasing": (dict(cu_seqlens_k=int32(0, 6, 2, 10)), ValueError, "non-decreasing"),
    "total_q mismatch": (dict(cu_seqlens_q=int32(0, 5, 8, 11)), ValueError, "packs 12 tokens"),
    "total_k mismatch": (dict(cu_seqlens_k=int32(0, 2, 8, 12)), ValueError, "packs 10 tokens"),
    "batch mismatch": (dict(cu_seqlens_k=int32(0, 10)), ValueError, "same number of sequences"),
    "max_seqlen_q short": (dict(max_seqlen_q=4), ValueError, "longest sequence (5)"),
    "max_seqlen_k short": (dict(max_seqlen_k=5), ValueError, "longest sequence (6)"),
    "max_seqlen a float": (dict(max_seqlen_k=6.0), ValueError, "an int"),
    "q 4-d": (dict(q=torch.randn(1, 12, 4, 8)), ValueError, "3-d q (total_q, H, D)"),
    "mixed dtypes": (dict(k=torch.randn(10, 2, 8, dtype=torch.float16)), TypeError, "one dtype"),
    "int tensors": (
        dict(
            q=torch.ones(12, 4, 8, dtype=torch.int32),
            k=torch.ones(10, 2, 8, dtype=torch.int32),
            v=torch.ones(10, 2, 8, dtype=torch.int32),
        ),
        TypeError,
        "floating-point",
    ),  # fmt: skip
    "heads not a multiple": (dict(q=torch.randn(12, 3, 8)), ValueError, "multiple"),
    "head dims differ": (dict(q=torch.randn(12, 4, 16)), ValueError, "head dim"),
    "k, v shapes differ": (dict(v=torch.randn(10, 2, 4)), ValueError, "same shape"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_one_sentence(case):
    change, error, words = BAD_INPUTS[case]
    with pytest.raises(error, match=re.escape(words)) as raised:
        fastgpt.attention_varlen(**{**good_inputs(), **change})
    message = str(raised.value)
    assert message.endswith(".") and "\n" not in message


def test_non_finite_scale_raises():
    with pytest.raises(ValueError, match="finite"):
        fastgpt.attention_varlen(**good_inputs(), scale=float("inf"))


# --- dispatch -----------------------------------------------------------------------------------


# Every backend has varlen kernels today; a backend without them (one a future version adds, or
# an extension built without them) is simulated by taking the compiled ones out of the table.
COMPILED_HERE = [b for b in ("triton", "cpp") if b in fastgpt.available_backends(DEVICE)]


@pytest.mark.parametrize("backend", COMPILED_HERE)
def test_backend_without_varlen_kernels_raises_when_asked_for(backend, monkeypatch):
    monkeypatch.setattr(varlen, "VARLEN_BACKENDS", ("reference",))
    with pytest.raises(NotImplementedError, match="no variable-length attention kernels yet"):
        fastgpt.attention_varlen(**good_inputs(), backend=backend)


@pytest.mark.parametrize("backend", COMPILED_HERE)
def test_automatic_pick_without_varlen_kernels_runs_the_reference(backend, debug_log, monkeypatch):
    monkeypatch.setattr(varlen, "VARLEN_BACKENDS", ("reference",))
    monkeypatch.setenv("FASTGPT_BACKEND", backend)
    inputs = good_inputs()
    got = fastgpt.attention_varlen(**inputs)
    want = fastgpt.attention_varlen(**inputs, backend="reference")
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    lines = [m for m in debug_log() if m.startswith("attention_varlen")]
    assert f"-> reference ({backend} (FASTGPT_BACKEND) has no varlen kernels yet)" in lines[0]


# --- torch.library ops --------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_opcheck(causal):
    forward = torch.ops.fastgpt.reference_attention_varlen_forward
    backward = torch.ops.fastgpt.reference_attention_varlen_backward
    lens_q, lens_k = LENGTH_MIXES["both ways, empties"]
    q, k, v, grad_out = random_varlen(lens_q, lens_k, 4, 2, 16, requires_grad=True)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    args = (q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal, 0.25)
    torch.library.opcheck(forward, args)
    out, lse = forward(*args)
    detached = [t.detach() for t in (q, k, v, out)]
    torch.library.opcheck(backward, (grad_out.detach(), *detached, lse, *args[3:]))


@pytest.mark.parametrize(
    "backend", [b for b in VARLEN_BACKENDS if b in fastgpt.available_backends(DEVICE)]
)
def test_profiler_shows_the_varlen_op(backend):
    inputs = good_inputs()
    inputs["q"].requires_grad_()
    with torch.profiler.profile() as prof:
        fastgpt.attention_varlen(**inputs, backend=backend).sum().backward()
    names = {event.key for event in prof.key_averages()}
    assert f"fastgpt::{backend}_attention_varlen_forward" in names
    assert f"fastgpt::{backend}_attention_varlen_backward" in names


@pytest.mark.slow
def test_compiles_fullgraph_with_dynamic_totals():
    """torch.compile(fullgraph=True) over attention_varlen: the packed totals are dynamic (a second
    mix of lengths reuses the graph), outputs and gradients equal eager."""

    def fn(q, k, v, cu_q, cu_k):  # q: (total_q, H, D); k, v: (total_k, Hkv, D)
        out = fastgpt.attention_varlen(q, k, v, cu_q, cu_k, 32, 32, causal=True, scale=0.3)
        return out * 2  # (total_q, H, D)

    check_one_graph_for_all_totals(fn, 4, 2, 8)


# --- flash-attn drop-ins ------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_flash_varlen_of_equal_lengths_equals_flash_attn_func(causal, heads, kv_heads):
    """B sequences of one length, packed: flash_attn_varlen_func is flash_attn_func on (B, T, H, D),
    outputs, gradients and softmax_lse ((H, B T) against (B, H, T))."""
    B, Tq, Tk, D = 3, 7, 11, 16
    q, k, v, grad_out = random_varlen([Tq] * B, [Tk] * B, heads, kv_heads, D, torch.float64)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    cu_q, cu_k = cu_seqlens([Tq] * B), cu_seqlens([Tk] * B)
    out, lse, none = fastgpt.flash_attn_varlen_func(
        *leaves, cu_q, cu_k, Tq, Tk, causal=causal, return_attn_probs=True
    )
    dense = [t.unflatten(0, (B, -1)) for t in leaves]  # (B, T, heads, D)
    want, want_lse, _ = fastgpt.flash_attn_func(*dense, causal=causal, return_attn_probs=True)
    assert none is None and lse.shape == (heads, B * Tq)
    torch.testing.assert_close(out, want.flatten(0, 1), atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, want_lse.transpose(0, 1).flatten(1, 2), atol=1e-12, rtol=0)
    got_grads = torch.autograd.grad(out, leaves, grad_out)
    want_grads = torch.autograd.grad(want.flatten(0, 1), leaves, grad_out)
    for got, expected in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [None, True], ids=["default (not causal)", "causal"])
def test_flash_varlen_matches_oracle_and_lse(causal):
    """flash-attn's defaults (causal=False) and its softmax_lse against the float64 oracle."""
    lens_q, lens_k = LENGTH_MIXES["both ways, empties"]
    q, k, v, _ = random_varlen(lens_q, lens_k, 4, 2, 16, torch.float64, seed=13)
    kwargs = {} if causal is None else {"causal": causal}
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    out, lse, _ = fastgpt.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, 11, 13, softmax_scale=0.4, return_attn_probs=True, **kwargs
    )
    want_out, want_lse = varlen_oracle(q, k, v, lens_q, lens_k, bool(causal), 0.4)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-12)
    plain = fastgpt.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 11, 13, softmax_scale=0.4, **kwargs)
    assert isinstance(plain, torch.Tensor)


def packed_grads(fn, packed, grad_out):
    packed = packed.detach().requires_grad_()
    out = fn(packed)
    return out, torch.autograd.grad(out, packed, grad_out)[0]


def test_packed_variants_equal_unpacked():
    """qkv (B, T, 3, H, D), kv (B, Tk, 2, Hkv, D) and the varlen (total, 3, H, D),
    (total_k, 2, Hkv, D) layouts are views: same outputs as the unpacked call, and the packed
    tensor's gradient is the unpacked gradients stacked."""
    B, T, H, Hkv, D = 2, 9, 4, 2, 8
    qkv, kv, q, grad_out = random_tensors(
        (B, T, 3, H, D), (B, T, 2, Hkv, D), (B, T, H, D), (B, T, H, D), dtype=torch.float64
    )
    cu = cu_seqlens([T] * B)
    flat = lambda t: t.flatten(0, 1)  # (B, T, ...) -> (B T, ...)
    lens = (cu, cu, T, T)  # cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    cases = {  # name: (packed tensor, packed call, the same call unpacked)
        "qkvpacked": (
            qkv,
            lambda p: fastgpt.flash_attn_qkvpacked_func(p, causal=True),
            lambda p: fastgpt.flash_attn_func(*p.unbind(2), causal=True),
        ),
        "kvpacked": (
            kv,
            lambda p: fastgpt.flash_attn_kvpacked_func(q, p, causal=True),
            lambda p: fastgpt.flash_attn_func(q, *p.unbind(2), causal=True),
        ),
        "varlen_qkvpacked": (
            flat(qkv),
            lambda p: fastgpt.flash_attn_varlen_qkvpacked_func(p, cu, T, causal=True),
            lambda p: fastgpt.flash_attn_varlen_func(*p.unbind(1), *lens, causal=True),
        ),
        "varlen_kvpacked": (
            flat(kv),
            lambda p: fastgpt.flash_attn_varlen_kvpacked_func(flat(q), p, *lens, causal=True),
            lambda p: fastgpt.flash_attn_varlen_func(flat(q), *p.unbind(1), *lens, causal=True),
        ),
    }  # fmt: skip
    for name, (packed, packed_call, unpacked_call) in cases.items():
        g = grad_out if packed.dim() == 5 else flat(grad_out)
        got, got_grad = packed_grads(packed_call, packed, g)
        want, want_grad = packed_grads(unpacked_call, packed, g)
        assert got_grad.abs().sum() > 0, name
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(got_grad, want_grad, atol=0, rtol=0)
    out, lse, _ = fastgpt.flash_attn_qkvpacked_func(qkv, return_attn_probs=True)
    assert out.shape == (B, T, H, D) and lse.shape == (B, H, T)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dropout_p=0.1),
        dict(alibi_slopes=torch.ones(4)),
        dict(block_table=torch.zeros(3, 1, dtype=torch.int32)),
    ],
)
def test_flash_varlen_unsupported_arguments_raise(kwargs):
    inputs = good_inputs()
    with pytest.raises(NotImplementedError, match="flash_attn_varlen_func does not support"):
        fastgpt.flash_attn_varlen_func(*inputs.values(), **kwargs)


def test_packed_variants_raise_for_unsupported_arguments_and_shapes():
    inputs = good_inputs()
    qkv = torch.stack([inputs["q"]] * 3, dim=1)  # (total, 3, H, D)
    with pytest.raises(NotImplementedError, match="does not support dropout_p=0.1"):
        fastgpt.flash_attn_varlen_qkvpacked_func(qkv, inputs["cu_seqlens_q"], 5, dropout_p=0.1)
    with pytest.raises(NotImplementedError, match="does not support alibi_slopes"):
        alibi = torch.ones(4)
        fastgpt.flash_attn_kvpacked_func(qkv[None, :, 0], qkv[None, :, 1:], alibi_slopes=alibi)
    with pytest.raises(
        ValueError, match=re.escape("qkv of shape (B, T, 3, H, D), got (12, 3, 4, 8)")
    ):
        fastgpt.flash_attn_qkvpacked_func(qkv)
    with pytest.raises(ValueError, match=re.escape("kv of shape (total_k, 2, Hkv, D)")):
        fastgpt.flash_attn_varlen_kvpacked_func(inputs["q"], qkv, *list(inputs.values())[3:])


# --- GPT on packed documents --------------------------------------------------------------------


def test_gpt_packed_documents_equal_per_document_runs():
    """Documents packed into the rows of one batch (one crosses a row boundary) with cu_seqlens:
    each document's logits are the model's on it alone (attention stays inside the document,
    positions restart), and the packed loss and gradients are the token-weighted per-document
    ones. float64 model; its cross-entropy runs in float32, hence the loss/gradient tolerance."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    model = GPT(config).double()
    lengths = [5, 1, 11, 7]  # 24 tokens in 2 rows of 12: the 11-token document crosses rows
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 64, (2, n), generator=gen) for n in lengths]  # (inputs, targets)
    idx = torch.cat([d[0] for d in docs]).view(2, 12)  # (B, T)
    targets = torch.cat([d[1] for d in docs]).view(2, 12)  # (B, T)

    logits, loss = model(idx, targets, cu_seqlens=cu_seqlens_from_lengths(lengths))
    packed_grads = torch.autograd.grad(loss, list(model.parameters()))

    total = sum(lengths)
    want_loss, want_grads, start = 0.0, [torch.zeros_like(p) for p in model.parameters()], 0
    for (x, y), n in zip(docs, lengths, strict=True):
        doc_logits, doc_loss = model(x[None], y[None])  # (1, n, V)
        torch.testing.assert_close(
            logits.flatten(0, 1)[start : start + n], doc_logits[0], atol=1e-12, rtol=0
        )
        grads = torch.autograd.grad(doc_loss * n / total, list(model.parameters()))
        want_grads = [w + g for w, g in zip(want_grads, grads, strict=True)]
        want_loss, start = want_loss + doc_loss.item() * n / total, start + n
    torch.testing.assert_close(loss.item(), want_loss, atol=1e-6, rtol=1e-6)
    for got, want in zip(packed_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # Without cu_seqlens the same batch attends across documents: the logits differ.
    assert not torch.allclose(model(idx)[0], logits)


def test_gpt_packed_documents_rules():
    config = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config)
    idx = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="does not fit the model's context of 8"):
        model(idx, cu_seqlens=cu_seqlens_from_lengths([3, 9, 4]))
    with pytest.raises(ValueError, match="run from 0 to the 16 tokens"):
        model(idx, cu_seqlens=cu_seqlens_from_lengths([3, 4]))
    with pytest.raises(ValueError, match="cu_seqlens or kv_caches"):
        model(idx, cu_seqlens=cu_seqlens_from_lengths([8, 8]), kv_caches=model.new_kv_caches())
    logits, _ = model(idx, cu_seqlens=cu_seqlens_from_lengths([8, 0, 8]))  # empty documents too
    torch.testing.assert_close(logits, model(idx)[0])  # rows as documents: the dense batch


@pytest.mark.slow
def test_gpt_packed_documents_compile_fullgraph():
    """GPT with cu_seqlens under torch.compile(fullgraph=True): a second packing of other
    document lengths reuses the graph; logits, loss and gradients equal eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lengths in ([5, 1, 11, 7], [12, 3, 9, 0]):  # same count, other lengths
            results = []
            for run in (model, compiled):
                cu = cu_seqlens_from_lengths(lengths)
                logits, loss = run(idx, idx, cu_seqlens=cu)
                results.append([logits, *torch.autograd.grad(loss, list(model.parameters()))])
            for got, want in zip(results[1], results[0], strict=True):
                torch.testing.assert_close(got, want)
    assert counter.frame_count == 1


def test_double_backward_raises():
    inputs = good_inputs()
    q = inputs["q"].requires_grad_()
    (dq,) = torch.autograd.grad(
        fastgpt.attention_varlen(**inputs).square().sum(), q, create_graph=True
    )
    with pytest.raises(RuntimeError, match="no double backward"):
        dq.sum().backward()
