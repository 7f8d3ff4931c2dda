"""torch.library registration of fastgpt's compiled attention ops.

Each compiled backend exposes two ops in the ``fastgpt`` namespace:

    fastgpt::<backend>_attention_forward(q, k, v, causal, scale, **variants) -> (out, lse)
    fastgpt::<backend>_attention_backward(grad_out, q, k, v, out, lse, causal, scale, **variants)
        -> (dq, dk, dv) or (dq, dk, dv, dsinks)

variants are keyword arguments with defaults (window=None, softcap=0.0, sinks=None) for a backend
whose kernels have them (fastgpt.attention.VARIANT_BACKENDS); their backward always returns
dsinks ((H,) in lse's dtype: fp32, fp64 for fp64 inputs; empty without sinks). The autograd glue
passes the variants on only when set, so an op without them keeps working.

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
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    window: list[int] | None = None,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    from fastgpt.kernels.attention import attention_forward

    return attention_forward(q, k, v, causal, scale, **kernel_variants(window, softcap, sinks))


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
    window: list[int] | None = None,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from fastgpt.kernels.attention import attention_backward

    variants = kernel_variants(window, softcap, sinks)
    grads = attention_backward(grad_out, q, k, v, out, lse, causal, scale, **variants)
    if sinks is None:
        return *grads, q.new_empty((0,), dtype=torch.float32)
    return grads


def kernel_variants(window: list[int] | None, softcap: float, sinks: Tensor | None) -> dict:
    """The kernel host functions' variant keywords from an op's arguments."""
    return {
        "window": tuple(window) if window is not None else (-1, -1),
        "softcap": softcap,
        "sinks": sinks,
    }


def _forward_fake(q, k, v, causal, scale, window=None, softcap=0.0, sinks=None):
    B, H, Tq, D = q.shape
    out = q.new_empty((B, H, Tq, D))  # (B, H, Tq, D), contiguous
    lse = q.new_empty((B, H, Tq), dtype=accumulate_dtype(q.dtype))  # (B, H, Tq)
    return out, lse


def _backward_fake(
    grad_out, q, k, v, out, lse, causal, scale, window=None, softcap=0.0, sinks=None
):
    # dq like q, dk and dv like k: contiguous, in the input dtype; dsinks (H,) or empty, in lse's
    # dtype (fp32, fp64 for fp64 inputs).
    n_sinks = 0 if sinks is None else sinks.shape[0]
    dsinks = q.new_empty((n_sinks,), dtype=accumulate_dtype(q.dtype))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


def _three_grads_fake(grad_out, q, k, v, out, lse, causal, scale, *variants, **named):
    # A backward op without dsinks: (dq, dk, dv).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def variant_names(op_name: str, plain: int) -> list[str]:
    """The names of an op's inputs after its `plain` leading ones (window, softcap, sinks in its
    schema's order; [] for an op without the variants)."""
    schema = getattr(torch.ops.fastgpt, op_name).default._schema
    return [a.name for a in schema.arguments][plain:]


def keep_variants(ctx, names: list[str], inputs: tuple, plain: int) -> Tensor | None:
    """Store on ctx the variants in use (ctx.variants, sinks aside: they go on to the backward
    op), where sinks sits among the inputs (ctx.sinks_input) and their count; return sinks."""
    variants = dict(zip(names, inputs[plain:], strict=True))
    sinks = variants.pop("sinks", None)
    ctx.variants = {name: value for name, value in variants.items() if value not in (None, 0.0)}
    ctx.sinks_input = names.index("sinks") + plain if sinks is not None else None
    ctx.n_inputs = len(inputs)
    return sinks


def input_grads(ctx, grads: tuple, sinks: list[Tensor]) -> tuple:
    """The forward op's input gradients from its backward op's (dq, dk, dv[, dsinks])."""
    result = [*grads[:3]] + [None] * (ctx.n_inputs - 3)  # (dq, dk, dv, None for the rest)
    if ctx.sinks_input is not None:  # its gradient: the backward op's 4th output
        result[ctx.sinks_input] = grads[3].to(sinks[0].dtype)
    return tuple(result)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs[:5]
    sinks = keep_variants(ctx, ctx.variant_names, inputs, 5)
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *([sinks] if sinks is not None else []))
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _no_context(ctx, inputs, output):
    pass


def _register(backend: str) -> None:
    forward = f"fastgpt::{backend}_attention_forward"
    backward_op = getattr(torch.ops.fastgpt, f"{backend}_attention_backward")

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, *sinks = ctx.saved_tensors
        variants = dict(ctx.variants, **({"sinks": sinks[0]} if sinks else {}))
        grads = backward_op(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale, **variants)
        return input_grads(ctx, grads, sinks)

    def setup_context(ctx, inputs, output):
        ctx.variant_names = names
        _setup_context(ctx, inputs, output)

    names = variant_names(f"{backend}_attention_forward", 5)
    with_dsinks = len(backward_op.default._schema.returns) == 4
    fake_backward = _backward_fake if with_dsinks else _three_grads_fake
    torch.library.register_fake(forward)(_forward_fake)
    torch.library.register_fake(f"fastgpt::{backend}_attention_backward")(fake_backward)
    torch.library.register_autograd(forward, backward, setup_context=setup_context)
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
