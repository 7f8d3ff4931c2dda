"""torch.library registration of fastgpt's packed variable-length attention ops.

Each backend with varlen kernels exposes two ops in the ``fastgpt`` namespace:

    fastgpt::<backend>_attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, causal, scale) -> (out, lse)
    fastgpt::<backend>_attention_varlen_backward(grad_out, q, k, v, out, lse, cu_seqlens_q,
        cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale) -> (dq, dk, dv)

q, out: (total_q, H, D); k, v: (total_k, Hkv, D); cu_seqlens_*: int32 (B + 1,); lse: (H, total_q)
in float32 (float64 for float64 inputs). The reference and Triton backends define them here
(the Triton ops around fastgpt.kernels.attention's varlen host functions), the C++ extension
defines the cpp ones (csrc/attention.cpp); each backend calls register_varlen(backend) for the
same fake implementations and autograd. To torch.compile each op is one opaque node with known
output shapes (dynamic totals), and the profiler shows it as ``fastgpt::...``.

The Triton and C++ ops also take the variants as keyword arguments with defaults (window=None,
softcap=0.0, sinks=None; fastgpt.attention's, within each sequence) and their backward returns a
fourth output, dsinks ((H,) in lse's dtype, empty without sinks). The autograd glue passes the
variants on only when set, and reads dsinks only from a backward op with four outputs.
"""

import torch
from torch import Tensor

from fastgpt import _extension, reference
from fastgpt.ops import (
    input_grads,
    keep_variants,
    kernel_variants,
    refuse_double_backward,
    variant_names,
)
from fastgpt.reference import accumulate_dtype


@torch.library.custom_op("fastgpt::reference_attention_varlen_forward", mutates_args=())
def reference_attention_varlen_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    out, lse = reference.reference_attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale
    )
    return out, lse  # (total_q, H, D), (H, total_q): fresh contiguous tensors (torch.cat)


@torch.library.custom_op("fastgpt::reference_attention_varlen_backward", mutates_args=())
def reference_attention_varlen_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return reference.reference_attention_varlen_backward(
        grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale
    )  # fresh contiguous tensors in the inputs' dtypes


def _forward_fake(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, *variants
):
    total_q, H, D = q.shape
    out = q.new_empty((total_q, H, D))  # (total_q, H, D), contiguous
    lse = q.new_empty((H, total_q), dtype=accumulate_dtype(q.dtype))  # (H, total_q)
    return out, lse


def _backward_fake(grad_out, q, k, v, *rest):
    # dq like q, dk and dv like k: contiguous, in the input dtype.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _backward_dsinks_fake(
    grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale,
    window=None, softcap=0.0, sinks=None,
):  # fmt: skip
    # As _backward_fake, and dsinks (H,) in lse's dtype (fp64 for fp64 inputs), empty without sinks.
    n_sinks = 0 if sinks is None else sinks.shape[0]
    dsinks = q.new_empty((n_sinks,), dtype=accumulate_dtype(q.dtype))
    return *_backward_fake(grad_out, q, k, v), dsinks


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale = inputs[:9]
    sinks = keep_variants(ctx, ctx.variant_names, inputs, 9)
    out, lse = output
    saved = [q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *([sinks] if sinks is not None else [])]
    ctx.save_for_backward(*saved)
    ctx.max_seqlens, ctx.causal, ctx.scale = (max_seqlen_q, max_seqlen_k), causal, scale
    ctx.mark_non_differentiable(lse)


def register_varlen(backend: str) -> None:
    """Fake implementations and autograd for fastgpt::<backend>_attention_varlen_{forward,backward}
    (the two ops must already be defined)."""
    forward = f"fastgpt::{backend}_attention_varlen_forward"
    backward_op = getattr(torch.ops.fastgpt, f"{backend}_attention_varlen_backward")

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_q, cu_k, *sinks = ctx.saved_tensors
        variants = dict(ctx.variants, **({"sinks": sinks[0]} if sinks else {}))
        grads = backward_op(
            grad_out, q, k, v, out, lse, cu_q, cu_k, *ctx.max_seqlens, ctx.causal, ctx.scale,
            **variants,
        )  # fmt: skip
        return input_grads(ctx, grads, sinks)

    def setup_context(ctx, inputs, output):
        ctx.variant_names = names
        _setup_context(ctx, inputs, output)

    names = variant_names(f"{backend}_attention_varlen_forward", 9)
    with_variants = len(backward_op.default._schema.returns) == 4
    backward_fake = _backward_dsinks_fake if with_variants else _backward_fake
    torch.library.register_fake(forward)(_forward_fake)  # *variants: with or without them
    torch.library.register_fake(f"fastgpt::{backend}_attention_varlen_backward")(backward_fake)
    torch.library.register_autograd(forward, backward, setup_context=setup_context)
    refuse_double_backward(
        f"fastgpt::{backend}_attention_varlen_backward",
        "fastgpt.attention_varlen has no double backward (second-order gradients through "
        f"attention) on the {backend} backend.",
    )


register_varlen("reference")
if _extension.cpp_available():
    register_varlen("cpp")  # its two ops are defined by the C++ extension (csrc/attention.cpp)


@torch.library.custom_op("fastgpt::triton_attention_varlen_forward", mutates_args=())
def triton_attention_varlen_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    window: list[int] | None = None,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    from fastgpt.kernels.attention import attention_varlen_forward

    return attention_varlen_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
        **kernel_variants(window, softcap, sinks),
    )  # (total_q, H, D), (H, total_q) fp32: fresh contiguous tensors  # fmt: skip


@torch.library.custom_op("fastgpt::triton_attention_varlen_backward", mutates_args=())
def triton_attention_varlen_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    window: list[int] | None = None,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from fastgpt.kernels.attention import attention_varlen_backward

    grads = attention_varlen_backward(
        grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, causal, scale, **kernel_variants(window, softcap, sinks),
    )  # fmt: skip
    if sinks is None:
        return *grads, q.new_empty((0,), dtype=torch.float32)
    return grads


register_varlen("triton")


def varlen_forward_op(backend: str):
    """The registered varlen forward op of a backend (see fastgpt.varlen.VARLEN_BACKENDS)."""
    return getattr(torch.ops.fastgpt, f"{backend}_attention_varlen_forward")
