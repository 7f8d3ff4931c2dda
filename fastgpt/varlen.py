"""fastgpt.attention_varlen: attention over packed sequences of different lengths (cu_seqlens).

Layout and semantics are flash-attn's flash_attn_varlen_func: the sequences of a batch are packed
one after another along the first dim, without padding,

    q: (total_q, H, D)   k, v: (total_k, Hkv, D)   cu_seqlens_q, cu_seqlens_k: int32 (B + 1,)

and sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]] against k, v[cu_seqlens_k[b]:...]. Within
a sequence it is fastgpt.attention (causal aligned bottom-right, GQA, a query that sees no key
outputs 0); no query ever sees a key of another sequence. For Tq_b = 2, Tk_b = 3 and
Tq_b = Tk_b = 2 packed together, causal (1 = visible):

             keys of seq 0 | keys of seq 1
    q0 of 0:   1 1 0       |   0 0
    q1 of 0:   1 1 1       |   0 0
    q0 of 1:   0 0 0       |   1 0
    q1 of 1:   0 0 0       |   1 1

The input rules are fastgpt.attention's (validate once, there) plus the cu_seqlens rules below;
the backend is picked by fastgpt.attention.select_backend, then moved to one that has varlen
kernels (VARLEN_BACKENDS) when the pick has none yet, and, for a call with variants (window,
softcap, sinks), to one of those that also has them (fastgpt.attention.VARIANT_BACKENDS).
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from fastgpt import varlen_ops
from fastgpt.attention import (
    backend_or_reference,
    debug,
    last_dim_contiguous,
    require_tensors,
    select_backend,
    validate_variants,
    validate_views,
    variant_backend,
    variant_kwargs,
    variants_in_use,
)
from fastgpt.reference import reference_attention_varlen

# Backends with variable-length kernels (Triton: the dense kernels' IS_VARLEN specialisation;
# cpp: the C++ extension's CPU and CUDA kernels, csrc/cpu/varlen_cpu.cpp and csrc/cuda).
VARLEN_BACKENDS = ("reference", "triton", "cpp")


def select_varlen_backend(device: torch.device, requested: str | None = None) -> tuple[str, str]:
    """(backend name, reason) for a varlen call: select_backend's pick when it has varlen kernels;
    for an automatic pick without them, the reference; for an explicit request, an error."""
    refusal = (
        "variable-length attention kernels yet (they are pending; today: "
        f"{', '.join(VARLEN_BACKENDS)})"
    )
    picked = select_backend(device, requested)
    has_kernel = VARLEN_BACKENDS.__contains__
    return backend_or_reference(picked, requested, has_kernel, refusal, "varlen kernels")


def cu_seqlens_from_lengths(
    lengths: Sequence[int] | Tensor, device: torch.device | str | None = None
) -> Tensor:
    """int32 (B + 1,) prefix sums [0, l0, l0 + l1, ...] of sequence lengths: flash-attn's
    cu_seqlens. With a tensor of lengths the result is on its device unless `device` is given."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=device).flatten()  # (B,)
    zero = lengths.new_zeros(1)
    return torch.cat([zero, lengths.cumsum(0)]).to(torch.int32)  # (B + 1,)


def _check_layout(q: Tensor, k: Tensor, v: Tensor) -> None:
    """The packed (total, heads, D) ranks, before the dense rules run on (1, heads, total, D)."""
    require_tensors("attention_varlen", q=q, k=k, v=v)
    if not q.dim() == k.dim() == v.dim() == 3:
        raise ValueError(
            "attention_varlen expects 3-d q (total_q, H, D) and k, v (total_k, Hkv, D), got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}."
        )


def _check_cu_seqlens_shapes(q: Tensor, k: Tensor, cu_q: Tensor, cu_k: Tensor) -> None:
    """The rules on cu_seqlens that need no values: type, dtype, device, rank, one batch size."""
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, Tensor):
            raise TypeError(f"{name} must be an int32 tensor, got {type(cu).__name__}.")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32 (flash-attn's layout), got {cu.dtype}.")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {cu.device}.")
        if cu.dim() != 1 or cu.numel() == 0:
            raise ValueError(f"{name} must be 1-d (B + 1,) prefix sums, got {tuple(cu.shape)}.")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(
            f"cu_seqlens_q {tuple(cu_q.shape)} and cu_seqlens_k {tuple(cu_k.shape)} must describe "
            "the same number of sequences."
        )


def check_cu_seqlens_values(
    cu: list[int], total: int, max_seqlen: object, name: str, tensor: str
) -> None:
    """The rules on the values of one cu_seqlens (as a list): starts at 0, never decreases, ends at
    the packed length `total` of `tensor`, and no length exceeds max_seqlen."""
    if cu[0] != 0:
        raise ValueError(f"{name} must start at 0, got {cu[0]} ({name} = {cu}).")
    lengths = [end - start for start, end in zip(cu[:-1], cu[1:], strict=True)]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing (lengths >= 0), got {cu}.")
    if cu[-1] != total:
        raise ValueError(
            f"{name} ends at {cu[-1]} but {tensor} packs {total} tokens ({name} = {cu})."
        )
    if not isinstance(max_seqlen, int) or max_seqlen < max(lengths, default=0):
        raise ValueError(
            f"max_seqlen for {name} must be an int >= the longest sequence "
            f"({max(lengths, default=0)}), got {max_seqlen!r}."
        )


def validate_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    backend: str,
    scale: object,
) -> None:
    """Raise TypeError/ValueError with one sentence naming the problem: fastgpt.attention's rules
    on the packed tensors, then cu_seqlens' (their values only outside torch.compile, where
    reading them would break the graph)."""
    _check_layout(q, k, v)
    # The dense rules (dtypes, devices, head dims, GQA, scale) on (1, heads, total, D) views.
    views = tuple(t.transpose(0, 1)[None] for t in (q, k, v))
    packed = lambda: f"packed: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    validate_views(views, backend, scale, packed)
    _check_cu_seqlens_shapes(q, k, cu_seqlens_q, cu_seqlens_k)
    if torch.compiler.is_compiling():
        return
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    check_cu_seqlens_values(cu_q, q.shape[0], max_seqlen_q, "cu_seqlens_q", f"q {tuple(q.shape)}")
    check_cu_seqlens_values(cu_k, k.shape[0], max_seqlen_k, "cu_seqlens_k", f"k {tuple(k.shape)}")


def attention_varlen_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """attention_varlen(..., return_lse=True): (out (total_q, H, D), lse (H, total_q)).

    lse is float32 (float64 for float64 inputs), +inf for a query that sees no key (sinks[h] with
    sinks), and not differentiable (flash-attn's softmax_lse of its varlen functions).
    """
    require_tensors("attention_varlen", q=q)
    name, why = select_varlen_backend(q.device, backend)
    variants = []
    if window is not None or softcap != 0.0 or sinks is not None:
        _check_layout(q, k, v)  # the packed ranks first: the variants' rules read H
        validate_variants(q.shape[1], q.device, window, softcap, sinks)
        variants = variants_in_use(window, softcap, sinks, causal)
        name, why = variant_backend(q.device, (name, why), backend, variants, VARLEN_BACKENDS)
    validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, name, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    shown = f" {', '.join(variants)}" if variants else ""
    debug(
        f"attention_varlen q{tuple(q.shape)} k{tuple(k.shape)} {cu_seqlens_q.numel() - 1} "
        f"sequences {q.dtype} causal={causal}{shown} -> {name} ({why})"
    )
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    extra = variant_kwargs(window, softcap, sinks, causal)
    if extra and name == "reference":
        # The variants on the reference: plain autograd through its torch ops (sinks included).
        out, lse = reference_attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, **extra
        )
        return out, lse.detach()
    forward = varlen_ops.varlen_forward_op(name)
    return forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, **extra
    )


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over packed sequences of different lengths (flash-attn's varlen layout).

    Args:
        q: (total_q, H, D) queries of B sequences packed along dim 0; any strides with the last
            dim contiguous.
        k: (total_k, Hkv, D) keys, H % Hkv == 0 (GQA / MQA without repeating k per head).
        v: (total_k, Hkv, D) values.
        cu_seqlens_q: int32 (B + 1,) on q's device: 0, then the running total of query lengths
            (so it ends at total_q); lengths may be 0.
        cu_seqlens_k: int32 (B + 1,): the same for keys (ends at total_k).
        max_seqlen_q, max_seqlen_k: ints >= the longest query / key sequence (kernels size their
            grids by them).
        causal: mask aligned bottom-right within each sequence: query i of sequence b sees its
            keys j <= i + (Tk_b - Tq_b). A query that sees no key outputs zeros.
        scale: multiplies q.k; defaults to 1 / sqrt(D); must be finite.
        window, softcap, sinks: fastgpt.attention's variants, within each sequence (the window
            aligned bottom-right per sequence; sinks (H,) shared by all sequences).
        return_lse: also return lse (H, total_q), as fastgpt.attention's per row.
        backend: as fastgpt.attention's; VARLEN_BACKENDS have varlen kernels (Triton's forward
            and backward read cu_seqlens, no padding); an automatic pick of a backend without
            them (or without a requested variant) runs on one that has them (FASTGPT_DEBUG=1
            says so), an explicit request of one raises NotImplementedError.

    Returns:
        (total_q, H, D) tensor in q's dtype; differentiable with respect to q, k and v (and
        sinks); with return_lse=True, (out, lse (H, total_q)).
    """
    out, lse = attention_varlen_with_lse(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal=causal, scale=scale, window=window, softcap=softcap, sinks=sinks, backend=backend,
    )  # fmt: skip
    return (out, lse) if return_lse else out
