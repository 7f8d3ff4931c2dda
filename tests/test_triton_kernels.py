"""Triton-specific checks of fastgpt.kernels, beyond the all-backend suite in test_attention.py.

On a CPU-only machine these run under the Triton interpreter (conftest.py), fp32/fp16 only (the
interpreter computes bf16 tl.dot wrongly). The interpreter uses one config per kernel
(BLOCK_M=32, BLOCK_N=16 in the forward and dQ, 16 x 32 in dK/dV), so the lengths below put the
causal diagonal, the ragged tails and the unmasked interior in different tiles on purpose.
"""

import pytest
import torch
from oracle import DEVICE, INTERPRETED, check_against_float64, random_qkv, rounding_floor

import fastgpt
from fastgpt.reference import reference_attention_with_lse

triton = pytest.importorskip("triton")
if DEVICE.type != "cuda" and not INTERPRETED:
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

import triton.language as tl  # noqa: E402

from fastgpt.kernels import attention as ka  # noqa: E402
from fastgpt.kernels import configs  # noqa: E402
from fastgpt.kernels.flash_fwd import head_base_offset  # noqa: E402


def assert_close_2x(got, ref, plain, dtype, what):
    """flash-attn's rule: error vs float64 at most 2x plain PyTorch's in `dtype` + rounding floor.

    Rows whose reference is +inf (no visible key) must be +inf in `got` too.
    """
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(got), inf), f"{what}: +inf rows differ"
    got, ref, plain = got[~inf].double(), ref[~inf], plain[~inf].double()
    bound = 2 * (plain - ref).abs().max().item() + rounding_floor(ref, dtype)
    err = (got - ref).abs().max().item()
    assert err <= bound, f"{what}: max error {err:.3g} exceeds {bound:.3g}"


# (B, H, Hkv, Tq, Tk, D): which path each case hits with the interpreter's tiles.
LSE_CASES = {
    "one_tile": (1, 2, 2, 7, 7, 16),
    "diagonal_and_interior": (1, 2, 1, 70, 70, 32),  # 3 query tiles, 5 key tiles, GQA 2
    "more_keys": (2, 2, 2, 33, 81, 40),  # bottom-right: every row sees at least 49 keys
    "more_queries": (1, 4, 2, 81, 33, 16),  # 48 rows see no key: lse = +inf there
    "key_tile_edge": (1, 1, 1, 32, 48, 64),  # lengths on tile boundaries
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(LSE_CASES))
def test_lse_matches_float64(case, causal):
    q, k, v = random_qkv(*LSE_CASES[case], seed=0)
    scale = q.shape[-1] ** -0.5
    out, lse = ka.attention_forward(q, k, v, causal, scale)
    ref_out, ref_lse = reference_attention_with_lse(q.double(), k.double(), v.double(), causal)
    plain_out, plain_lse = reference_attention_with_lse(q, k, v, causal, compute_dtype=q.dtype)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert_close_2x(lse, ref_lse, plain_lse, q.dtype, f"{case} lse")
    assert_close_2x(out, ref_out, plain_out, q.dtype, f"{case} out")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_split_k_matches_float64(splits, dtype):
    # GQA group of 4 padded to a 16-row dot tile; D = 40 padded to 64; K/V are strided views.
    q, k, v = random_qkv(2, 8, 2, 1, 203, 40, dtype, seed=0)
    kv = torch.stack([k, v], dim=3)  # (B, Hkv, Tk, 2, D): k and v interleaved in memory
    k, v = kv[:, :, :, 0], kv[:, :, :, 1]
    assert not k.is_contiguous()
    scale = 40**-0.5
    out, lse = ka.decode_forward(q, k, v, scale, num_splits=splits)
    ref_out, ref_lse = reference_attention_with_lse(q.double(), k.double(), v.double(), False)
    plain_out, plain_lse = reference_attention_with_lse(q, k, v, False, compute_dtype=q.dtype)
    assert out.dtype == dtype and lse.shape == (2, 8, 1)
    assert_close_2x(out, ref_out, plain_out, dtype, "decode out")
    assert_close_2x(lse, ref_lse, plain_lse.float(), torch.float32, "decode lse")


def test_forward_takes_the_decode_kernel_for_one_query_row(monkeypatch):
    calls = []
    original = ka.decode_forward

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(ka, "decode_forward", spy)
    q, k, v = random_qkv(1, 2, 1, 1, ka.DECODE_MIN_KEYS, 16, seed=0)
    out, _ = ka.attention_forward(q, k, v, True, 0.25)
    assert calls == [q.shape]
    ref = reference_attention_with_lse(q.double(), k.double(), v.double(), True, 0.25)[0]
    assert (out.double() - ref).abs().max() < 1e-5
    q2, k2, v2 = random_qkv(
        1, 2, 1, 2, ka.DECODE_MIN_KEYS, 16, seed=0
    )  # two query rows: the flash kernel
    ka.attention_forward(q2, k2, v2, True, 0.25)
    assert len(calls) == 1


@triton.jit
def _offset_kernel(Out, stride_b, stride_h):
    b = tl.program_id(0)
    h = tl.program_id(1)
    tl.store(Out + b * tl.num_programs(1) + h, head_base_offset(b, h, stride_b, stride_h))


def test_head_offsets_are_int64_past_2_pow_31():
    # Strides that fit int32 but whose products do not: b * stride_b reaches 3 * 2**30.
    out = torch.zeros(4 * 3, dtype=torch.int64, device=DEVICE)
    stride_b, stride_h = 2**30, 2**28 + 7
    _offset_kernel[(4, 3)](out, stride_b, stride_h)
    expected = [b * stride_b + h * stride_h for b in range(4) for h in range(3)]
    assert out.tolist() == expected
    assert max(expected) > 2**31


def test_gqa_backward_is_bit_identical_across_runs():
    q, k, v = random_qkv(1, 8, 2, 45, 53, 32, seed=0)  # 4 query heads per kv head, ragged tiles
    out, lse = ka.attention_forward(q, k, v, True, 0.2)
    grad_out = torch.randn_like(out)
    first = ka.attention_backward(grad_out, q, k, v, out, lse, True, 0.2)
    second = ka.attention_backward(grad_out, q, k, v, out, lse, True, 0.2)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def grads_float64(q, k, v, grad_out, causal, scale):
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out, _ = reference_attention_with_lse(*leaves, causal, scale)
    return torch.autograd.grad(out, leaves, grad_out.double())


def grads_plain(q, k, v, grad_out, causal, scale):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, _ = reference_attention_with_lse(*leaves, causal, scale, compute_dtype=q.dtype)
    return torch.autograd.grad(out, leaves, grad_out)


def assert_grads_close(got, ref, plain, dtype, what):
    for name, g, r, p in zip(("dq", "dk", "dv"), got, ref, plain, strict=True):
        assert g.dtype == dtype and g.is_contiguous() and torch.isfinite(g).all()
        # A gradient entry that is 0 in float64 (a query row that sees a single key has dq = 0)
        # keeps the rounding of the terms that cancelled: floor at the gradient's own scale.
        floor = rounding_floor(r, dtype) + 4 * torch.finfo(dtype).eps * r.abs().max().item()
        bound = 2 * (p.double() - r).abs().max().item() + floor
        err = (g.double() - r).abs().max().item()
        assert err <= bound, f"{name} {what} {dtype}: error {err:.3g} exceeds {bound:.3g}"


# (Tq, Tk) around the interpreter's tiles: dK/dV's masked-then-unmasked-then-tail query ranges
# and dQ's unmasked-then-diagonal key ranges each get a case where one of them is empty.
BWD_LENGTHS = [(31, 47), (48, 16), (16, 48), (33, 2), (64, 64), (50, 77)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(("tq", "tk"), BWD_LENGTHS)
def test_backward_ranges_match_float64(tq, tk, dtype):
    q, k, v = random_qkv(1, 2, 1, tq, tk, 16, dtype, seed=tq * 100 + tk)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    grad_out = grad_out.transpose(1, 2).contiguous().transpose(1, 2)  # strided, last dim unit
    out, lse = ka.attention_forward(q, k, v, True, 0.25)
    got = ka.attention_backward(grad_out, q, k, v, out, lse, True, 0.25)
    ref = grads_float64(q, k, v, grad_out, True, 0.25)
    plain = grads_plain(q, k, v, grad_out, True, 0.25)
    assert_grads_close(got, ref, plain, dtype, f"({tq}, {tk})")


def test_every_family_and_head_dim_has_configs_that_fit():
    for arch, limit in configs.SMEM_LIMIT.items():
        for kind in configs.TABLES:
            for block_d in (16, 32, 64, 128, 256):
                for elem in (2, 4):
                    rows = configs.select_rows(kind, arch, block_d, elem, limit)
                    assert rows, (kind, arch, block_d, elem)
                    for bm, bn, warps, stages in rows:
                        assert bm >= 16 and bn >= 16 and warps in (4, 8) and stages >= 1


def test_decode_chunks_are_whole_tiles_for_every_config():
    # decode_forward rounds each split's chunk to a multiple of this, so only the last split
    # has a ragged tile.
    for config in configs.DECODE_CONFIGS:
        assert ka._DECODE_CHUNK_ALIGN % config.kwargs["BLOCK_N"] == 0


@pytest.mark.parametrize("tq", [20, 1], ids=["flash", "decode"])
def test_negative_scale(tq):
    # The forward tracks the running max of scale * q.k through |scale| and a sign flip.
    q, k, v = random_qkv(1, 2, 1, tq, 300 if tq == 1 else 33, 16, seed=0)
    out, lse = ka.attention_forward(q, k, v, True, -0.3)
    ref_out, ref_lse = reference_attention_with_lse(q.double(), k.double(), v.double(), True, -0.3)
    plain_out, plain_lse = reference_attention_with_lse(q, k, v, True, -0.3, q.dtype)
    assert_close_2x(out, ref_out, plain_out, q.dtype, "out")
    assert_close_2x(lse, ref_lse, plain_lse, q.dtype, "lse")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got = ka.attention_backward(grad_out, q, k, v, out, lse, True, -0.3)
    ref = grads_float64(q, k, v, grad_out, True, -0.3)
    plain = grads_plain(q, k, v, grad_out, True, -0.3)
    assert_grads_close(got, ref, plain, q.dtype, "negative scale")


@pytest.mark.parametrize("capability", [(8, 0), (9, 0), (8, 6)], ids=["sm80", "sm90", "sm86"])
def test_autotune_pruning_picks_the_device_family(monkeypatch, capability):
    # What the autotuner's early_config_prune returns on each GPU (no GPU needed to ask).
    limit = configs.SMEM_LIMIT.get(capability, 101376)
    monkeypatch.setattr(configs, "_device_limits", lambda t: (capability, limit))
    for dtype, elem in ((torch.bfloat16, 2), (torch.float32, 4)):
        q = torch.empty(1, dtype=dtype)
        for block_d in (64, 128, 256):
            kept = configs.prune_fwd(configs.FWD_CONFIGS, {"Q": q}, BLOCK_D=block_d, HEAD_DIM=1)
            rows = configs.select_rows("fwd", capability, block_d, elem, limit)
            assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept] == [
                (r[0], r[1]) for r in rows
            ]
            assert [(c.num_warps, c.num_stages) for c in kept] == [(r[2], r[3]) for r in rows]
            assert len(kept) == 1 if elem == 4 else len(kept) >= 1


# Scales whose fp32 |scale| * log2(e) is 0 (0, -0.0, a float64 denormal), an fp32 denormal and a
# negative scale: a -inf mask times a zero scale must never turn into NaN.
TINY_SCALES = {"zero": 0.0, "minus_zero": -0.0, "f64_denormal": 5e-324, "f32_denormal": 1e-40}
TINY_SCALES["negative"] = -0.3


@pytest.mark.parametrize("tq", [21, 1], ids=["flash", "decode"])
@pytest.mark.parametrize("scale", list(TINY_SCALES.values()), ids=list(TINY_SCALES))
def test_zero_and_denormal_scales_match_float64(scale, tq):
    # 21 queries over 37 keys: unmasked interior, diagonal and ragged tiles; one query over 300
    # keys takes the split-K decode kernel (3 splits, the last one ragged).
    q, k, v = random_qkv(1, 4, 2, tq, 300 if tq == 1 else 37, 24, seed=3)
    out, lse = ka.attention_forward(q, k, v, True, scale)
    ref_out, ref_lse = reference_attention_with_lse(q.double(), k.double(), v.double(), True, scale)
    plain_out, plain_lse = reference_attention_with_lse(q, k, v, True, scale, q.dtype)
    assert_close_2x(out, ref_out, plain_out, q.dtype, "out")
    assert_close_2x(lse, ref_lse, plain_lse, q.dtype, "lse")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    got = ka.attention_backward(grad_out, q, k, v, out, lse, True, scale)
    ref = grads_float64(q, k, v, grad_out, True, scale)
    plain = grads_plain(q, k, v, grad_out, True, scale)
    assert_grads_close(got, ref, plain, q.dtype, f"scale {scale}")


@pytest.mark.parametrize("split", [1, 2, 4])
def test_gqa_dkdv_split_matches_float64_and_is_deterministic(split):
    # A GQA group of 4 shared by `split` programs per KV head, fp32 partials summed in order.
    q, k, v = random_qkv(1, 8, 2, 29, 43, 24, seed=5)
    out, lse = ka.attention_forward(q, k, v, True, 0.3)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    got = ka.attention_backward(grad_out, q, k, v, out, lse, True, 0.3, dkdv_split=split)
    ref = grads_float64(q, k, v, grad_out, True, 0.3)
    plain = grads_plain(q, k, v, grad_out, True, 0.3)
    assert_grads_close(got, ref, plain, q.dtype, f"split {split}")
    again = ka.attention_backward(grad_out, q, k, v, out, lse, True, 0.3, dkdv_split=split)
    for a, b in zip(got, again, strict=True):
        assert torch.equal(a, b)


def test_dkdv_split_fills_a_small_grid_with_divisors_of_the_group():
    sms = ka._sm_count(DEVICE)
    block_n = ka._DKDV_MAX_BLOCK_N
    # One KV head, one key tile: as many slices as the group allows, up to the SM count.
    assert ka.dkdv_splits(1, 1, 1, block_n, DEVICE) == 1
    assert ka.dkdv_splits(1, 1, 2, block_n, DEVICE) == min(2, sms)
    want = min(sms, 6)
    assert ka.dkdv_splits(1, 1, 6, block_n, DEVICE) == max(d for d in (1, 2, 3, 6) if d <= want)
    # A grid that already fills the GPU is not split.
    assert ka.dkdv_splits(1, sms, 8, block_n, DEVICE) == 1
    q, k, v = random_qkv(1, 6, 2, 5, 5, 16)
    out, lse = ka.attention_forward(q, k, v, True, 0.3)
    with pytest.raises(ValueError, match="must divide the GQA group 3"):
        ka.attention_backward(out, q, k, v, out, lse, True, 0.3, dkdv_split=2)


def test_default_dkdv_split_of_a_small_grid_matches_float64():
    # One KV head, one key tile: the default splits the group of 4 across programs.
    q, k, v = random_qkv(1, 4, 1, 9, 11, 16, seed=7)
    assert ka.dkdv_splits(1, 1, 4, 11, DEVICE) > 1
    out, lse = ka.attention_forward(q, k, v, True, 0.3)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    got = ka.attention_backward(grad_out, q, k, v, out, lse, True, 0.3)
    ref = grads_float64(q, k, v, grad_out, True, 0.3)
    plain = grads_plain(q, k, v, grad_out, True, 0.3)
    assert_grads_close(got, ref, plain, q.dtype, "default split")


@pytest.mark.parametrize("shift", [1e3, 1e5])
def test_large_scores_with_a_soft_softmax_match_float64(shift):
    # Every key shares a large component along q's common direction: scores ~5.6 * shift but the
    # same spread as at shift 0, so p is far from one-hot while lse carries fp32's rounding at
    # that magnitude (the clamp p <= 1 must not cost accuracy here).
    *leaves, grad_out = random_qkv(1, 2, 1, 21, 37, 16, torch.float64, grad_out=True, seed=11)
    q, k, v = leaves
    leaves = [t.float() for t in (q + 1.0, k + shift, v)]
    scores = leaves[0].double() @ leaves[1].double().transpose(-2, -1) / 4
    assert scores.abs().max() > 5 * shift

    def fn(q, k, v):
        return fastgpt.attention(q, k, v, causal=True, backend="triton")

    check_against_float64(fn, leaves, grad_out, True, what=f"shift {shift}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(LSE_CASES))
def test_forward_descriptor_path_matches_pointer_path_and_float64(case, causal):
    # USE_TMA: Q/K/V/O through tensor descriptors (the sm_90 path), forced here; the descriptors
    # pad ragged rows and the padded head dim (D=40 -> 64) with zeros themselves.
    q, k, v = random_qkv(*LSE_CASES[case])
    out, lse = ka.attention_forward(q, k, v, causal, 0.3, use_tma=True)
    ref_out, ref_lse = reference_attention_with_lse(q.double(), k.double(), v.double(), causal, 0.3)
    plain_out, plain_lse = reference_attention_with_lse(q, k, v, causal, 0.3, q.dtype)
    assert_close_2x(out, ref_out, plain_out, q.dtype, f"{case} out")
    assert_close_2x(lse, ref_lse, plain_lse, q.dtype, f"{case} lse")
    out_ptr, lse_ptr = ka.attention_forward(q, k, v, causal, 0.3, use_tma=False)
    assert torch.equal(out, out_ptr) and torch.equal(lse, lse_ptr)


def test_forward_descriptor_path_reads_strided_views():
    # q, k, v as views of one packed (B, T, 3, H, D) projection: row stride 3 * H * D.
    B, T, H, D = 2, 37, 2, 32
    qkv = random_qkv(B, 1, 1, T, 1, 3 * H * D, seed=9)[0]  # (B, 1, T, 3 * H * D)
    q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    assert all(ka.descriptor_aligned(t) for t in (q, k, v)) and not q.is_contiguous()
    out, lse = ka.attention_forward(q, k, v, True, D**-0.5, use_tma=True)
    out_ptr, lse_ptr = ka.attention_forward(q, k, v, True, D**-0.5, use_tma=False)
    assert torch.equal(out, out_ptr) and torch.equal(lse, lse_ptr)


def test_descriptor_alignment_rules():
    x = torch.zeros(1, 2, 8, 64, dtype=torch.float16, device=DEVICE)
    assert ka.descriptor_aligned(x)
    assert not ka.descriptor_aligned(x.flatten()[1:513].view(1, 1, 8, 64))  # pointer off by 2 B
    assert not ka.descriptor_aligned(x.transpose(-2, -1))  # last dim not contiguous
    assert not ka.descriptor_aligned(torch.zeros(1, 2, 8, 20, dtype=torch.float16))  # 40 B rows
    assert ka.descriptor_aligned(torch.zeros(1, 2, 8, 20, dtype=torch.float32))  # 80 B rows
    if DEVICE.type == "cpu":  # the auto choice: pointer loads off sm_90
        assert not ka.tma_ok(x, x, x, x)


@pytest.mark.parametrize("tq, tk, split", [(70, 70, 1), (33, 81, 2), (81, 33, 1)])
def test_backward_descriptor_path_matches_pointer_path_and_float64(tq, tk, split):
    # dK/dV and dQ with Q/dO/K/V loads and dK/dV/dQ stores (fp32 partials with split 2) through
    # tensor descriptors, forced; D=40 pads to 64; GQA group 2.
    q, k, v = random_qkv(1, 4, 2, tq, tk, 40, seed=12)
    out, lse = ka.attention_forward(q, k, v, True, 0.3)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    args = (grad_out, q, k, v, out, lse, True, 0.3, split)
    got = ka.attention_backward(*args, use_tma=True)
    ref = grads_float64(q, k, v, grad_out, True, 0.3)
    plain = grads_plain(q, k, v, grad_out, True, 0.3)
    assert_grads_close(got, ref, plain, q.dtype, f"descriptors {tq} x {tk}")
    ptr = ka.attention_backward(*args, use_tma=False)
    for a, b in zip(got, ptr, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scale", [0.125, -0.3, 0.0, 1e-40, 1e10], ids=str)
def test_base2_lse_turns_p_into_one_fma_of_the_raw_product(scale):
    """The backward's p = exp2(q.k * qk_scale - lse2) is exp(scale * q.k - lse): qk_scale is
    fl(scale log2 e) with scale's sign, lse2 is lse times qk_scale / scale rounded once per row
    (log2 e where qk_scale is not a normal fp32), +inf rows stay +inf, the cap scales alike."""
    lse = torch.tensor([[789.25, -3.5, float("inf"), 0.0]])
    lse2, qk_scale, cap_out = ka.base2_lse(lse, scale, softcap=30.0)
    assert lse2.dtype == torch.float32 and lse2.shape == lse.shape
    log2e = 1.4426950408889634
    c2 = torch.tensor(abs(scale) * log2e, dtype=torch.float32).item()
    assert qk_scale == (c2 if scale >= 0 else -c2)
    normal = c2 >= torch.finfo(torch.float32).tiny
    ratio = c2 / torch.tensor(abs(scale), dtype=torch.float32).item() if normal else log2e
    assert torch.equal(lse2, (lse.double() * ratio).float())  # one rounding, in fp64
    assert lse2[0, 2] == float("inf")
    assert abs(ratio - log2e) <= 1e-7 * log2e  # the base is 2 up to fl(scale log2 e)'s rounding
    assert cap_out == torch.tensor(30.0 * ratio, dtype=torch.float32).item()
    # The exponent it gives, in fp64: q.k * qk_scale - lse2 = ratio * (scale * q.k - lse).
    qk = torch.tensor([6000.0, -1.0, 0.5], dtype=torch.float64)
    s = scale * qk
    top = lse2[0, 0]
    got = qk * qk_scale - top.double()
    want = ratio * (s - lse[0, 0].double())
    half_ulp = (torch.nextafter(top, torch.tensor(float("inf"))) - top).item() / 2
    fp64_error = 4 * 2.0**-52 * ((qk * qk_scale).abs() + top.abs().item())
    assert ((got - want).abs() <= half_ulp + fp64_error).all(), (got - want).abs().max()
