"""torch.library registration of fastgpt's compiled attention ops.

Each compiled backend exposes two ops in the ``fastgpt`` namespace:

    fastgpt::<backend>_attention_forward(q, k, v, causal, scale) -> (out, lse)
    fastgpt::<backend>_attention_backward(grad_out, q, k, v, out, lse, causal, scale)
        -> (dq, dk, dv)

The Triton ops are defined here as custom ops around the host functions in fastgpt.kernels; the
C++ ops are defined by the extension (csrc/) and only get their fake implementations and autograd
here. To torch.compile each op is one opaque node with known output shapes, and the profiler
shows it as ``fastgpt::...``.
"""

import torch
from torch import Tensor

from fastgpt import _extension
from fastgpt.reference import accumulate_dtype


@torch.library.custom_op("fastgpt::triton_attention_forward", mutates_args=())
def triton_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    from fastgpt.kernels.attention import attention_forward

    return attention_forward(q, k, v, causal, scale)


@torch.library.custom_op("fastgpt::triton_attention_backward", mutates_args=())
def triton_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    from fastgpt.kernels.attention import attention_backward

    return attention_backward(grad_out, q, k, v, out, lse, causal, scale)


def _forward_fake(q, k, v, causal, scale):
    B, H, Tq, D = q.shape
    out = q.new_empty((B, H, Tq, D))  # (B, H, Tq, D), contiguous
    lse = q.new_empty((B, H, Tq), dtype=accumulate_dtype(q.dtype))  # (B, H, Tq)
    return out, lse


def _backward_fake(grad_out, q, k, v, out, lse, causal, scale):
    # dq like q, dk and dv like k: contiguous, in the input dtype.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _no_context(ctx, inputs, output):
    pass


def _register(backend: str) -> None:
    forward = f"fastgpt::{backend}_attention_forward"
    backward_op = getattr(torch.ops.fastgpt, f"{backend}_attention_backward")

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward_op(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None

    torch.library.register_fake(forward)(_forward_fake)
    torch.library.register_fake(f"fastgpt::{backend}_attention_backward")(_backward_fake)
    torch.library.register_autograd(forward, backward, setup_context=_setup_context)
    refuse_double_backward(
        f"fastgpt::{backend}_attention_backward",
        f"The {backend} backend has no double backward (second-order gradients through "
        'attention); use backend="reference" for them.',
    )


def refuse_double_backward(backward_op: str, message: str) -> None:
    """Differentiating a backward op is a double backward: raise message, never a wrong number."""

    def double_backward(ctx, *grads):
        raise RuntimeError(message)

    torch.library.register_autograd(backward_op, double_backward, setup_context=_no_context)


_register("triton")
if _extension.cpp_available():
    _register("cpp")


def forward_op(backend: str):
    """The registered forward op of a compiled backend ("triton" or "cpp")."""
    return getattr(torch.ops.fastgpt, f"{backend}_attention_forward")
