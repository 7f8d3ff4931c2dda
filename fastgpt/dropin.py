"""Drop-in replacements for the two attention calls people already write.

    fastgpt.scaled_dot_product_attention   same signature and semantics as
                                           torch.nn.functional.scaled_dot_product_attention
    fastgpt.flash_attn_func                flash-attn's names and its (B, T, H, D) layout

Both hand the cases fastgpt's kernels cover to fastgpt.attention (as views, never copies of the
inputs). scaled_dot_product_attention sends every other case (an explicit attn_mask, dropout,
dtypes, ranks or layouts the kernels do not take) to torch's own implementation, so it can
replace torch's: ``F.scaled_dot_product_attention = fastgpt.scaled_dot_product_attention``.
flash_attn_func raises NotImplementedError for the flash-attn features fastgpt lacks.

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

from fastgpt.attention import attention, log_path, select_backend, unsupported_reason

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
) -> Tensor:
    """flash_attn.flash_attn_func on fastgpt's kernels.

    q: (B, Tq, H, D); k, v: (B, Tk, Hkv, D) with H % Hkv == 0 (MQA/GQA). Returns (B, Tq, H, D) in
    q's dtype: a transposed view of fastgpt's contiguous (B, H, Tq, D) output (use .reshape, not
    .view, to merge the heads). causal aligns the mask bottom-right as flash-attn >= 2.1 does:
    query i sees keys j <= i + Tk - Tq. softmax_scale defaults to 1/sqrt(D). The backward is
    deterministic whatever `deterministic` says. dropout, sliding windows, softcap, ALiBi and
    returned attention probabilities are not implemented and raise NotImplementedError.
    """
    unsupported = []
    if dropout_p > 0.0:
        unsupported.append(f"dropout_p={dropout_p}")
    left, right = window_size
    if left >= 0 or (right >= 0 and not (causal and right == 0)):
        unsupported.append(f"window_size={tuple(window_size)}")
    if softcap != 0.0:
        unsupported.append(f"softcap={softcap}")
    if alibi_slopes is not None:
        unsupported.append("alibi_slopes")
    if return_attn_probs:
        unsupported.append("return_attn_probs=True")
    if unsupported:
        raise NotImplementedError(
            f"fastgpt.flash_attn_func does not support {', '.join(unsupported)}."
        )
    _check_flash_layout(q, k, v)
    # (B, T, H, D) -> (B, H, T, D) views: fastgpt takes any strides with a contiguous last dim.
    out = attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, scale=softmax_scale
    )  # (B, H, Tq, D)
    log_path("flash_attn_func", "fastgpt.attention", f"causal={causal}")
    return out.transpose(1, 2)  # (B, Tq, H, D)
