"""Every backend of fastgpt.attention against float64 attention: outputs and dq, dk, dv.

The same cases run on each backend: odd lengths, Tq != Tk in both directions (rows that see no key
included), GQA and MQA, every supported head-dim family, non-contiguous nanoGPT-style views, and
scores around 1e3 that would overflow a naive exp. On a CPU-only machine "triton" runs under the
Triton interpreter (fp32 and fp16: the interpreter computes bf16 tl.dot wrongly); on a GPU it runs
compiled with bf16 included.
"""

import os

import pytest
import torch
from oracle import DEVICE, INTERPRETED, check_against_float64, random_qkv

import fastgpt
from fastgpt.attention import BACKENDS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def backend_or_skip(backend: str, dtype: torch.dtype = torch.float32) -> None:
    if backend not in fastgpt.available_backends(DEVICE):
        pytest.skip(f"backend {backend} is not available on {DEVICE}")
    if backend == "triton" and INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly; bf16 runs on a GPU")


def test_every_backend_is_available_in_ci():
    # CI builds the extension and installs triton: nothing in this file may be skipped there.
    if os.environ.get("CI"):
        assert fastgpt.available_backends(DEVICE) == list(BACKENDS)


# (B, H, Hkv, Tq, Tk, D): each family hits one path of the kernels.
CASES = {
    # odd lengths: one partial block, several blocks with a ragged tail
    "T1": (1, 2, 2, 1, 1, 64),
    "T17": (2, 2, 2, 17, 17, 64),
    "T97": (1, 3, 3, 97, 97, 64),
    "T257": (1, 2, 2, 257, 257, 64),
    # fewer queries than keys (KV-cache prefill / decoding) and more (rows that see no key)
    "Tq17_Tk97": (2, 2, 2, 17, 97, 32),
    "Tq97_Tk17": (2, 2, 2, 97, 17, 32),
    "decode_Tk257": (2, 4, 4, 1, 257, 64),
    # grouped and multi-query heads
    "gqa": (2, 4, 2, 33, 33, 32),
    "mqa": (1, 4, 1, 65, 47, 64),
    "gqa_decode": (1, 8, 2, 1, 300, 64),
    # head dims: padded inside the kernel
    **{f"D{d}": (1, 2, 1, 40, 40, d) for d in (1, 16, 32, 40, 59, 64, 80, 128, 256)},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64(backend, dtype, causal, case):
    backend_or_skip(backend, dtype)
    *leaves, grad_out = random_qkv(*CASES[case], torch.float64, grad_out=True)
    leaves = [t.to(dtype) for t in leaves]

    def fn(q, k, v):
        return fastgpt.attention(q, k, v, causal=causal, backend=backend)

    check_against_float64(fn, leaves, grad_out, causal, what=f"{backend} {case}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence(backend, dtype):
    backend_or_skip(backend, dtype)
    *leaves, grad_out = random_qkv(1, 1, 1, 1025, 1025, 64, torch.float64, grad_out=True)
    leaves = [t.to(dtype) for t in leaves]

    def fn(q, k, v):
        return fastgpt.attention(q, k, v, backend=backend)

    check_against_float64(fn, leaves, grad_out, True, what=f"{backend} T1025")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nanogpt_layout_views_without_copies(backend, dtype):
    """q, k, v as transposed views of one (B, T, 3C) projection, and a non-contiguous grad."""
    backend_or_skip(backend, dtype)
    B, T, H, D = 2, 37, 4, 32
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, 3 * H * D, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    grad_out = torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(DEVICE).transpose(1, 2)

    def views(qkv):
        q, k, v = qkv.split(H * D, dim=2)  # (B, T, C) each
        return [t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v)]  # (B, H, T, D) views

    assert not views(qkv)[0].is_contiguous()

    def fn(q, k, v):
        return fastgpt.attention(q, k, v, backend=backend)

    check_against_float64(fn, [qkv], grad_out, True, views=views, what=f"{backend} views")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa_packed_views_and_sliced_heads(backend):
    """GQA with k, v sliced out of a bigger tensor: strides on every axis differ from contiguous."""
    backend_or_skip(backend)
    B, T, H, Hkv, D = 2, 29, 6, 2, 16
    g = torch.Generator().manual_seed(1)
    q_big = torch.randn(B, H, T, 2 * D, generator=g, dtype=torch.float64).to(DEVICE)
    kv_big = torch.randn(B, T, 2, Hkv + 1, D, generator=g, dtype=torch.float64).to(DEVICE)
    grad_out = torch.randn(B, H, T, D, generator=g, dtype=torch.float64).to(DEVICE)
    leaves = [q_big.float(), kv_big.float()]

    def views(q_big, kv_big):
        q = q_big[..., :D]  # (B, H, T, D), row stride 2D
        k = kv_big[:, :, 0, 1:].transpose(1, 2)  # (B, Hkv, T, D)
        v = kv_big[:, :, 1, :Hkv].transpose(1, 2)
        return q, k, v

    def fn(q, k, v):
        return fastgpt.attention(q, k, v, backend=backend)

    check_against_float64(fn, leaves, grad_out, True, views=views, what=f"{backend} gqa views")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_scores_do_not_overflow(backend, dtype, causal):
    """Scores near 1e3: exp would overflow without the running max of the online softmax."""
    backend_or_skip(backend, dtype)
    *leaves, grad_out = random_qkv(1, 2, 2, 70, 70, 64, torch.float64, grad_out=True)
    q, k, v = leaves
    leaves = [(q * 14).to(dtype), (k * 14).to(dtype), v.to(dtype)]
    scores = (leaves[0].double() @ leaves[1].double().transpose(-2, -1)) / 8
    assert scores.abs().max() > 500  # the case really is extreme

    def fn(q, k, v):
        return fastgpt.attention(q, k, v, causal=causal, backend=backend)

    check_against_float64(fn, leaves, grad_out, causal, what=f"{backend} extreme")


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_scale(backend):
    backend_or_skip(backend)
    *leaves, grad_out = random_qkv(1, 2, 1, 20, 33, 16, torch.float64, grad_out=True)
    leaves = [t.float() for t in leaves]

    def fn(q, k, v):
        return fastgpt.attention(q, k, v, scale=0.3, backend=backend)

    check_against_float64(fn, leaves, grad_out, True, scale=0.3, what="scale")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_visible_keys_are_zero_with_zero_grads(backend):
    backend_or_skip(backend)
    *leaves, grad_out = random_qkv(1, 2, 2, 9, 4, 16, torch.float64, grad_out=True)
    q, k, v = [t.float().requires_grad_() for t in leaves]
    out = fastgpt.attention(q, k, v, causal=True, backend=backend)  # rows 0..4 see no key
    out.backward(grad_out.float())
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert out[:, :, 5:].abs().sum() > 0
    assert torch.equal(q.grad[:, :, :5], torch.zeros_like(q.grad[:, :, :5]))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# Finite extremes (README: finite inputs always give finite outputs). (magnitude of q and k,
# magnitude of v, scale): scores near 1e5 and values near 1e4; a scale of 1e6 (scores near 1e7,
# one-hot rows); 1e-30 (uniform rows). Tq > Tk: the first rows see no key and must be exact zeros.
# Larger scores: see test_triton_gradients_at_huge_scores below.
EXTREMES = {
    "large": (100.0, 1e4, None),
    "huge_scale": (1.0, 1.0, 1e6),
    "tiny_scale": (1.0, 1.0, 1e-30),
}


@pytest.mark.parametrize("case", list(EXTREMES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_extreme_inputs_give_finite_outputs_and_grads(backend, case):
    backend_or_skip(backend)
    qk_mag, v_mag, scale = EXTREMES[case]
    q, k, v, grad_out = random_qkv(1, 2, 1, 12, 7, 16, grad_out=True)  # rows 0..4 see no key
    q, k, v = [t.requires_grad_() for t in (q * qk_mag, k * qk_mag, v * v_mag)]
    out = fastgpt.attention(q, k, v, causal=True, scale=scale, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for name, t in zip(("out", "dq", "dk", "dv"), (out, *grads), strict=True):
        assert torch.isfinite(t).all(), f"{backend} {case}: {name} has non-finite values"
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert torch.equal(grads[0][:, :, :5], torch.zeros_like(grads[0][:, :, :5]))
    want = fastgpt.reference_attention(q.double(), k.double(), v.double(), True, scale)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4 * v_mag)


def test_triton_gradients_at_huge_scores():
    # Scores ~1e10: the fp32 lse is rounded by more than 128, so the backward's p = exp2(s - lse)
    # would overflow without its clamp at p <= 1.
    backend_or_skip("triton")
    q, k, v, grad_out = random_qkv(1, 2, 1, 12, 7, 16, grad_out=True)
    q, k, v = [t.requires_grad_() for t in (q, k, v)]
    out = fastgpt.attention(q, k, v, causal=True, scale=1e10, backend="triton")
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out, (q, k, v), grad_out))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    backend_or_skip(backend)
    for q_shape, k_shape in [((0, 2, 5, 8), (0, 2, 5, 8)), ((1, 2, 5, 8), (1, 2, 0, 8))]:
        q = torch.randn(q_shape, device=DEVICE, requires_grad=True)
        k = torch.randn(k_shape, device=DEVICE, requires_grad=True)
        v = torch.randn(k_shape, device=DEVICE, requires_grad=True)
        out = fastgpt.attention(q, k, v, backend=backend)
        assert out.shape == q_shape
        assert torch.equal(out, torch.zeros(q_shape, device=DEVICE))
        out.sum().backward()
        assert q.grad.shape == q_shape


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_backward_is_deterministic(backend):
    backend_or_skip(backend)
    # GQA: 4 query heads per kv head
    *leaves, grad_out = random_qkv(2, 8, 2, 70, 70, 32, torch.float64, grad_out=True)
    runs = []
    for _ in range(2):
        q, k, v = [t.float().requires_grad_() for t in leaves]
        fastgpt.attention(q, k, v, backend=backend).backward(grad_out.float())
        runs.append([q.grad, k.grad, v.grad])
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


def test_default_scale_and_reference_semantics():
    """Reference against torch SDPA, which has the same semantics when Tq == Tk."""
    q, k, v = random_qkv(2, 4, 4, 23, 23, 40, torch.float64)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = fastgpt.attention(q, k, v, backend="reference")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
