"""The float64 oracle and the error rule every kernel test uses.

Rule (as flash-attn's own tests): a kernel's max error against float64 attention is at most twice
the error of plain PyTorch attention computed in the kernel's dtype, plus the rounding floor of
that dtype at the tensor's magnitude.

Gradients get one more, elementwise, floor: the first-order rounding of the flash backward itself
(see flash_backward_floor). Plain PyTorch differentiates softmax directly and never forms those
terms, so where the exact gradient cancels to ~0 (one visible key: dq = 0) its error is 0 while
any LSE-based backward keeps a few ulps of the terms that cancelled.
"""

from collections.abc import Callable

import torch

import fastgpt
from fastgpt.envflags import env_flag
from fastgpt.reference import causal_mask, reference_attention_with_lse

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu" and env_flag("TRITON_INTERPRET")
# The model tests' CPU paths: "reference", and "cpp" when the extension is built (Triton
# interpreted on CPU is the kernel tests' business, far too slow for models).
CPU_BACKENDS = [b for b in ("reference", "cpp") if b in fastgpt.available_backends("cpu")]
# Every backend that runs here (the Triton kernels interpreted on a CPU without a GPU).
DEVICE_BACKENDS = [
    (device, backend)
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for backend in fastgpt.available_backends(device)
]
F64 = dict(atol=1e-10, rtol=1e-10)  # float64 against float64: the same numbers up to rounding


def random_tensors(
    *shapes: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = DEVICE,
    seed: int = 0,
    magnitude: float = 1.0,
    requires_grad: bool = False,
) -> list[torch.Tensor]:
    """One tensor per shape, normal draws times `magnitude`, made in float64 on the CPU from one
    seeded generator (the same numbers on every device and in every dtype), then cast."""
    g = torch.Generator().manual_seed(seed)
    draws = [torch.randn(s, generator=g, dtype=torch.float64) * magnitude for s in shapes]
    return [t.to(device, dtype).requires_grad_(requires_grad) for t in draws]


def random_qkv(
    B: int,
    H: int,
    Hkv: int,
    Tq: int,
    Tk: int,
    D: int,
    dtype: torch.dtype = torch.float32,
    *,
    seed: int | None = None,
    grad_out: bool = False,
    **kwargs,
) -> list[torch.Tensor]:
    """The tests' input maker: q (B, H, Tq, D), k and v (B, Hkv, Tk, D), and with grad_out=True a
    fourth tensor (B, H, Tq, D) for the output's gradient. seed defaults to one derived from the
    shape; other keywords (device, magnitude, requires_grad) go to random_tensors."""
    if seed is None:
        seed = B * 1000003 + H * 1009 + Tq * 31 + Tk * 7 + D
    shapes = [(B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D)] + [(B, H, Tq, D)] * grad_out
    return random_tensors(*shapes, dtype=dtype, seed=seed, **kwargs)


def rounding_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """2x the rounding error of `dtype` around the values of `ref` (flash-attn's atol)."""
    low = ref.to(dtype)
    return 2 * ((low + 0.3 - 0.3) - low).abs().max().item() + 2 * torch.finfo(dtype).tiny


def flash_backward_floor(q, k, v, grad_out, causal, scale, dtype):
    """Elementwise first-order rounding bound of a flash-style backward in `dtype`: (fq, fk, fv).

    The backward recomputes p = exp(s - lse) from a stored lse (relative error eps * (1 + |lse|))
    and forms ds = p * (dp - delta) with dp = dO . v and delta = rowsum(dO * O), two sums of the
    same products in different order (absolute error eps * sum_d |dO_d v_d|). Propagated:
        dq = scale * ds @ k,   dk = scale * ds^T @ q,   dv = p^T @ dO.
    Computed in float64 from float64 inputs; q (B, H, Tq, D), k, v (B, Hkv, Tk, D).
    """
    eps = torch.finfo(dtype).eps
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    group = H // Hkv
    k_, v_ = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (B, H, Tk, D)
    s = scale * q @ k_.transpose(-2, -1)  # (B, H, Tq, Tk)
    if causal:
        s = s.masked_fill(~causal_mask(Tq, Tk, q.device), float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)  # (B, H, Tq, 1)
    p = torch.exp(s - lse).nan_to_num(0.0)  # rows that see no key: 0
    rel_p = eps * (1 + lse.abs().nan_to_num(0.0, posinf=0.0))  # (B, H, Tq, 1)
    out = p @ v_  # (B, H, Tq, D)
    dp = grad_out @ v_.transpose(-2, -1)  # (B, H, Tq, Tk)
    delta = (grad_out * out).sum(-1, keepdim=True)  # (B, H, Tq, 1)
    dp_err = eps * (grad_out.abs() @ v_.abs().transpose(-2, -1))  # (B, H, Tq, Tk)
    ds_err = p * (rel_p * (dp - delta).abs() + dp_err)  # (B, H, Tq, Tk)
    fq = scale * ds_err @ k_.abs()  # (B, H, Tq, D)
    fk = scale * ds_err.transpose(-2, -1) @ q.abs()  # (B, H, Tk, D)
    fv = (p * rel_p).transpose(-2, -1) @ grad_out.abs()  # (B, H, Tk, D)
    return fq, fk.unflatten(1, (Hkv, group)).sum(2), fv.unflatten(1, (Hkv, group)).sum(2)


def leaf_floors(leaves, views, grad_out, floors_of: Callable) -> list[torch.Tensor | None]:
    """floors_of(q, k, v, grad_out) -> (fq, fk, fv), all float64, mapped from q, k, v back onto
    the leaf tensors they are views of (None for a leaf none of them reads)."""
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    qkv = views(*leaves64)
    floors = floors_of(*[t.detach() for t in qkv], grad_out.double())
    return list(torch.autograd.grad(qkv, leaves64, floors, allow_unused=True))


def assert_within_bounds(what, dtype, got, plain, exact, floors) -> None:
    """The rule on each result: got (in dtype) is at most 2x plain PyTorch's (in dtype) error
    against exact (float64), plus the rounding floor and the elementwise floor (None: 0).

    got, plain, exact, floors: lists in one order, the output then the leaves' gradients.
    """
    names = ["out"] + [f"grad of leaf {i}" for i in range(len(got) - 1)]
    for name, out, pt, ref, floor in zip(names, got, plain, exact, floors, strict=True):
        assert out.shape == ref.shape, f"{what} {name}: shape {tuple(out.shape)} != {ref.shape}"
        assert out.dtype == dtype, f"{what} {name}: dtype {out.dtype} != {dtype}"
        assert torch.isfinite(out).all(), (
            f"{what} {name}: {(~torch.isfinite(out)).sum()} non-finite"
        )
        if ref.numel() == 0:
            continue  # nothing to compare beyond the shape and dtype
        err = (out.double() - ref).abs()
        pt_err = (pt.double() - ref).abs().max().item()
        bound = 2 * pt_err + rounding_floor(ref, dtype) + (0 if floor is None else floor)
        over = err > bound
        worst = (err - bound).argmax()
        assert not over.any(), (
            f"{what} {name}: error {err.flatten()[worst].item():.3g} at index "
            f"{[int(i) for i in torch.unravel_index(worst, err.shape)]} exceeds its bound "
            f"{bound.flatten()[worst].item():.3g} (plain PyTorch {dtype} error {pt_err:.3g}, "
            f"max error {err.max().item():.3g}); {int(over.sum())} of {err.numel()} elements over"
        )


def run_attention(fn, leaves, views, grad_out, dtype):
    """Cast leaf tensors to `dtype`, build q, k, v with `views`, run `fn`, return out and grads."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in leaves]
    out = fn(*views(*leaves))
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


def check_against_float64(
    fn: Callable,
    leaves: list[torch.Tensor],
    grad_out: torch.Tensor,
    causal: bool,
    *,
    views: Callable | None = None,
    scale: float | None = None,
    what: str = "",
) -> None:
    """Assert fn's output and leaf gradients satisfy the 2x-of-PyTorch rule against float64.

    fn(q, k, v) runs on views(*leaves) (q, k, v built from the leaf tensors, e.g. as views of one
    projection); without views the leaves are q, k, v themselves.
    """
    dtype = leaves[0].dtype

    def oracle(q, k, v):
        return reference_attention_with_lse(q, k, v, causal, scale)[0]

    def plain(q, k, v):
        return reference_attention_with_lse(q, k, v, causal, scale, compute_dtype=q.dtype)[0]

    def floors_of(q, k, v, grad_out):
        return flash_backward_floor(q, k, v, grad_out, causal, scale, dtype)

    check_rule(fn, oracle, plain, floors_of, leaves, grad_out, views, what)


def check_rule(fn, oracle, plain, floors_of, leaves, grad_out, views, what) -> None:
    """The rule, whatever the layout: fn and plain (PyTorch in the leaves' dtype) on views(*leaves)
    (the leaves themselves without views) against oracle in float64, with the elementwise
    backward floors of floors_of(q, k, v, grad_out) -> (fq, fk, fv)."""
    dtype = leaves[0].dtype
    views = views or (lambda *qkv: qkv)
    ref_out, ref_grads = run_attention(oracle, leaves, views, grad_out, torch.float64)
    pt_out, pt_grads = run_attention(plain, leaves, views, grad_out, dtype)
    out, grads = run_attention(fn, leaves, views, grad_out, dtype)
    floors = leaf_floors(leaves, views, grad_out, floors_of)
    assert_within_bounds(
        what, dtype, [out, *grads], [pt_out, *pt_grads], [ref_out, *ref_grads],
        [torch.zeros_like(ref_out), *floors],
    )  # fmt: skip
