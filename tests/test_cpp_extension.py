"""The C++ extension's ops called directly: gradcheck in float64, lse, both backward schedules,
strided inputs, clear errors, memory that grows with T rather than T^2, and fastgpt without it.

The shared correctness matrix (every dtype and shape family against float64) runs the cpp backend
through fastgpt.attention in tests/test_attention.py; opcheck is in tests/test_ops.py.
"""

import subprocess
import sys
import textwrap

import pytest
import torch

import fastgpt  # registers fake implementations and autograd for the ops
from fastgpt import _extension
from fastgpt.reference import reference_attention_with_lse

needs_cpp = pytest.mark.skipif(
    not _extension.cpp_available(), reason=f"fastgpt._C not built ({_extension.load_error})"
)

DEVICES = ["cpu"] + (
    ["cuda"] if torch.cuda.is_available() and _extension.cpp_supports("cuda") else []
)


def forward(q, k, v, causal, scale):
    return torch.ops.fastgpt.cpp_attention_forward(q, k, v, causal, scale)


def draw(*shape, device="cpu", dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)


# (B, H, Hkv, Tq, Tk, D): small enough for gradcheck's finite differences.
GRADCHECK_CASES = {
    "square": (1, 2, 2, 6, 6, 4),
    "gqa": (2, 4, 2, 5, 5, 3),
    "mqa_Tq_lt_Tk": (1, 3, 1, 3, 7, 5),
    "Tq_gt_Tk_rows_without_keys": (1, 2, 1, 7, 3, 4),
    "one_key": (1, 1, 1, 1, 1, 2),
}


@needs_cpp
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gradcheck_float64(device, case, causal):
    B, H, Hkv, Tq, Tk, D = GRADCHECK_CASES[case]
    q = draw(B, H, Tq, D, device=device).requires_grad_()
    k = draw(B, Hkv, Tk, D, device=device, seed=1).requires_grad_()
    v = draw(B, Hkv, Tk, D, device=device, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v: forward(q, k, v, causal, 0.7)[0], (q, k, v))


def check_close_to_reference(q, k, v, causal, scale, grad_out, atol):
    out, lse = forward(q, k, v, causal, scale)
    ref_out, ref_lse = reference_attention_with_lse(q, k, v, causal, scale)
    assert out.is_contiguous() and out.dtype == q.dtype and out.shape == q.shape
    assert lse.shape == q.shape[:3] and lse.dtype == ref_lse.dtype
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=0)
    # lse: equal where finite, +inf exactly where the row sees no key
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert (lse[torch.isinf(lse)] > 0).all()
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=atol, rtol=0)

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(
        reference_attention_with_lse(*leaves, causal, scale)[0], leaves, grad_out
    )
    grads = torch.ops.fastgpt.cpp_attention_backward(grad_out, q, k, v, out, lse, causal, scale)
    for name, got, ref, like in zip("qkv", grads[:3], ref_grads, (q, k, v), strict=True):
        assert got.is_contiguous() and got.shape == like.shape, f"d{name} layout"
        torch.testing.assert_close(got, ref, atol=atol, rtol=0, msg=lambda m, n=name: f"d{n}: {m}")


# Lengths that cross the CPU tiles (64 query rows, 256 keys) with ragged tails.
@needs_cpp
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape", [(1, 2, 1, 300, 600, 32), (2, 2, 2, 600, 300, 16), (1, 4, 2, 257, 257, 8)], ids=str
)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("threads", [1, 2])
def test_tiles_and_both_backward_schedules(device, shape, causal, threads):
    # With 2 threads, B * Hkv = 1 takes the two-pass backward and B * Hkv = 2 or 4 the fused one.
    B, H, Hkv, Tq, Tk, D = shape
    q, k, v = draw(B, H, Tq, D), draw(B, Hkv, Tk, D, seed=1), draw(B, Hkv, Tk, D, seed=2)
    grad_out = draw(B, H, Tq, D, seed=3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        args = [t.to(device) for t in (q, k, v)]
        check_close_to_reference(*args, causal, D**-0.5, grad_out.to(device), atol=1e-10)
    finally:
        torch.set_num_threads(before)


@needs_cpp
@pytest.mark.parametrize("device", DEVICES)
def test_strided_views_and_expanded_grad(device):
    # nanoGPT layout: q, k, v are transposed slices of one (B, T, 3C) projection.
    B, T, H, D = 2, 70, 3, 16
    qkv = draw(B, T, 3 * H * D, device=device)
    q, k, v = (t.unflatten(-1, (H, D)).transpose(1, 2) for t in qkv.split(H * D, dim=-1))
    assert not q.is_contiguous() and q.stride(-1) == 1
    out, lse = forward(q, k, v, True, 0.25)
    ref_out, _ = forward(q.contiguous(), k.contiguous(), v.contiguous(), True, 0.25)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    # out.sum().backward() hands the backward a grad_out with all strides 0.
    grad_out = torch.ones(1, device=device, dtype=q.dtype).expand_as(out)
    check_close_to_reference(q, k, v, True, 0.25, grad_out, atol=1e-10)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_low_precision_outputs_keep_dtype_and_fp32_lse(dtype):
    q, k, v = (draw(1, 2, 33, 16, dtype=dtype, seed=s) for s in range(3))
    out, lse = forward(q, k, v, True, 0.25)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = reference_attention_with_lse(q.double(), k.double(), v.double(), True, 0.25)
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-6}[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=0)


@needs_cpp
def test_empty_inputs():
    q, k = torch.zeros(0, 2, 5, 8), torch.zeros(0, 2, 5, 8)
    out, lse = forward(q, k, k, True, 1.0)
    assert out.shape == (0, 2, 5, 8) and lse.shape == (0, 2, 5)
    q, k = torch.randn(1, 2, 3, 8), torch.zeros(1, 2, 0, 8)  # no keys at all
    out, lse = forward(q, k, k, False, 1.0)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isinf(lse).all()


BAD_INPUTS = {
    "rank": ((2, 8, 16), (1, 2, 8, 16), ValueError, "4-d q, k, v"),
    "head_dim": ((1, 2, 8, 16), (1, 2, 8, 32), ValueError, "same head dim"),
    "heads": ((1, 3, 8, 16), (1, 2, 8, 16), ValueError, "multiple of the key-value heads"),
    "batch": ((2, 2, 8, 16), (1, 2, 8, 16), ValueError, "same batch"),
    "too_wide": ((1, 2, 8, 300), (1, 2, 8, 300), ValueError, "head dims 1..256"),
}


@needs_cpp
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_shapes_raise_one_sentence(case):
    q_shape, k_shape, error, words = BAD_INPUTS[case]
    q, k = torch.randn(q_shape), torch.randn(k_shape)
    with pytest.raises(error, match=words) as info:
        forward(q, k, k, True, 1.0)
    assert str(q_shape[-1]) in str(info.value)  # the message names the shapes


@needs_cpp
def test_bad_dtypes_raise_type_error():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(TypeError, match="one dtype"):
        forward(q, q.double(), q, True, 1.0)
    with pytest.raises(TypeError, match="floating-point"):
        forward(q.int(), q.int(), q.int(), True, 1.0)
    out, lse = forward(q, q, q, True, 1.0)
    with pytest.raises(TypeError, match="lse in Float"):
        torch.ops.fastgpt.cpp_attention_backward(q, q, q, q, out, lse.double(), True, 1.0)
    with pytest.raises(ValueError, match="lse of shape"):
        torch.ops.fastgpt.cpp_attention_backward(q, q, q, q, out, lse[:, :, :4], True, 1.0)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_double_backward_raises_on_every_compiled_backend(backend):
    # Second-order gradients would need a derivative of the backward kernel, which neither
    # compiled backend has: differentiating the backward raises, it never returns a wrong number.
    if backend not in fastgpt.available_backends("cpu"):
        pytest.skip(f"backend {backend} is not available on the CPU")
    q, k, v = (draw(1, 2, 5, 4, dtype=torch.float32, seed=s).requires_grad_() for s in range(3))
    out = fastgpt.attention(q, k, v, causal=True, backend=backend)
    dq, dk, dv = torch.autograd.grad((out**2).sum(), (q, k, v), create_graph=True)
    # create_graph alone is fine: the first-order gradients are the usual ones, bit for bit.
    plain = torch.autograd.grad((out.detach() * 2 * out).sum(), (q, k, v))
    for got, want in zip((dq, dk, dv), plain, strict=True):
        assert torch.equal(got, want)
    for grad in (dq, dk, dv):
        with pytest.raises(RuntimeError, match=f"The {backend} backend has no double backward"):
            torch.autograd.grad(grad.square().sum(), (q, k, v))


@needs_cpp
def test_memory_grows_linearly_with_length():
    # fp32 forward + backward at T = 4096: the (T, T) score matrix alone would be 64 MiB.
    T, D = 4096, 64
    q, k, v = (torch.randn(1, 1, T, D) for _ in range(3))
    with torch.profiler.profile(profile_memory=True) as prof:
        out, lse = forward(q, k, v, True, D**-0.5)
        torch.ops.fastgpt.cpp_attention_backward(out, q, k, v, out, lse, True, D**-0.5)
    # Each allocation by the ops' ATen children (freed or not): none may be (T, T). In all, the
    # (T, D) buffers are out and packed K (forward), dq, dk, dv, packed K and V (backward).
    children = [e for e in prof.events() if not e.name.startswith("fastgpt::")]
    allocations = [e.cpu_memory_usage for e in children if e.cpu_memory_usage > 0]
    tensor_bytes = T * D * 4
    assert allocations and max(allocations) <= tensor_bytes, f"largest: {max(allocations)} bytes"
    assert sum(allocations) <= 8 * tensor_bytes, f"{sum(allocations) / 2**20:.1f} MiB allocated"


def test_import_without_the_extension_warns_once_and_falls_back():
    # A fresh interpreter where `fastgpt._C` cannot be imported, as after FASTGPT_NO_EXTENSION=1.
    script = textwrap.dedent(
        """
        import importlib.abc, sys, warnings

        class NoExtension(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "fastgpt._C":
                    raise ImportError("fastgpt._C blocked for the test")

        sys.meta_path.insert(0, NoExtension())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastgpt
            import fastgpt._extension
            import fastgpt.ops  # already imported: must not warn again
        messages = [str(w.message) for w in caught if "C++ extension" in str(w.message)]
        assert len(messages) == 1 and "blocked for the test" in messages[0], messages
        assert not fastgpt._extension.cpp_available()
        assert not fastgpt._extension.cpp_supports("cpu")
        assert "cpp" not in fastgpt.available_backends("cpu")
        import torch
        q = torch.randn(1, 2, 5, 8)
        assert fastgpt.attention(q, q, q).shape == q.shape  # the reference path runs
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
