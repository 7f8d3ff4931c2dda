"""The float64 oracle and the error rule every kernel test uses.

Rule (as flash-attn's own tests): a kernel's max error against float64 attention is at most twice
the error of plain PyTorch attention computed in the kernel's dtype, plus the rounding floor of
that dtype at the tensor's magnitude.
"""

import os

import torch

from fastgpt.reference import reference_attention_with_lse

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def rounding_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """2x the rounding error of `dtype` around the values of `ref` (flash-attn's atol)."""
    low = ref.to(dtype)
    return 2 * ((low + 0.3 - 0.3) - low).abs().max().item() + 2 * torch.finfo(dtype).tiny


def run_attention(fn, leaves, views, grad_out, dtype):
    """Cast leaf tensors to `dtype`, build q, k, v with `views`, run `fn`, return out and grads."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in leaves]
    out = fn(*views(*leaves))
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


def check_against_float64(fn, leaves, views, grad_out, causal, scale=None, what=""):
    """Assert fn's output and leaf gradients satisfy the 2x-of-PyTorch rule against float64."""
    dtype = leaves[0].dtype

    def oracle(q, k, v):
        return reference_attention_with_lse(q, k, v, causal, scale)[0]

    def plain(q, k, v):
        return reference_attention_with_lse(q, k, v, causal, scale, compute_dtype=q.dtype)[0]

    ref_out, ref_grads = run_attention(oracle, leaves, views, grad_out, torch.float64)
    pt_out, pt_grads = run_attention(plain, leaves, views, grad_out, dtype)
    out, grads = run_attention(fn, leaves, views, grad_out, dtype)

    names = ["out"] + [f"grad of leaf {i}" for i in range(len(grads))]
    for name, got, pt, ref in zip(
        names, [out, *grads], [pt_out, *pt_grads], [ref_out, *ref_grads], strict=True
    ):
        assert got.shape == ref.shape, f"{what} {name}: shape {tuple(got.shape)} != {ref.shape}"
        assert got.dtype == dtype, f"{what} {name}: dtype {got.dtype} != {dtype}"
        assert torch.isfinite(got).all(), (
            f"{what} {name}: {(~torch.isfinite(got)).sum()} non-finite"
        )
        err = (got.double() - ref).abs()
        pt_err = (pt.double() - ref).abs().max().item()
        bound = 2 * pt_err + rounding_floor(ref, dtype)
        worst = err.argmax()
        assert err.max().item() <= bound, (
            f"{what} {name}: max error {err.max().item():.3g} at index "
            f"{[int(i) for i in torch.unravel_index(worst, err.shape)]} exceeds {bound:.3g} "
            f"(plain PyTorch {dtype} error {pt_err:.3g}); {int((err > bound).sum())} elements over"
        )
