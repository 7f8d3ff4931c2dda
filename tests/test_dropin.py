"""fastgpt.scaled_dot_product_attention against torch's SDPA, fastgpt.flash_attn_func against a
float64 flash-attn-style reference in (B, T, H, D).

The exact comparisons run in float64 (fastgpt's CPU backends take it), so any difference beyond
rounding is a semantic one: a wrong causal alignment, scale or head mapping. One test per drop-in
repeats a case in float32 under the 2x-of-PyTorch error rule.
"""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from oracle import DEVICE_BACKENDS, F64, rounding_floor

import fastgpt

TORCH_SDPA = torch._C._nn.scaled_dot_product_attention  # torch's own, whatever F holds


@pytest.fixture
def paths(debug_log):
    """The drop-in paths taken while a test runs, read from FASTGPT_DEBUG's log."""

    def taken(entry: str) -> list[str]:
        return [m for m in debug_log() if m.startswith(entry)]

    return taken


def leaves(*shapes, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def out_and_grads(fn, tensors, seed=1):
    out = fn(*tensors)
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    return [out, *torch.autograd.grad(out, tensors, grad_out)]


def assert_all_close(got, want, **tol):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape, f"tensor {i}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        torch.testing.assert_close(g, w, **tol, msg=lambda m, i=i: f"tensor {i}: {m}")


# --- scaled_dot_product_attention ------------------------------------------------------------


# (Tq, Tk): equal lengths, top-left with Tq < Tk (keys cut to Tq), Tq > Tk (square + full block).
@pytest.mark.parametrize("tq,tk", [(7, 7), (5, 9), (9, 5)])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_sdpa_matches_torch(tq, tk, is_causal, scale, heads, kv_heads, paths):
    tensors = leaves((2, heads, tq, 16), (2, kv_heads, tk, 16), (2, kv_heads, tk, 16))
    kwargs = dict(is_causal=is_causal, scale=scale, enable_gqa=heads != kv_heads)
    got = out_and_grads(
        lambda q, k, v: fastgpt.scaled_dot_product_attention(q, k, v, **kwargs), tensors
    )
    want = out_and_grads(lambda q, k, v: TORCH_SDPA(q, k, v, **kwargs), tensors)
    assert_all_close(got, want, **F64)
    taken = paths("scaled_dot_product_attention")
    assert taken and all("-> fastgpt.attention" in p for p in taken), taken


# Ranks 2 and 3 are lifted to 4 with views; torch reads dim -3 of a 3-d tensor as the head dim.
@pytest.mark.parametrize(
    "q_shape,kv_shape,gqa",
    [((6, 8), (6, 8), False), ((3, 6, 8), (3, 6, 8), False), ((4, 6, 8), (2, 6, 8), True)],
)
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_low_ranks_match_torch(q_shape, kv_shape, gqa, is_causal, paths):
    tensors = leaves(q_shape, kv_shape, kv_shape)
    kwargs = dict(is_causal=is_causal, enable_gqa=gqa)
    got = out_and_grads(
        lambda q, k, v: fastgpt.scaled_dot_product_attention(q, k, v, **kwargs), tensors
    )
    want = out_and_grads(lambda q, k, v: TORCH_SDPA(q, k, v, **kwargs), tensors)
    assert_all_close(got, want, **F64)
    assert "-> fastgpt.attention" in paths("scaled_dot_product_attention")[-1]


def assert_within_twice_baseline(names, got, baseline, exact):
    """Each of `got` is at most 2x as far from `exact` as `baseline` (plain float32 torch) is."""
    for name, ours, base, ref in zip(names, got, baseline, exact, strict=True):
        assert ours.dtype == base.dtype and ours.shape == ref.shape, name
        bound = 2 * (base.double() - ref).abs().max().item() + rounding_floor(ref, base.dtype)
        err = (ours.double() - ref).abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sdpa_float32_within_twice_torch_error(device, backend, monkeypatch, paths):
    monkeypatch.setenv("FASTGPT_BACKEND", backend)
    q, k, v = leaves((2, 4, 33, 32), (2, 2, 40, 32), (2, 2, 40, 32))  # causal top-left, Tq < Tk
    kwargs = dict(is_causal=True, enable_gqa=True)
    exact = out_and_grads(lambda *t: TORCH_SDPA(*t, **kwargs), [q, k, v])
    low = [t.detach().float().to(device).requires_grad_() for t in (q, k, v)]
    ours = out_and_grads(lambda *t: fastgpt.scaled_dot_product_attention(*t, **kwargs), low)
    torch32 = out_and_grads(lambda *t: TORCH_SDPA(*t, **kwargs), low)
    assert_within_twice_baseline(
        ["out", "dq", "dk", "dv"], ours, torch32, [t.to(device) for t in exact]
    )
    assert "-> fastgpt.attention" in paths("scaled_dot_product_attention")[-1]


# Each case goes to torch's own implementation, with torch's result (the same random stream).
@pytest.mark.parametrize(
    "case",
    [
        "bool_mask",
        "float_mask",
        "dropout",
        "rank5",
        "value_dim",
        "broadcast_kv_heads",
        "empty",
        "unusable_backend",
    ],
)
def test_sdpa_fallbacks_match_torch(case, paths, monkeypatch):
    q_shape, kv_shape, v_shape, kwargs = (2, 4, 6, 8), (2, 4, 6, 8), (2, 4, 6, 8), {}
    if case == "bool_mask":
        kwargs["attn_mask"] = torch.rand(6, 6, generator=torch.Generator().manual_seed(3)) > 0.3
    elif case == "float_mask":
        kwargs["attn_mask"] = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    elif case == "dropout":
        kwargs["dropout_p"] = 0.5
    elif case == "rank5":
        q_shape, kv_shape, v_shape = (2, 2, 3, 6, 8), (2, 2, 3, 6, 8), (2, 2, 3, 6, 8)
    elif case == "value_dim":
        v_shape = (2, 4, 6, 5)
    elif case == "broadcast_kv_heads":  # 1 kv head, enable_gqa=False: torch broadcasts it
        kv_shape, v_shape = (2, 1, 6, 8), (2, 1, 6, 8)
    elif case == "empty":
        kv_shape, v_shape = (2, 4, 0, 8), (2, 4, 0, 8)
    elif case == "unusable_backend":  # a replaced F.scaled_dot_product_attention must still work
        monkeypatch.setenv("FASTGPT_BACKEND", "no_such_backend")
    tensors = leaves(q_shape, kv_shape, v_shape)
    torch.manual_seed(0)
    got = fastgpt.scaled_dot_product_attention(*tensors, **kwargs)
    torch.manual_seed(0)
    want = TORCH_SDPA(*tensors, **kwargs)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert "-> torch" in paths("scaled_dot_product_attention")[-1]


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_sdpa_with_a_non_finite_scale_is_torchs(scale, paths):
    # fastgpt.attention refuses a non-finite scale (unsupported_reason): the drop-in gives torch's.
    tensors = leaves((1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8))
    got = fastgpt.scaled_dot_product_attention(*tensors, scale=scale)
    torch.testing.assert_close(got, TORCH_SDPA(*tensors, scale=scale), equal_nan=True)
    assert "-> torch (scale must be a finite number" in paths("scaled_dot_product_attention")[-1]


def test_sdpa_errors_like_torch():
    # Mismatched heads without enable_gqa, and integer tensors: torch's own error, not fastgpt's.
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    for args in [(q, k, k), (q.long(), q.long(), q.long())]:
        with pytest.raises(RuntimeError) as theirs:
            TORCH_SDPA(*args)
        with pytest.raises(RuntimeError) as ours:
            fastgpt.scaled_dot_product_attention(*args)
        assert str(ours.value) == str(theirs.value)


def test_sdpa_replaces_torch_without_recursion(monkeypatch, paths):
    """nanoGPT-style code calling F.scaled_dot_product_attention runs unchanged on fastgpt."""
    q, k, v = leaves((1, 2, 5, 8), (1, 2, 5, 8), (1, 2, 5, 8))
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    want_masked, want_causal = (
        TORCH_SDPA(q, k, v, attn_mask=mask),
        TORCH_SDPA(q, k, v, is_causal=True),
    )
    monkeypatch.setattr(F, "scaled_dot_product_attention", fastgpt.scaled_dot_product_attention)
    got_masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # fallback, no recursion
    got_causal = F.scaled_dot_product_attention(
        q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True
    )
    assert_all_close([got_masked, got_causal], [want_masked, want_causal], **F64)
    assert [p.split("-> ")[1].split(" ")[0] for p in paths("scaled_dot_product_attention")] == [
        "torch",
        "fastgpt.attention",
    ]


# --- flash_attn_func -------------------------------------------------------------------------


def flash_reference(q, k, v, causal, softmax_scale=None, dtype=torch.float64):
    """flash-attn's semantics in `dtype`: q (B, Tq, H, D), k, v (B, Tk, Hkv, D) -> (B, Tq, H, D).

    causal is bottom-right: query i sees key j iff j <= i + Tk - Tq; a query that sees no key
    outputs 0. Query head h reads kv head h // (H // Hkv).
    """
    tq, tk, heads, dim = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    scale = dim**-0.5 if softmax_scale is None else softmax_scale
    group = heads // k.shape[2]
    k, v = k.to(dtype).repeat_interleave(group, dim=2), v.to(dtype).repeat_interleave(group, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q.to(dtype), k) * scale  # (B, H, Tq, Tk)
    visible = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril(diagonal=tk - tq)  # (Tq, Tk)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    probs = probs.nan_to_num(0.0)  # rows with no visible key
    return torch.einsum("bhij,bjhd->bihd", probs, v)  # (B, Tq, H, D)


# (Tq, Tk) = (9, 5) under causal leaves the first 4 queries with no key: their rows must be 0.
@pytest.mark.parametrize("tq,tk", [(7, 7), (5, 9), (9, 5)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("softmax_scale", [None, 0.5])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_flash_attn_func_matches_reference(tq, tk, causal, softmax_scale, heads, kv_heads):
    tensors = leaves((2, tq, heads, 16), (2, tk, kv_heads, 16), (2, tk, kv_heads, 16))
    kwargs = dict(causal=causal, softmax_scale=softmax_scale)
    got = out_and_grads(lambda q, k, v: fastgpt.flash_attn_func(q, k, v, **kwargs), tensors)
    want = out_and_grads(lambda q, k, v: flash_reference(q, k, v, **kwargs), tensors)
    assert_all_close(got, want, **F64)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_flash_attn_func_packed_views_float32(device, backend, monkeypatch):
    """q, k, v cut from one packed (B, T, 3, H, D) projection: views in, view out, 2x rule."""
    monkeypatch.setenv("FASTGPT_BACKEND", backend)
    packed = leaves((2, 37, 3, 4, 32))[0]
    exact = out_and_grads(lambda p: flash_reference(*p.unbind(2), causal=True), [packed])
    low = packed.detach().float().to(device).requires_grad_()
    ours = out_and_grads(lambda p: fastgpt.flash_attn_func(*p.unbind(2), causal=True), [low])
    plain = out_and_grads(
        lambda p: flash_reference(*p.unbind(2), causal=True, dtype=torch.float32), [low]
    )
    assert ours[0].shape == (2, 37, 4, 32)
    assert_within_twice_baseline(["out", "dpacked"], ours, plain, [t.to(device) for t in exact])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dropout_p=0.1),
        dict(alibi_slopes=torch.ones(2)),
    ],
)
def test_flash_attn_func_unsupported_arguments_raise(kwargs):
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(NotImplementedError, match="does not support"):
        fastgpt.flash_attn_func(q, q, q, **kwargs)


def test_flash_attn_with_kvcache_names_every_unsupported_argument():
    q, cache = torch.randn(1, 1, 2, 8), torch.randn(1, 4, 2, 8)
    expected = (
        "fastgpt.flash_attn_with_kvcache does not support rotary embeddings (rotary_cos, "
        "rotary_sin), alibi_slopes, return_softmax_lse=True."
    )
    with pytest.raises(NotImplementedError) as raised:
        fastgpt.flash_attn_with_kvcache(
            q, cache, cache, cache_seqlens=2, rotary_sin=q, alibi_slopes=torch.ones(2),
            return_softmax_lse=True,
        )  # fmt: skip
    assert str(raised.value) == expected


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_returns_softmax_lse(device, backend, causal, monkeypatch):
    """return_attn_probs=True gives (out, softmax_lse, None) as flash-attn without dropout:
    softmax_lse (B, H, Tq) float32, natural log, +inf for rows that see no key (Tq > Tk)."""
    monkeypatch.setenv("FASTGPT_BACKEND", backend)
    q, k, v = (t.float().to(device) for t in leaves((2, 9, 4, 16), (2, 5, 2, 16), (2, 5, 2, 16)))
    out, lse, probs = fastgpt.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert probs is None and lse.shape == (2, 4, 9) and lse.dtype == torch.float32
    torch.testing.assert_close(out, fastgpt.flash_attn_func(q, k, v, causal=causal))
    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q, k, v))
    want = fastgpt.reference.reference_attention_with_lse(q64, k64, v64, causal)[1]
    torch.testing.assert_close(lse.double().cpu(), want.cpu(), atol=1e-5, rtol=1e-5)
    assert torch.isinf(lse[:, :, :4]).all() == causal


def test_flash_attn_func_accepts_no_op_arguments():
    # (-1, 0) with causal is the causal mask itself; deterministic=True is what fastgpt always is.
    q, k, v = leaves((1, 5, 2, 8), (1, 6, 2, 8), (1, 6, 2, 8))
    got = fastgpt.flash_attn_func(q, k, v, causal=True, window_size=(-1, 0), deterministic=True)
    torch.testing.assert_close(got, flash_reference(q, k, v, causal=True), **F64)


@pytest.mark.parametrize(
    "shapes,message",
    [
        (((2, 5, 8), (2, 5, 8), (2, 5, 8)), "4-d"),
        (((1, 5, 4, 8), (1, 5, 2, 8), (1, 6, 2, 8)), "one shape"),
        (((1, 5, 4, 8), (2, 5, 2, 8), (2, 5, 2, 8)), "batch size"),
        (((1, 5, 3, 8), (1, 5, 2, 8), (1, 5, 2, 8)), "multiple"),
        (((1, 5, 3, 8), (1, 5, 0, 8), (1, 5, 0, 8)), "multiple"),  # no kv heads
    ],
)
def test_flash_attn_func_bad_shapes(shapes, message):
    with pytest.raises(ValueError, match=message):
        fastgpt.flash_attn_func(*[torch.randn(s) for s in shapes])


# --- the kernels really run ------------------------------------------------------------------


def test_dropins_run_cpp_ops_in_profiler(monkeypatch):
    if "cpp" not in fastgpt.available_backends("cpu"):
        pytest.skip("the C++ extension is not built")
    monkeypatch.setenv("FASTGPT_BACKEND", "cpp")
    q, k, v = leaves((1, 2, 6, 8), (1, 2, 6, 8), (1, 2, 6, 8), dtype=torch.float32)
    calls = {
        "scaled_dot_product_attention": lambda: fastgpt.scaled_dot_product_attention(
            q, k, v, is_causal=True
        ),
        "flash_attn_func": lambda: fastgpt.flash_attn_func(q, k, v, causal=True),
    }
    for name, call in calls.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            call().sum().backward()
        ops = {e.name for e in prof.events()}
        assert "fastgpt::cpp_attention_forward" in ops, f"{name}: {sorted(ops)}"
        assert "fastgpt::cpp_attention_backward" in ops, f"{name}: {sorted(ops)}"


def test_import_fastgpt_leaves_transformers_unimported():
    """transformers is an optional extra: only register_hf_attention imports it."""
    code = "import sys, fastgpt; assert 'transformers' not in sys.modules, 'imported transformers'"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
