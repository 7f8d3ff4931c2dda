"""Drop-in replacements for the attention calls people already write.

    fastgpt.scaled_dot_product_attention   same signature and semantics as
                                           torch.nn.functional.scaled_dot_product_attention
    fastgpt.flash_attn_func                flash-attn's names and its (B, T, H, D) layout
    fastgpt.flash_attn_varlen_func         flash-attn's packed (total, H, D) + cu_seqlens layout
    fastgpt.flash_attn_{qkv,kv}packed_func and their varlen twins: views, then the two above

Both hand the cases fastgpt's kernels cover to fastgpt.attention (as views, never copies of the
inputs). scaled_dot_product_attention sends every other case (an explicit attn_mask, dropout,
dtypes, ranks or layouts the kernels do not take) to torch's own implementation, so it can
replace torch's: ``F.scaled_dot_product_attention = fastgpt.scaled_dot_product_attention``.
The flash-attn functions take window_size and softcap (fastgpt.attention's window and softcap)
and raise NotImplementedError for the flash-attn features fastgpt lacks (dropout, ALiBi, paged KV).

The two causal alignments (1 = query row i may see key column j):

    torch is_causal, top-left            fastgpt / flash-attn causal, bottom-right
    Tq = 3, Tk = 5:    1 0 0 0 0         Tq = 3, Tk = 5:    1 1 1 0 0
                       1 1 0 0 0                            1 1 1 1 0
                       1 1 1 0 0                            1 1 1 1 1

They agree when Tq == Tk. For Tq < Tk no query sees the keys past Tq under top-left, so top-left
is bottom-right on k[..., :Tq, :]. For Tq > Tk the first Tk queries see a square causal mask and
the rest see every key, so top-left is a causal call on q[..., :Tk, :] and a full call on the rest.
"""

import torch
from torch import Tensor

from fastgpt.attention import (
    attention,
    attention_with_lse,
    log_path,
    select_backend,
    unsupported_reason,
)
from fastgpt.kvcache import attention_with_kvcache
from fastgpt.varlen import attention_varlen_with_lse

# torch's own SDPA, taken once at import. F.scaled_dot_product_attention is this very builtin, so
# after `F.scaled_dot_product_attention = fastgpt.scaled_dot_product_attention` the fallback still
# reaches torch's implementation and never calls back into fastgpt.
_torch_sdpa = torch._C._nn.scaled_dot_product_attention


def _lift(t: Tensor) -> Tensor:
    """A rank 2 or 3 SDPA tensor as a (B, H, T, E) view: torch reads dim -3 as the head dim."""
    return t[(None,) * (4 - t.dim())]


def _sdpa_fallback_reason(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    scale: float | None,
    enable_gqa: bool,
) -> str | None:
    """Why this SDPA call cannot run on fastgpt's kernels, or None when it can.

    SDPA's own terms first (masks, dropout, ranks, torch's head broadcasting); the input rules
    are fastgpt.attention's, asked once through unsupported_reason.
    """
    tensors = (query, key, value)
    if attn_mask is not None:
        return "an explicit attn_mask"
    if dropout_p > 0.0:
        return f"dropout_p={dropout_p}"
    if not all(isinstance(t, Tensor) for t in tensors):
        return "an argument that is not a tensor"
    if any(t.is_nested for t in tensors):
        return "nested tensors"
    if not query.dim() == key.dim() == value.dim() or query.dim() not in (2, 3, 4):
        return f"ranks {query.dim()}, {key.dim()}, {value.dim()} (fastgpt takes 2, 3 or 4)"
    try:
        backend = select_backend(query.device)[0]
    except ValueError as error:  # e.g. FASTGPT_BACKEND names a backend that cannot run here
        return str(error)
    reason = unsupported_reason(_lift(query), _lift(key), _lift(value), backend, scale)
    if reason is not None:
        return reason
    q_heads = query.shape[-3] if query.dim() >= 3 else 1
    kv_heads = key.shape[-3] if key.dim() >= 3 else 1
    if q_heads != kv_heads and not enable_gqa:  # torch broadcasts or refuses; fastgpt would not
        return f"{q_heads} query heads and {kv_heads} key heads with enable_gqa=False"
    if any(t.numel() == 0 for t in tensors):
        return "an empty tensor"
    return None


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention, on fastgpt's kernels where they apply.

    query: (..., Hq, Tq, E); key: (..., Hkv, Tk, E); value: (..., Hkv, Tk, Ev). Returns
    (..., Hq, Tq, Ev) in query's dtype. is_causal aligns the mask top-left as torch does (query i
    sees keys j <= i). With enable_gqa=True, Hq may be a multiple of Hkv (query head h reads key
    head h // (Hq // Hkv)). scale defaults to 1/sqrt(E).

    Runs on fastgpt.attention for ranks 2 to 4 and no attn_mask or dropout when the inputs meet
    fastgpt.attention's rules (fastgpt.attention.unsupported_reason: dtypes of the backend fastgpt
    picks, equal head dims up to 256, a finite scale); anything else goes to torch's
    implementation, with torch's results and errors. FASTGPT_DEBUG=1 logs the path each call
    took and why.
    """
    reason = _sdpa_fallback_reason(query, key, value, attn_mask, dropout_p, scale, enable_gqa)
    if reason is not None:
        log_path("scaled_dot_product_attention", "torch", reason)
        # enable_gqa only when set: torch 2.4 does not know the argument.
        gqa = {"enable_gqa": True} if enable_gqa else {}
        return _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **gqa)

    q, k, v = _lift(query), _lift(key), _lift(value)  # (B, H, T, E) views
    tq, tk = q.shape[-2], k.shape[-2]
    if not is_causal or tq == tk:
        why = "causal, Tq == Tk" if is_causal else "not causal"
        out = attention(q, k, v, causal=is_causal, scale=scale)  # (B, Hq, Tq, E)
    elif tq < tk:
        # Top-left: the keys past Tq are seen by no query; drop them (a view) and align.
        why = "causal top-left with Tq < Tk, as bottom-right on the first Tq keys"
        out = attention(q, k[..., :tq, :], v[..., :tq, :], causal=True, scale=scale)
    else:
        # Top-left with Tq > Tk: a causal square for the first Tk queries, all keys for the rest.
        why = "causal top-left with Tq > Tk, as a causal square plus a full block"
        head = attention(q[..., :tk, :], k, v, causal=True, scale=scale)  # (B, Hq, Tk, E)
        tail = attention(q[..., tk:, :], k, v, causal=False, scale=scale)  # (B, Hq, Tq-Tk, E)
        out = torch.cat([head, tail], dim=-2)  # (B, Hq, Tq, E)
    log_path("scaled_dot_product_attention", "fastgpt.attention", why)
    return out.view(query.shape)


def _check_flash_layout(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Shape errors in flash-attn's own terms, before fastgpt.attention sees transposed views."""
    if not all(isinstance(t, Tensor) for t in (q, k, v)):
        raise TypeError("flash_attn_func takes tensors q, k, v.")
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if not q.dim() == k.dim() == v.dim() == 4:
        raise ValueError(f"flash_attn_func expects 4-d (B, T, H, D) tensors, got {shapes}.")
    if k.shape != v.shape:
        raise ValueError(f"flash_attn_func expects k and v of one shape (B, Tk, Hkv, D): {shapes}.")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"flash_attn_func expects one batch size and head dim in {shapes}.")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"flash_attn_func needs the query heads a multiple of the kv heads: {shapes}."
        )


def refuse_options(entry: str, options: dict[str, bool]) -> None:
    """NotImplementedError "fastgpt.<entry> does not support <names>." naming every option (a
    key) this call uses (its value True); nothing when it uses none."""
    unsupported = [name for name, used in options.items() if used]
    if unsupported:
        raise NotImplementedError(f"fastgpt.{entry} does not support {', '.join(unsupported)}.")


def flash_unsupported(
    entry: str,
    dropout_p: float,
    alibi_slopes: Tensor | None,
    block_table: Tensor | None = None,
) -> None:
    """Raise NotImplementedError naming the flash-attn options of this call fastgpt lacks."""
    refuse_options(
        entry,
        {
            f"dropout_p={dropout_p}": dropout_p > 0.0,
            "alibi_slopes": alibi_slopes is not None,
            "block_table (paged KV)": block_table is not None,
        },
    )


def flash_variants(window_size: tuple[int, int], softcap: float) -> dict[str, object]:
    """flash-attn's window_size and softcap as fastgpt.attention's window and softcap keywords
    (the same semantics); their defaults (-1, -1) and 0.0 give {}, a plain call."""
    window = tuple(window_size) if isinstance(window_size, tuple | list) else window_size
    extra: dict[str, object] = {}
    if window != (-1, -1):
        extra["window"] = window
    if softcap != 0.0:
        extra["softcap"] = softcap
    return extra


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor, None]:
    """flash_attn.flash_attn_func on fastgpt's kernels.

    q: (B, Tq, H, D); k, v: (B, Tk, Hkv, D) with H % Hkv == 0 (MQA/GQA). Returns (B, Tq, H, D) in
    q's dtype: a transposed view of fastgpt's contiguous (B, H, Tq, D) output (use .reshape, not
    .view, to merge the heads). causal aligns the mask bottom-right as flash-attn >= 2.1 does:
    query i sees keys j <= i + Tk - Tq. softmax_scale defaults to 1/sqrt(D). The backward is
    deterministic whatever `deterministic` says. With return_attn_probs=True it returns
    (out, softmax_lse, None) as flash-attn does without dropout: softmax_lse (B, H, Tq) float32,
    the log-sum-exp of each row of scale * q k^T (+inf for a row that sees no key).
    window_size=(left, right) (-1 unbounded) is a sliding window and softcap=c > 0 turns scores
    into c * tanh(s / c), both with flash-attn's semantics (fastgpt.attention's window and
    softcap). dropout and ALiBi are not implemented and raise NotImplementedError.
    """
    flash_unsupported("flash_attn_func", dropout_p, alibi_slopes)
    _check_flash_layout(q, k, v)
    variants = flash_variants(window_size, softcap)
    # (B, T, H, D) -> (B, H, T, D) views: fastgpt takes any strides with a contiguous last dim.
    out, lse = attention_with_lse(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
        scale=softmax_scale, **variants,
    )  # (B, H, Tq, D), (B, H, Tq)  # fmt: skip
    log_path("flash_attn_func", "fastgpt.attention", f"causal={causal} {variants or ''}".strip())
    out = out.transpose(1, 2)  # (B, Tq, H, D)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor, None]:
    """flash_attn.flash_attn_varlen_func on fastgpt.attention_varlen.

    q: (total_q, H, D); k, v: (total_k, Hkv, D), H % Hkv == 0; cu_seqlens_q, cu_seqlens_k: int32
    (B + 1,) prefix sums of the sequence lengths; max_seqlen_q/k: the longest lengths. causal is
    aligned bottom-right within each sequence (a query that sees no key outputs 0). Returns
    (total_q, H, D) in q's dtype, or with return_attn_probs=True (out, softmax_lse, None):
    softmax_lse (H, total_q) float32. window_size and softcap as flash_attn_func's, within each
    sequence. dropout, ALiBi and a paged block_table raise NotImplementedError. Runs on the
    reference path until the Triton and C++ varlen kernels land (see fastgpt.attention_varlen).
    """
    flash_unsupported("flash_attn_varlen_func", dropout_p, alibi_slopes, block_table)
    variants = flash_variants(window_size, softcap)
    out, lse = attention_varlen_with_lse(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal=causal, scale=softmax_scale, **variants,
    )  # (total_q, H, D), (H, total_q)  # fmt: skip
    entry = "fastgpt.attention_varlen"
    log_path("flash_attn_varlen_func", entry, f"causal={causal} {variants or ''}".strip())
    return (out, lse, None) if return_attn_probs else out


# --- flash-attn's packed variants: views of one tensor, then the functions above ------------------


def _unpack(entry: str, name: str, t: Tensor, dim: int, count: int, layout: str) -> tuple:
    """The count views of packed t along dim (no copies), after checking t's shape is layout."""
    if not isinstance(t, Tensor) or t.dim() != dim + 3 or t.shape[dim] != count:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{entry} expects {name} of shape {layout}, got {shape}.")
    return t.unbind(dim)


def flash_attn_qkvpacked_func(
    qkv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor, None]:
    """flash_attn.flash_attn_qkvpacked_func: qkv (B, T, 3, H, D) -> flash_attn_func on its three
    (B, T, H, D) views (no copies; the gradient lands in qkv)."""
    q, k, v = _unpack("flash_attn_qkvpacked_func", "qkv", qkv, 2, 3, "(B, T, 3, H, D)")
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
        deterministic, return_attn_probs,
    )  # fmt: skip


def flash_attn_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor, None]:
    """flash_attn.flash_attn_kvpacked_func: q (B, Tq, H, D), kv (B, Tk, 2, Hkv, D) ->
    flash_attn_func on q and kv's two (B, Tk, Hkv, D) views."""
    k, v = _unpack("flash_attn_kvpacked_func", "kv", kv, 2, 2, "(B, Tk, 2, Hkv, D)")
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
        deterministic, return_attn_probs,
    )  # fmt: skip


def flash_attn_varlen_qkvpacked_func(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor, None]:
    """flash_attn.flash_attn_varlen_qkvpacked_func: qkv (total, 3, H, D), one cu_seqlens for
    queries and keys -> flash_attn_varlen_func on its three (total, H, D) views."""
    q, k, v = _unpack("flash_attn_varlen_qkvpacked_func", "qkv", qkv, 1, 3, "(total, 3, H, D)")
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
        causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
    )  # fmt: skip


def flash_attn_varlen_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor, None]:
    """flash_attn.flash_attn_varlen_kvpacked_func: q (total_q, H, D), kv (total_k, 2, Hkv, D) ->
    flash_attn_varlen_func on q and kv's two (total_k, Hkv, D) views."""
    k, v = _unpack("flash_attn_varlen_kvpacked_func", "kv", kv, 1, 2, "(total_k, 2, Hkv, D)")
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
        softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs,
    )  # fmt: skip


# --- flash-attn's KV-cache entry point: fastgpt.attention_with_kvcache ----------------------------


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
    cache_seqlens: int | Tensor | None = None,
    cache_batch_idx: Tensor | None = None,
    cache_leftpad: Tensor | None = None,
    block_table: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
) -> Tensor:
    """flash_attn.flash_attn_with_kvcache on fastgpt.attention_with_kvcache.

    q: (B, Tq, H, D); k_cache, v_cache: (B, Tmax, Hkv, D), or (num_blocks, page_size, Hkv, D)
    pages with block_table (B, max_blocks) int32 (page_size a multiple of 16); k, v: (B, Tnew,
    Hkv, D) new keys/values written into the caches in place at cache_seqlens[b] onwards before
    attending; cache_seqlens: (B,) int32 or an int, the keys cached before the new ones (None: every
    cache is full, so nothing can be appended). causal is aligned bottom-right per sequence.
    Returns (B, Tq, H, D) in q's dtype. num_splits is a performance hint and ignored. Rotary
    embeddings, cache_batch_idx, cache_leftpad, ALiBi and return_softmax_lse raise
    NotImplementedError; window_size and softcap run (on the reference until the KV-cache kernels
    have them).
    """
    rotary = rotary_cos is not None or rotary_sin is not None
    options = {
        "rotary embeddings (rotary_cos, rotary_sin)": rotary,
        "cache_batch_idx": cache_batch_idx is not None,
        "cache_leftpad": cache_leftpad is not None,
        "alibi_slopes": alibi_slopes is not None,
        "return_softmax_lse=True": return_softmax_lse,
    }
    refuse_options("flash_attn_with_kvcache", options)
    if cache_seqlens is None:  # flash-attn: every sequence fills its whole cache row (or pages)
        if k is not None or v is not None:
            raise ValueError(
                "flash_attn_with_kvcache without cache_seqlens reads every cache as full, so new "
                "k/v have nowhere to go: pass cache_seqlens."
            )
        full = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
        cache_seqlens = full
    out = attention_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table,
        causal=causal, scale=softmax_scale, window=tuple(window_size), softcap=softcap,
    )  # fmt: skip
    log_path("flash_attn_with_kvcache", "fastgpt.attention_with_kvcache", f"causal={causal}")
    return out
