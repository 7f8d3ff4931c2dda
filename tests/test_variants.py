"""Attention variants: sliding window, logit softcap, learnable sinks, returned LSE.

The oracle here is written independently of fastgpt.reference: a (Tq, Tk) mask built key by key
from the window rule, keys repeated per query head, -inf for hidden keys, the sink as one more
column of logits (-inf without sinks) and one softmax, in float64. Gradients, d(sinks) included,
come from autograd through it. The variants run where VARIANT_BACKENDS lists them (the reference
and the Triton kernels, interpreted here without a GPU, and the C++ CPU kernel, checked in
float64); an automatic pick moves there, an explicit
backend without them raises.
"""

import itertools
import json
import re

import pytest
import torch
from oracle import F64, assert_within_bounds, random_tensors, rounding_floor
from variant_oracle import oracle, visible
from varlen_oracle import cu_seqlens

import fastgpt
from fastgpt.attention import VARIANT_BACKENDS, attention
from fastgpt.model import GPT, GPTConfig
from fastgpt.nn import CausalSelfAttention
from fastgpt.reference import (
    reference_attention_backward,
    reference_attention_varlen_backward,
    reference_sinks_grad,
)

COMPILED = [b for b in fastgpt.available_backends("cpu") if b != "reference"]
TRITON = "triton" in fastgpt.available_backends("cpu")
# The backends with every variant that run on the CPU in float64 (the reference, the C++ kernel).
FP64_VARIANT_BACKENDS = [
    b
    for b in fastgpt.available_backends("cpu")
    if b != "triton" and all(b in VARIANT_BACKENDS[v] for v in VARIANT_BACKENDS)
]


def leaves(B, H, Hkv, Tq, Tk, D, sinks, seed=0):
    """float64 q, k, v, grad_out and (H,) sinks (or None), the first three and sinks leaves."""
    q, k, v, do, s = random_tensors(
        (B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D), (B, H, Tq, D), (H,),
        dtype=torch.float64, device="cpu", seed=seed,
    )  # fmt: skip
    tensors = [t.requires_grad_() for t in (q, k, v)]
    return (*tensors, do, s.requires_grad_() if sinks else None)


def grads(out, do, tensors):
    return torch.autograd.grad(out, [t for t in tensors if t is not None], do)


WINDOWS = [(-1, -1), (3, 0), (2, 5), (0, -1), (-1, 1), (0, 0)]
LENGTHS = [(1, 1), (1, 17), (17, 17), (17, 97), (97, 17), (97, 97)]


# Every window x causal x softcap x sinks, each on two (Tq, Tk) pairs and GQA shapes that rotate
# through LENGTHS and (H, Hkv) in (4, 4), (4, 2), (4, 1): odd lengths, Tq < Tk and Tq > Tk.
CASES = [
    (window, causal, softcap, sinks, LENGTHS[(n + m) % len(LENGTHS)], (4, 4 >> ((n + m) % 3)))
    for n, (window, causal, softcap, sinks) in enumerate(
        itertools.product(WINDOWS, [False, True], [0.0, 1.5], [False, True])
    )
    for m in (0, 3)
]


@pytest.mark.parametrize("backend", FP64_VARIANT_BACKENDS)
@pytest.mark.parametrize("window,causal,softcap,sinks,lengths,heads", CASES)
def test_variants_match_the_oracle_outputs_lse_and_grads(
    window, causal, softcap, sinks, lengths, heads, backend
):
    (Tq, Tk), (H, Hkv) = lengths, heads
    q, k, v, do, s = leaves(2, H, Hkv, Tq, Tk, 8, sinks, seed=Tq * 7 + Tk)
    out, lse = attention(
        q, k, v, causal=causal, window=window, softcap=softcap, sinks=s, return_lse=True,
        backend=backend,
    )  # fmt: skip
    want_out, want_lse = oracle(q, k, v, causal, window, softcap, s)
    torch.testing.assert_close(out, want_out, **F64)
    torch.testing.assert_close(lse, want_lse.detach(), **F64)
    assert lse.dtype == torch.float64 and not lse.requires_grad
    for name, got, want in zip(
        ["dq", "dk", "dv", "dsinks"],
        grads(out, do, (q, k, v, s)),
        grads(want_out, do, (q, k, v, s)),
        strict=False,  # no dsinks without sinks
    ):
        torch.testing.assert_close(got, want, **F64, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_compute_in_float32_with_float32_sinks(dtype):
    q, k, v, do, s = leaves(1, 4, 2, 17, 33, 16, True, seed=3)
    args = dict(causal=True, window=(5, 0), softcap=3.0)
    out, lse = attention(
        q.to(dtype), k.to(dtype), v.to(dtype), sinks=s.float(), return_lse=True, **args
    )
    want_out, want_lse = oracle(q, k, v, sinks=s, **args)
    assert out.dtype == dtype and lse.dtype == torch.float32
    # The error of the same computation in dtype: rounding q, k, v, then float32 softmax.
    tol = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
    torch.testing.assert_close(out.double(), want_out, **tol[dtype])
    torch.testing.assert_close(lse.double(), want_lse, **tol[dtype])


def test_rows_that_see_no_key_output_zero_with_lse_inf_or_the_sink():
    # Tq > Tk, causal: the first Tq - Tk queries see no key; window (0, 0): each sees one key.
    q, k, v, _, s = leaves(1, 2, 2, 6, 3, 4, True)
    out, lse = attention(q, k, v, causal=True, window=(1, 0), return_lse=True)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    assert torch.isinf(lse[:, :, :3]).all() and torch.isfinite(lse[:, :, 3:]).all()
    out, lse = attention(q, k, v, causal=True, window=(1, 0), sinks=s, return_lse=True)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    torch.testing.assert_close(lse[0, :, :3], s.detach()[:, None].expand(2, 3), **F64)


@pytest.mark.parametrize("backend", FP64_VARIANT_BACKENDS)
@pytest.mark.parametrize("window,softcap", [((4, 0), 0.0), ((-1, -1), 2.0), ((2, 3), 1.0)])
def test_gradcheck_in_float64_sinks_included(window, softcap, backend):
    q, k, v, _, s = leaves(1, 2, 1, 5, 7, 3, True, seed=11)

    def f(q, k, v, s):
        return attention(
            q, k, v, causal=True, window=window, softcap=softcap, sinks=s, backend=backend
        )

    assert torch.autograd.gradcheck(f, (q, k, v, s))


def test_the_sinks_gradient_is_a_per_head_sum():
    """d(sinks)[h] = -sum over batch and rows of p_sink * (dO . O): reference_sinks_grad's closed
    form (the kernels' delta pass) against autograd through the oracle."""
    q, k, v, do, s = leaves(2, 4, 2, 9, 13, 8, True, seed=5)
    out, lse = attention(q, k, v, causal=True, window=(4, 0), sinks=s, return_lse=True)
    want_out, _ = oracle(q, k, v, True, (4, 0), sinks=s)
    (want,) = torch.autograd.grad(want_out, s, do)
    torch.testing.assert_close(reference_sinks_grad(do, out.detach(), lse, s.detach()), want, **F64)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "window,softcap,sinks", [((3, 0), 0.0, False), ((2, 4), 1.5, True), ((-1, -1), 0.7, True)]
)
def test_the_hand_written_backward_takes_the_variants(causal, window, softcap, sinks):
    """reference_attention_backward (the kernels' oracle) against autograd through the oracle."""
    q, k, v, do, s = leaves(2, 4, 2, 17, 11, 8, sinks, seed=9)
    variants = dict(window=window, softcap=softcap, sinks=s)
    want = grads(oracle(q, k, v, causal, **variants)[0], do, (q, k, v))
    got = reference_attention_backward(do, q, k, v, causal, **variants)
    for name, g, w in zip(["dq", "dk", "dv"], got, want, strict=True):
        torch.testing.assert_close(g, w, **F64, msg=lambda m, n=name: f"{n}: {m}")
    # Packed: the same rule per sequence (the batch's first element cut into 3 sequences).
    lens_q, lens_k = [6, 0, 11], [4, 3, 4]
    cu_q, cu_k = cu_seqlens(lens_q, "cpu"), cu_seqlens(lens_k, "cpu")
    packed = [t[0].transpose(0, 1).detach() for t in (do, q, k, v)]  # (total, heads, D)
    got = reference_attention_varlen_backward(*packed, cu_q, cu_k, causal, **variants)
    for b in range(len(lens_q)):
        rows_q = slice(int(cu_q[b]), int(cu_q[b + 1]))
        rows_k = slice(int(cu_k[b]), int(cu_k[b + 1]))
        do_b, q_b = (t[rows_q].transpose(0, 1)[None] for t in packed[:2])
        k_b, v_b = (t[rows_k].transpose(0, 1)[None] for t in packed[2:])
        want = reference_attention_backward(do_b, q_b, k_b, v_b, causal, **variants)
        for g, w, rows in zip(got, want, [rows_q, rows_k, rows_k], strict=True):
            torch.testing.assert_close(g[rows], w[0].transpose(0, 1), **F64)


def test_variants_compile_in_one_graph():
    q, k, v, _, s = leaves(1, 4, 2, 9, 9, 8, True)

    def f(q, k, v, s):
        return attention(q, k, v, window=(3, 0), softcap=2.0, sinks=s)

    got = torch.compile(f, fullgraph=True)(q, k, v, s)
    torch.testing.assert_close(got, f(q, k, v, s), **F64)


def test_a_plain_call_runs_as_before_and_variants_log_their_backend(debug_log):
    q, k, v, _, s = leaves(1, 2, 2, 5, 5, 8, True)
    plain = attention(q, k, v)
    picked = debug_log()[-1]
    with_window = attention(q, k, v, window=(-1, -1), softcap=0.0)  # the defaults: plain again
    assert debug_log()[-1] == picked
    torch.testing.assert_close(with_window, plain, atol=0, rtol=0)
    # A window that hides nothing causal does not: plain too (flash-attn's causal (-1, 0)).
    for window in [(-1, 0), (-1, 3)]:
        torch.testing.assert_close(attention(q, k, v, window=window), plain, atol=0, rtol=0)
        assert debug_log()[-1] == picked
    attention(q, k, v, window=(2, 0), sinks=s)
    message = debug_log()[-1]
    auto = picked.split(" -> ")[1].split(" ")[0]  # the plain call's automatic pick
    if auto in VARIANT_BACKENDS["window"]:  # it has the variants: it stays
        assert f"window, sinks -> {auto} " in message, message
    else:  # the log says why it moved
        assert "window, sinks -> reference" in message, message
        assert "has no window, sinks kernels yet" in message, message


def test_fastgpt_backend_env_is_an_automatic_pick_that_moves(monkeypatch, debug_log):
    """FASTGPT_BACKEND overrides the automatic pick, as for varlen: a variant still moves."""
    q, k, v, _, s = leaves(1, 2, 2, 5, 5, 8, True)
    for backend in COMPILED:
        monkeypatch.setenv("FASTGPT_BACKEND", backend)
        out = attention(q.float(), k.float(), v.float(), sinks=s.float())
        if backend in VARIANT_BACKENDS["sinks"]:  # it has them: it stays
            assert debug_log()[-1].endswith(f"-> {backend} (FASTGPT_BACKEND)")
        else:  # to the first CPU backend in the automatic order that has them
            assert debug_log()[-1].endswith(
                f"-> {FP64_VARIANT_BACKENDS[0]} ({backend} (FASTGPT_BACKEND) has no sinks "
                "kernels yet)"
            )
        torch.testing.assert_close(
            out.double(), oracle(q, k, v, True, sinks=s)[0], atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("backend", fastgpt.available_backends("cpu"))
def test_return_lse_is_attention_with_lse_on_every_backend(backend):
    from fastgpt.attention import attention_with_lse

    q, k, v, _, _ = leaves(2, 4, 2, 7, 9, 8, False)
    q, k, v = q.detach().float(), k.detach().float(), v.detach().float()
    out, lse = attention(q, k, v, return_lse=True, backend=backend)
    want_out, want_lse = attention_with_lse(q, k, v, backend=backend)
    torch.testing.assert_close(out, want_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=0, rtol=0)
    assert lse.shape == (2, 4, 7) and lse.dtype == torch.float32


def test_no_keys_with_sinks_gives_zero_rows_with_lse_the_sink():
    q, _, _, _, s = leaves(1, 2, 2, 3, 0, 4, True)
    k = torch.zeros(1, 2, 0, 4, dtype=torch.float64)
    out, lse = attention(q, k, k, sinks=s, window=(1, 0), softcap=2.0, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(lse[0], s.detach()[:, None].expand(2, 3), **F64)
    out.sum().backward()
    assert torch.equal(s.grad, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize(
    "backend,variant",
    [(b, v) for b in COMPILED for v in ["window", "softcap", "sinks"]],
)
def test_an_explicit_backend_without_the_variant_raises(backend, variant, monkeypatch):
    """Every backend has every variant today: one without it (a future variant, a kernel built
    without it) is simulated through the capability table."""
    monkeypatch.setitem(VARIANT_BACKENDS, variant, ("reference",))
    q, k, v, _, s = leaves(1, 2, 2, 5, 5, 8, True)
    args = {"window": dict(window=(2, 0)), "softcap": dict(softcap=2.0), "sinks": dict(sinks=s)}
    assert backend not in VARIANT_BACKENDS[variant]
    with pytest.raises(
        NotImplementedError, match=f"The {backend} backend does not implement {variant}"
    ):
        attention(q.float(), k.float(), v.float(), backend=backend, **args[variant])


WINDOW_RULE = "window must be None or a pair (left, right) of ints >= -1, got "
SINKS_SHAPE = "sinks must have shape (H,) = (4,), one logit per query head, got (3,)."


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(window=(3,)), ValueError, WINDOW_RULE + "(3,)."),
        (dict(window=(-2, 0)), ValueError, WINDOW_RULE + "(-2, 0)."),
        (dict(window=(1.5, 0)), ValueError, WINDOW_RULE + "(1.5, 0)."),
        (dict(window=(True, 0)), ValueError, WINDOW_RULE + "(True, 0)."),
        (dict(softcap=-1.0), ValueError, "finite and >= 0 (0 turns it off), got -1.0."),
        (dict(softcap=float("inf")), ValueError, "got inf."),
        (dict(softcap="50"), TypeError, "softcap must be a real number, got str."),
        (dict(sinks=torch.zeros(3, dtype=torch.float64)), ValueError, SINKS_SHAPE),
        (dict(sinks=torch.zeros(4, dtype=torch.int64)), TypeError, "tensor (H,), got torch.int64."),
        (dict(sinks=[0.0] * 4), TypeError, "sinks must be a floating-point tensor (H,), got list."),
        (dict(sinks=torch.zeros(4, device="meta")), ValueError, "on q's device cpu, got meta."),
    ],
)  # fmt: skip
def test_bad_variant_arguments_raise_one_sentence(kwargs, error, message):
    q, k, v, _, _ = leaves(1, 4, 2, 5, 5, 8, False)
    with pytest.raises(error, match=re.escape(message)):
        attention(q, k, v, **kwargs)


# --- The Triton kernels (interpreted without a GPU) -----------------------------------------------


def variant_floors(q, k, v, do, causal, window, softcap, sinks, dtype):
    """Elementwise first-order rounding floors of a flash backward in dtype with the variants:
    oracle.flash_backward_floor's terms with the variants' p (window mask, capped scores, sink in
    the denominator), delta's error from the rounded O, and ds times the cap's derivative; plus
    dsinks' floor. All float64: (fq, fk, fv, fsinks or None)."""
    eps = torch.finfo(dtype).eps
    B, H, Tq, D = q.shape
    Tk, group = k.shape[2], H // k.shape[1]
    k_, v_ = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (B, H, Tk, D)
    s = q @ k_.transpose(-2, -1) * D**-0.5  # (B, H, Tq, Tk)
    dcap = torch.ones_like(s)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
        dcap = 1 - (s / softcap) ** 2
    s = s.masked_fill(~visible(Tq, Tk, causal, tuple(window)), float("-inf"))
    sink = torch.full((B, H, Tq, 1), float("-inf"), dtype=s.dtype)
    if sinks is not None:
        sink = sinks.to(s.dtype)[None, :, None, None].expand(B, H, Tq, 1)
    lse = torch.logsumexp(torch.cat([s, sink], -1), -1, keepdim=True)  # (B, H, Tq, 1)
    p = torch.exp(s - lse).nan_to_num(0.0)  # (B, H, Tq, Tk)
    rel_p = eps * (1 + lse.abs().nan_to_num(0.0, posinf=0.0))  # (B, H, Tq, 1)
    out = p @ v_  # (B, H, Tq, D)
    dp = do @ v_.transpose(-2, -1)  # (B, H, Tq, Tk)
    delta = (do * out).sum(-1, keepdim=True)  # (B, H, Tq, 1)
    dp_err = eps * (do.abs() @ v_.abs().transpose(-2, -1))  # (B, H, Tq, Tk)
    # delta = rowsum(dO * O) reads the forward's rounded O (p's error and O's own rounding): a
    # term flash_backward_floor leaves to 2x plain PyTorch's error, which is 0 where every row
    # sees one key (window (0, 0) or (0, -1) causal) and the exact dq is 0.
    delta_err = (rel_p + eps) * (do.abs() * (p @ v_.abs())).sum(-1, keepdim=True)  # (B, H, Tq, 1)
    ds_err = p * (rel_p * (dp - delta).abs() + dp_err + delta_err) * dcap  # (B, H, Tq, Tk)
    fq = D**-0.5 * ds_err @ k_.abs()  # (B, H, Tq, D)
    fk = (D**-0.5 * ds_err.transpose(-2, -1) @ q.abs()).unflatten(1, (-1, group)).sum(2)
    fv = ((p * rel_p).transpose(-2, -1) @ do.abs()).unflatten(1, (-1, group)).sum(2)
    fs = None
    if sinks is not None:  # dsinks = -sum p_sink * delta: p_sink's and delta's rounding
        p_sink = torch.exp(sink - lse).nan_to_num(0.0)  # (B, H, Tq, 1)
        delta_err = eps * (do.abs() * out.abs()).sum(-1, keepdim=True)
        fs = (p_sink * (rel_p * delta.abs() + delta_err)).sum((0, 2, 3))  # (H,)
    return fq, fk, fv, fs


def check_triton_variants(shape, causal, window, softcap, sinks, dtype, seed=0):
    """The Triton kernels' out and gradients (dsinks included) against the float64 oracle, within
    the rule of tests/oracle.py: 2x the error of the oracle run in dtype plus the floors."""
    B, H, Hkv, Tq, Tk, D = shape
    q, k, v, do, s = (
        None if t is None else t.detach() for t in leaves(B, H, Hkv, Tq, Tk, D, sinks, seed=seed)
    )
    variants = dict(causal=causal, window=window, softcap=softcap)

    def run(fn, dtype, sinks_dtype):
        tensors = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        sk = None if s is None else s.to(sinks_dtype).requires_grad_()
        out = fn(*tensors, sinks=sk)
        grads = torch.autograd.grad(out, tensors + ([sk] if sk is not None else []), do.to(dtype))
        return out.detach(), [g.detach() for g in grads]

    def kernel(q, k, v, sinks):
        return attention(q, k, v, sinks=sinks, backend="triton", **variants)

    def plain(q, k, v, sinks):
        return oracle(q, k, v, causal, window, softcap, sinks)[0]

    got_out, got = run(kernel, dtype, torch.float32)
    exact_out, exact = run(plain, torch.float64, torch.float64)
    plain_out, plain_grads = run(plain, dtype, dtype)
    *floors, fs = variant_floors(q, k, v, do, causal, window, softcap, s, dtype)
    what = f"triton {dtype} {shape} causal={causal} window={window} softcap={softcap}"
    assert_within_bounds(
        what, dtype, [got_out, *got[:3]], [plain_out, *plain_grads[:3]],
        [exact_out, *exact[:3]], [torch.zeros_like(exact_out), *floors],
    )  # fmt: skip
    if s is not None:  # dsinks: (H,) in the sinks' float32
        assert got[3].dtype == torch.float32 and got[3].shape == (H,)
        err = (got[3].double() - exact[3]).abs()
        plain_err = (plain_grads[3].double() - exact[3]).abs().max().item()
        bound = 2 * plain_err + rounding_floor(exact[3], dtype) + fs
        assert (err <= bound).all(), f"{what} dsinks: error {err.tolist()} over {bound.tolist()}"


# Every window x causal x softcap x sinks once in fp32, rotating through LENGTHS and the GQA
# shapes (odd lengths, Tq < Tk and Tq > Tk; tiles of 16/32 rows under the interpreter).
TRITON_CASES = [
    (window, causal, softcap, sinks, LENGTHS[n % len(LENGTHS)], (4, 4 >> (n % 3)))
    for n, (window, causal, softcap, sinks) in enumerate(
        itertools.product(WINDOWS, [False, True], [0.0, 1.5], [False, True])
    )
]


@pytest.mark.skipif(not TRITON, reason="triton is not installed")
@pytest.mark.parametrize("window,causal,softcap,sinks,lengths,heads", TRITON_CASES)
def test_triton_variants_fp32_within_the_rule(window, causal, softcap, sinks, lengths, heads):
    (Tq, Tk), (H, Hkv) = lengths, heads
    check_triton_variants((2, H, Hkv, Tq, Tk, 8), causal, window, softcap, sinks, torch.float32)


@pytest.mark.skipif(not TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    "causal,window,softcap,sinks,lengths",
    [
        (True, (40, 0), 0.0, True, (150, 150)),  # key tiles on both sides of the window skipped
        (False, (20, 33), 2.0, False, (130, 70)),  # Tq > Tk, both sides bounded
        (False, (-1, 10), 0.0, True, (45, 160)),  # right-bounded only
        (True, (17, -1), 50.0, True, (64, 96)),  # Gemma 2's cap, tile-aligned lengths
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_windows_that_skip_tiles(causal, window, softcap, sinks, lengths, dtype):
    """Windows narrower than the sequence: programs skip key tiles, mask only the edges."""
    Tq, Tk = lengths
    check_triton_variants((1, 2, 1, Tq, Tk, 16), causal, window, softcap, sinks, dtype, seed=Tq)


@pytest.mark.skipif(not TRITON, reason="triton is not installed")
def test_triton_plain_calls_compile_no_variant_path():
    """WINDOW / SOFTCAP / sinks are on only when a call restricts: causal alone is no window."""
    from fastgpt.kernels.attention import variant_args

    for causal in (False, True):
        plain = variant_args((-1, -1), 0.0, None, causal, 0.3, 100)
        assert not plain["WINDOW"] and not plain["SOFTCAP"] and plain["Sinks"] is None
    causal_right = variant_args((-1, 5), 0.0, None, True, 0.3, 100)  # causal hides the right
    assert not causal_right["WINDOW"]
    left = variant_args((7, -1), 2.0, None, True, 0.3, 100)
    assert left["WINDOW"] and (left["win_left"], left["win_right"]) == (7, 0) and left["SOFTCAP"]
    assert not variant_args((-1, -1), 2.0, None, False, 0.0, 100)["SOFTCAP"]  # scale 0: s = 0


@pytest.mark.skipif(not TRITON, reason="triton is not installed")
def test_triton_variant_ops_pass_opcheck():
    q, k, v, do, s = (t.detach().float() for t in leaves(1, 4, 2, 9, 21, 8, True, seed=2))
    assert s.shape == (4,)
    forward = torch.ops.fastgpt.triton_attention_forward
    backward = torch.ops.fastgpt.triton_attention_backward
    variants = dict(window=[3, 2], softcap=2.0, sinks=s)
    torch.library.opcheck(forward, (q, k, v, False, 0.3), variants)
    out, lse = forward(q, k, v, False, 0.3, **variants)
    torch.library.opcheck(backward, (do, q, k, v, out, lse, False, 0.3), variants)
    plain = backward(do, q, k, v, *forward(q, k, v, True, 0.3), True, 0.3)
    assert len(plain) == 4 and plain[3].shape == (0,)  # no sinks: an empty dsinks


@pytest.mark.skipif(not TRITON, reason="triton is not installed")
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "page16"])
@pytest.mark.parametrize(
    "causal,window,softcap,sinks",
    [(True, (5, 0), 0.0, True), (False, (20, 2), 2.0, False), (True, (-1, -1), 50.0, True)],
)
def test_triton_kvcache_variants_within_the_rule(paged, causal, window, softcap, sinks):
    """The Triton KV-cache kernel (split-K over the cache, then the merge) with the variants:
    each sequence's rows against the float64 oracle on its own keys, within the fp32 rule."""
    from fastgpt.kernels.kvcache import kvcache_attention_with_lse

    B, Tq, H, Hkv, D, capacity = 3, 3, 4, 2, 8, 96
    lengths = [3, 70, 96]  # keys per sequence after the new ones
    q, k_all, v_all, s = random_tensors(
        (B, Tq, H, D), (B, capacity, Hkv, D), (B, capacity, Hkv, D), (H,),
        dtype=torch.float64, device="cpu", seed=4,
    )  # fmt: skip
    s = s if sinks else None
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    k_cache, v_cache, table = k_all.float(), v_all.float(), None
    if paged:  # pages of 16 rows, handed out in reverse so that logical order != physical
        pages = capacity // 16
        table = torch.arange(B * pages, dtype=torch.int32).flip(0).view(B, pages)
        k_cache = torch.empty(B * pages, 16, Hkv, D)
        v_cache = torch.empty(B * pages, 16, Hkv, D)
        k_cache[table.flatten().long()] = k_all.float().view(B * pages, 16, Hkv, D)
        v_cache[table.flatten().long()] = v_all.float().view(B * pages, 16, Hkv, D)
    out, lse = kvcache_attention_with_lse(
        q.float(), k_cache, v_cache, seqlens, table, causal, D**-0.5, num_splits=3,
        window=window, softcap=softcap, sinks=None if s is None else s.float(),
    )  # fmt: skip
    for b, end in enumerate(lengths):
        qb, kb, vb = (t.transpose(0, 1)[None] for t in (q[b], k_all[b, :end], v_all[b, :end]))
        exact, exact_lse = oracle(qb, kb, vb, causal, window, softcap, s)
        args = [t.float() for t in (qb, kb, vb)] + [None if s is None else s.float()]
        plain = oracle(*args[:3], causal, window, softcap, args[3])[0]
        got = out[b].transpose(0, 1)[None]  # (1, H, Tq, D)
        what = f"triton kvcache paged={paged} b={b}"
        assert_within_bounds(what, torch.float32, [got], [plain], [exact], [None])
        torch.testing.assert_close(lse[b].double(), exact_lse[0], atol=1e-5, rtol=1e-5)


# --- Packed variable-length attention ------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "window,softcap,sinks", [((3, 0), 0.0, False), ((2, 1), 1.5, True), ((-1, -1), 0.0, True)]
)
@pytest.mark.parametrize("backend", FP64_VARIANT_BACKENDS)
def test_varlen_variants_match_the_oracle_per_sequence(causal, window, softcap, sinks, backend):
    lens_q, lens_k = [5, 0, 17, 1], [7, 3, 17, 1]
    H, Hkv, D = 4, 2, 8
    Nq, Nk = sum(lens_q), sum(lens_k)
    q, k, v, do, s = random_tensors(
        (Nq, H, D), (Nk, Hkv, D), (Nk, Hkv, D), (Nq, H, D), (H,),
        dtype=torch.float64, device="cpu", seed=7,
    )  # fmt: skip
    tensors = [t.requires_grad_() for t in (q, k, v)]
    s = s.requires_grad_() if sinks else None
    cu_q, cu_k = cu_seqlens(lens_q, "cpu"), cu_seqlens(lens_k, "cpu")
    variants = dict(window=window, softcap=softcap, sinks=s)
    out, lse = fastgpt.attention_varlen(
        *tensors, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, return_lse=True,
        backend=backend, **variants,
    )  # fmt: skip
    assert out.shape == q.shape and lse.shape == (H, Nq)
    outs, lses, rq, rk = [], [], 0, 0
    for tq, tk in zip(lens_q, lens_k, strict=True):
        heads_first = [
            t.transpose(0, 1)[None] for t in (q[rq : rq + tq], k[rk : rk + tk], v[rk : rk + tk])
        ]
        out_b, lse_b = oracle(*heads_first, causal, **variants)
        outs.append(out_b[0].transpose(0, 1))
        lses.append(lse_b[0])
        rq, rk = rq + tq, rk + tk
    want_out, want_lse = torch.cat(outs), torch.cat(lses, dim=1)
    torch.testing.assert_close(out, want_out, **F64)
    torch.testing.assert_close(lse, want_lse.detach(), **F64)
    got_grads, want_grads = grads(out, do, (*tensors, s)), grads(want_out, do, (*tensors, s))
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, **F64)


@pytest.mark.parametrize("backend", COMPILED)
def test_varlen_explicit_backend_without_varlen_or_the_variant_raises(backend, monkeypatch):
    """Every backend has the window today: one without it is simulated through the table."""
    monkeypatch.setitem(VARIANT_BACKENDS, "window", ("reference",))
    q = torch.randn(5, 2, 8)
    cu = cu_seqlens([5], "cpu")
    with pytest.raises(NotImplementedError):
        fastgpt.attention_varlen(q, q, q, cu, cu, 5, 5, window=(2, 0), backend=backend)


@pytest.mark.skipif(not TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    "causal,window,softcap,sinks",
    [(True, (3, 0), 0.0, True), (False, (2, 20), 1.5, True), (False, (-1, -1), 2.0, False)],
)
def test_triton_varlen_variants_within_the_rule(causal, window, softcap, sinks):
    """Packed sequences (one empty, one past a tile, one of one row) on the Triton varlen
    kernels: out, dq/dk/dv and dsinks against the float64 oracle run per sequence, in fp32."""
    lens_q, lens_k = [5, 0, 40, 1], [7, 3, 37, 1]
    H, Hkv, D = 4, 2, 8
    Nq, Nk = sum(lens_q), sum(lens_k)
    q, k, v, do, s = random_tensors(
        (Nq, H, D), (Nk, Hkv, D), (Nk, Hkv, D), (Nq, H, D), (H,),
        dtype=torch.float64, device="cpu", seed=9,
    )  # fmt: skip
    s = s if sinks else None
    cu_q, cu_k = cu_seqlens(lens_q, "cpu"), cu_seqlens(lens_k, "cpu")
    variants = dict(window=window, softcap=softcap)

    def run(fn, dtype, sinks_dtype):
        tensors = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        sk = None if s is None else s.to(sinks_dtype).requires_grad_()
        out = fn(*tensors, sk)
        grads = torch.autograd.grad(out, tensors + ([sk] if sk is not None else []), do.to(dtype))
        return [out.detach(), *(g.detach() for g in grads)]

    def kernel(q, k, v, sk):
        return fastgpt.attention_varlen(
            q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, sinks=sk,
            backend="triton", **variants,
        )  # fmt: skip

    def per_sequence(q, k, v, sk):
        outs, rq, rk = [], 0, 0
        for tq, tk in zip(lens_q, lens_k, strict=True):
            b = [
                t.transpose(0, 1)[None] for t in (q[rq : rq + tq], k[rk : rk + tk], v[rk : rk + tk])
            ]
            outs.append(oracle(*b, causal, window, softcap, sk)[0][0].transpose(0, 1))
            rq, rk = rq + tq, rk + tk
        return torch.cat(outs)

    got = run(kernel, torch.float32, torch.float32)
    exact = run(per_sequence, torch.float64, torch.float64)
    plain = run(per_sequence, torch.float32, torch.float32)
    floors = [torch.zeros_like(exact[0])] + [torch.zeros_like(g) for g in exact[1:4]]
    rq, rk, sink_floor = 0, 0, 0
    for tq, tk in zip(lens_q, lens_k, strict=True):  # the dense floors, sequence by sequence
        b = [t.transpose(0, 1)[None] for t in (q[rq : rq + tq], k[rk : rk + tk], v[rk : rk + tk])]
        do_b = do[rq : rq + tq].transpose(0, 1)[None]
        fq, fk, fv, fs = variant_floors(*b, do_b, causal, window, softcap, s, torch.float32)
        sink_floor = sink_floor + (0 if fs is None else fs)
        floors[1][rq : rq + tq] = fq[0].transpose(0, 1)
        floors[2][rk : rk + tk] = fk[0].transpose(0, 1)
        floors[3][rk : rk + tk] = fv[0].transpose(0, 1)
        rq, rk = rq + tq, rk + tk
    what = f"triton varlen causal={causal} window={window} softcap={softcap}"
    assert_within_bounds(what, torch.float32, got[:4], plain[:4], exact[:4], floors)
    if s is not None:  # dsinks: the rule, with its floor summed over the sequences
        err = (got[4].double() - exact[4]).abs()
        plain_err = (plain[4].double() - exact[4]).abs().max().item()
        bound = 2 * plain_err + rounding_floor(exact[4], torch.float32) + sink_floor
        assert (err <= bound).all(), f"{what} dsinks: error {err.tolist()} over {bound.tolist()}"


def test_varlen_bad_sinks_raise_naming_the_heads():
    q = torch.randn(5, 2, 8)
    cu = cu_seqlens([5], "cpu")
    with pytest.raises(ValueError, match=re.escape("sinks must have shape (H,) = (2,)")):
        fastgpt.attention_varlen(q, q, q, cu, cu, 5, 5, sinks=torch.zeros(3))


# --- Drop-ins ------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window_size,softcap", [((3, 0), 0.0), ((-1, 2), 2.0), ((4, 4), 1.0)])
def test_flash_attn_func_window_size_and_softcap(causal, window_size, softcap):
    q, k, v, do, _ = leaves(2, 4, 2, 9, 13, 8, False)
    # flash-attn's layout (B, T, H, D): transposed views of the same leaves.
    out, lse, none = fastgpt.flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
        window_size=window_size, softcap=softcap, return_attn_probs=True,
    )  # fmt: skip
    want_out, want_lse = oracle(q, k, v, causal, window_size, softcap)
    assert none is None and out.shape == (2, 9, 4, 8)
    torch.testing.assert_close(out.transpose(1, 2), want_out, **F64)
    torch.testing.assert_close(lse, want_lse.detach(), **F64)
    got = grads(out.transpose(1, 2), do, (q, k, v))
    for g, w in zip(got, grads(want_out, do, (q, k, v)), strict=True):
        torch.testing.assert_close(g, w, **F64)


def test_flash_attn_packed_and_varlen_functions_take_window_size_and_softcap():
    q, k, v, _, _ = leaves(1, 2, 2, 11, 11, 8, False)
    qkv = torch.stack([t.transpose(1, 2) for t in (q, k, v)], dim=2).detach()  # (1, T, 3, H, D)
    want = oracle(q, k, v, True, (2, 0), 1.5)[0].transpose(1, 2)  # (1, T, H, D)
    got = fastgpt.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(2, 0), softcap=1.5)
    torch.testing.assert_close(got, want, **F64)
    cu = cu_seqlens([11], "cpu")
    got = fastgpt.flash_attn_varlen_qkvpacked_func(
        qkv[0], cu, 11, causal=True, window_size=[2, 0], softcap=1.5
    )
    torch.testing.assert_close(got, want[0], **F64)
    with pytest.raises(NotImplementedError, match="does not support alibi_slopes"):
        fastgpt.flash_attn_func(*qkv.unbind(2), window_size=(2, 0), alibi_slopes=torch.ones(2))


# --- The nn module and the GPT -------------------------------------------------------------------


def test_causal_self_attention_variants_and_sinks_parameter():
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, 2, window=3, softcap=2.0, sinks=True).double()
    assert torch.equal(attn.sinks, torch.zeros(4)) and "sinks" in attn.state_dict()
    with torch.no_grad():
        attn.sinks.normal_()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    y = attn(x)
    qkv = attn.c_attn(x)
    q = qkv[..., :32].view(2, 9, 4, 8).transpose(1, 2)
    k = qkv[..., 32:48].view(2, 9, 2, 8).transpose(1, 2)
    v = qkv[..., 48:].view(2, 9, 2, 8).transpose(1, 2)
    o = oracle(q, k, v, True, (3, 0), 2.0, attn.sinks)[0].transpose(1, 2).reshape(2, 9, 32)
    torch.testing.assert_close(y, attn.c_proj(o), **F64)
    y.sum().backward()
    assert attn.sinks.grad is not None and attn.sinks.grad.abs().sum() > 0
    assert "sinks" not in CausalSelfAttention(32, 4).state_dict()  # off: no parameter


def test_causal_self_attention_rejects_bad_window_and_softcap():
    with pytest.raises(ValueError, match=re.escape("window must be None or an int >= 0")):
        CausalSelfAttention(32, 4, window=-1)
    with pytest.raises(ValueError, match=re.escape("softcap must be a finite number >= 0")):
        CausalSelfAttention(32, 4, softcap=-2.0)
    with pytest.raises(ValueError, match=re.escape("global_every must be None or an int >= 1")):
        GPTConfig(window=4, global_every=0)


def tiny_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=50, block_size=24, n_layer=4, n_head=4, n_kv_head=2, n_embd=32)
    return GPTConfig(**{**base, **overrides})


def test_gpt_alternates_local_and_global_layers():
    config = tiny_config(window=5, global_every=2, softcap=30.0, sinks=True)
    model = GPT(config)
    assert [b.attn.window for b in model.blocks] == [5, None, 5, None]
    assert all(b.attn.softcap == 30.0 and b.attn.sinks is not None for b in model.blocks)
    assert [b.attn.window for b in GPT(tiny_config(window=5)).blocks] == [5] * 4


def test_gpt_with_variants_decodes_with_the_cache_as_without(one_thread):
    torch.manual_seed(0)
    model = GPT(tiny_config(window=3, global_every=2, softcap=5.0, sinks=True)).double().eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.sinks.normal_()
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    full, _ = model(idx)
    caches = model.new_kv_caches()
    first, _ = model(idx[:, :7], kv_caches=caches)
    rest = [model(idx[:, t : t + 1], kv_caches=caches)[0] for t in range(7, 12)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, **F64)


def test_gpt_with_variants_packs_documents_as_it_runs_them_alone(one_thread):
    torch.manual_seed(0)
    model = GPT(tiny_config(window=2, softcap=4.0, sinks=True)).double().eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.sinks.normal_()
    docs = [
        torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 8, 3)
    ]
    packed, _ = model(torch.cat(docs)[None], cu_seqlens=cu_seqlens([5, 8, 3], "cpu"))
    alone = torch.cat([model(d[None])[0] for d in docs], dim=1)
    torch.testing.assert_close(packed, alone, **F64)


def test_checkpoint_round_trip_and_old_configs_still_load(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config(window=4, global_every=2, softcap=20.0, sinks=True))
    with torch.no_grad():
        model.blocks[0].attn.sinks.fill_(0.5)
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    config = GPTConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    loaded = GPT(config)
    loaded.load_state_dict(torch.load(tmp_path / "model.pt"))
    assert config == model.config and loaded.blocks[0].attn.sinks[0] == 0.5
    idx = torch.randint(0, 50, (1, 10))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], atol=0, rtol=0)

    # A config dict and state dict from before the variants: no new keys, everything off.
    old = {
        k: v
        for k, v in tiny_config().to_dict().items()
        if k not in ("window", "global_every", "softcap", "sinks")
    }
    plain = GPT(GPTConfig.from_dict(old))
    assert plain.config.window is None and plain.config.softcap == 0.0 and not plain.config.sinks
    plain.load_state_dict(GPT(tiny_config()).state_dict())  # strict: the same parameters


def test_to_hf_refuses_a_model_with_variants():
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="no sliding window, softcap or attention sinks"):
        GPT(tiny_config(n_kv_head=None, window=3)).to_hf()


# --- Hugging Face: Mistral (sliding window), Gemma 2 (window + softcap), gpt-oss (sinks) ---------

VOCAB = 64
HF_TOKENS = dict(bos_token_id=0, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
HF_SIZES = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, sliding_window=5, **HF_TOKENS,
)  # fmt: skip


def hf_config(arch: str):
    transformers = pytest.importorskip("transformers")
    if arch == "mistral":
        return transformers.MistralConfig(intermediate_size=64, **HF_SIZES)
    if arch == "gemma2":  # layer 0 sliding, layer 1 global; softcap 2.0 so that it matters
        return transformers.Gemma2Config(
            intermediate_size=64, head_dim=8, query_pre_attn_scalar=8,
            attn_logit_softcapping=2.0, **HF_SIZES,
        )  # fmt: skip
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no gpt-oss")
    return transformers.GptOssConfig(
        intermediate_size=32, head_dim=8, num_local_experts=4, num_experts_per_tok=2, **HF_SIZES
    )


# gpt-oss's experts (grouped_mm) take no float64: it runs in float32. Mistral's and Gemma 2's
# eager attention take their softmax in float32, so they agree with fastgpt's float64 attention
# to float32 precision.
HF_DTYPE = {"mistral": torch.float64, "gemma2": torch.float64, "gpt_oss": torch.float32}
HF_TOLERANCE = {
    "mistral": dict(atol=1e-5, rtol=1.3e-6),
    "gemma2": dict(atol=1e-5, rtol=1.3e-6),
    "gpt_oss": dict(atol=1e-5, rtol=1.3e-6),
}


def hf_model(arch: str, implementation: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(arch), attn_implementation=implementation)
    for module in model.modules():  # gpt-oss's sinks: away from 0 so that they matter
        if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
            torch.nn.init.normal_(module.sinks, std=1.0)
    return model.to(dtype or HF_DTYPE[arch]).eval()


def hf_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        2, VOCAB - 1, (batch, length), generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize(
    "arch,variants",
    [
        ("mistral", ["window"]),
        ("gemma2", ["window, softcap", "softcap"]),
        ("gpt_oss", ["window, sinks", "sinks"]),
    ],
)
def test_hf_variant_models_match_eager_logits_and_gradients(arch, variants, hf_paths, one_thread):
    NAME = fastgpt.register_hf_attention()
    ids = hf_ids(2, 13)
    results = {}
    for implementation in ("eager", NAME):
        model = hf_model(arch, implementation)
        out = model(ids, labels=ids)
        out.loss.backward()
        results[implementation] = [out.logits.detach()] + [p.grad for p in model.parameters()]
    for i, (got, want) in enumerate(zip(results[NAME], results["eager"], strict=True)):
        torch.testing.assert_close(got, want, **HF_TOLERANCE[arch], msg=lambda m, i=i: f"{i}: {m}")
    taken = hf_paths()
    assert sorted(set(taken)) == sorted(f"fastgpt (causal=True, {v})" for v in variants), taken


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gpt_oss"])
def test_hf_variant_models_generate_as_eager(arch, hf_paths, one_thread):
    """A causal prefill longer than the window, then one query at a time against the cache."""
    NAME = fastgpt.register_hf_attention()
    ids = hf_ids(2, 7, seed=1)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    want = hf_model(arch, "eager").generate(ids, **kwargs)
    got = hf_model(arch, NAME).generate(ids, **kwargs)
    assert torch.equal(got, want), f"fastgpt {got.tolist()} != eager {want.tolist()}"
    taken = hf_paths()
    assert any(p.startswith("fastgpt (causal=False") for p in taken), taken  # decoding steps
    assert all(p.startswith("fastgpt") for p in taken), taken


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gpt_oss"])
def test_hf_padding_masks_fall_back_and_match_eager(arch, hf_paths, one_thread):
    """Left padding needs a mask. A sliding layer's mask holds its window, which is no padding
    layout: Mistral's go to transformers' sdpa, Gemma 2's and gpt-oss's (softcap, sinks) to the
    model's own eager function. Their global layers' padding masks run on attention_varlen with
    the softcap / sinks. In float32: eager attention turns a float64 padding mask into NaN rows
    (its softmax runs in float32)."""
    NAME = fastgpt.register_hf_attention()
    ids = hf_ids(2, 9, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = HF_TOKENS["pad_token_id"]
    real = mask.bool()
    want = hf_model(arch, "eager", torch.float32)(ids, attention_mask=mask).logits[real]
    got = hf_model(arch, NAME, torch.float32)(ids, attention_mask=mask).logits[real]
    torch.testing.assert_close(got, want)  # float32 tolerances
    fallback = "transformers sdpa" if arch == "mistral" else "the model's eager attention"
    taken = hf_paths()
    assert any(p.startswith(fallback) for p in taken), taken
    allowed = (fallback,) if arch == "mistral" else (fallback, "fastgpt varlen")
    assert all(p.startswith(allowed) for p in taken), taken
    assert (arch != "mistral") == any(p.startswith("fastgpt varlen") for p in taken), taken
