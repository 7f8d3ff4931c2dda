"""Pure-PyTorch attention: the path on MPS and on CPU without the extension, and the test oracle.

Semantics shared by every backend of fastgpt:

    q: (B, H, Tq, D)   k, v: (B, Hkv, Tk, D)   with H % Hkv == 0
    (query head h reads kv head h // (H // Hkv))

    causal=True aligns the mask bottom-right: query i sees key j iff j <= i + (Tk - Tq).
    For Tq = 3, Tk = 5 (1 = visible):          For Tq = 5, Tk = 3:
        1 1 1 0 0                                  0 0 0   <- sees no key: output row is 0
        1 1 1 1 0                                  0 0 0
        1 1 1 1 1                                  1 0 0
                                                   1 1 0
                                                   1 1 1

    lse[b, h, i] = log(sum over visible j of exp(scale * q_i . k_j)), +inf for a row with no visible
    key, so that a backward recomputing p = exp(s - lse) gets exactly 0 there.

Variants (flash-attn's semantics; each off by default, and then not a single op is added):

    window=(left, right): query i sees keys j with d - left <= j <= d + right, where d = i + Tk - Tq
        is the key aligned with it (bottom-right) and -1 means unbounded; with causal, right is 0.
        For Tq = Tk = 5, causal, window=(2, -1):   1 0 0 0 0
                                                   1 1 0 0 0
                                                   1 1 1 0 0
                                                   0 1 1 1 0
                                                   0 0 1 1 1
    softcap=c > 0: each score s = scale * q.k becomes c * tanh(s / c) before the mask and softmax.
    sinks (H,): one extra logit per head in each row's softmax denominator (gpt-oss's learnable
        sink): p_ij = exp(s_ij) / (sum over visible j' of exp(s_ij') + exp(sinks[h])). The sink
        takes probability mass but has no value, so out rows sum less than one p.

    lse is the log of that whole denominator, the sink's term included (as flash-attn's learnable
    sink and split-KV merging need: out = sum_j exp(s_ij - lse_i) v_j holds with or without
    sinks). A row that sees no key outputs 0 with lse = +inf, or lse = sinks[h] with sinks.

Packed variable-length attention (reference_attention_varlen) is this attention within each
sequence of a packed batch: q (total_q, H, D), k, v (total_k, Hkv, D), cu_seqlens prefix sums.
"""

from collections.abc import Iterator

import torch
from torch import Tensor


def causal_mask(tq: int, tk: int, device: torch.device | str | None = None) -> Tensor:
    """(Tq, Tk) bool mask, True where query i may see key j (bottom-right aligned)."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq)


def window_mask(
    tq: int,
    tk: int,
    causal: bool,
    window: tuple[int, int],
    device: torch.device | str | None = None,
) -> Tensor | None:
    """(Tq, Tk) bool mask, True where query i may see key j under causal and window=(left, right)
    (bottom-right aligned, -1 unbounded); None when every key is visible."""
    left, right = window
    right = 0 if causal else right
    if left < 0 and right < 0:
        return None
    aligned = torch.arange(tq, device=device)[:, None] + (tk - tq)  # (Tq, 1): key j = i + Tk - Tq
    j = torch.arange(tk, device=device)  # (Tk,)
    visible = torch.ones(tq, tk, dtype=torch.bool, device=device)  # (Tq, Tk)
    if left >= 0:
        visible &= j >= aligned - left
    if right >= 0:
        visible &= j <= aligned + right
    return visible


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of scores and softmax: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped_scores(
    q: Tensor,
    k: Tensor,
    causal: bool,
    scale: float,
    dtype: torch.dtype,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """q (B, H, Tq, D), k (B, Hkv, Tk, D) -> (qg (B, Hkv, G, Tq, D), masked (soft-capped)
    scale * q.k scores (B, Hkv, G, Tq, Tk) in dtype, row_sees_a_key (Tq,) bool): the forward's
    and backward's start.

    Query heads are grouped by the kv head they share: no copy of K per query head.
    """
    Tq, Tk = q.shape[2], k.shape[2]
    qg = q.to(dtype).unflatten(1, (k.shape[1], -1))  # (B, Hkv, G, Tq, D)
    kg = k.to(dtype).unsqueeze(2)  # (B, Hkv, 1, Tk, D)
    scores = (qg @ kg.transpose(-2, -1)) * scale  # (B, Hkv, G, Tq, Tk)
    if softcap > 0.0:
        scores = softcap * torch.tanh(scores / softcap)  # (B, Hkv, G, Tq, Tk)
    if tuple(window) == (-1, -1):
        visible = causal_mask(Tq, Tk, q.device) if causal else None  # (Tq, Tk)
    else:
        visible = window_mask(Tq, Tk, causal, window, q.device)  # (Tq, Tk) or None
    if visible is None:
        return qg, scores, torch.full((Tq,), Tk > 0, dtype=torch.bool, device=q.device)
    # A finite "minus infinity": masked entries underflow to exactly 0 after the max is
    # subtracted, and a row with no visible key never produces inf - inf = NaN.
    scores = scores.masked_fill(~visible, torch.finfo(dtype).min)
    return qg, scores, visible.any(dim=-1)


def _with_sink_column(scores: Tensor, sinks: Tensor) -> Tensor:
    """scores (B, Hkv, G, Tq, Tk) and sinks (H,) -> logits (B, Hkv, G, Tq, Tk + 1): the sink as
    one more column that has no value; a softmax over it, its column dropped, is the attention
    with sinks (a row that sees no key puts all its mass on the sink)."""
    sink = sinks.to(scores.dtype).view(scores.shape[1], scores.shape[2], 1, 1)  # (Hkv, G, 1, 1)
    return torch.cat([scores, sink.expand(*scores.shape[:-1], 1)], dim=-1)


def _softmax(scores: Tensor, row_sees_a_key: Tensor, sinks: Tensor | None) -> tuple[Tensor, Tensor]:
    """scores (B, Hkv, G, Tq, Tk) -> (probs (B, Hkv, G, Tq, Tk), logits): the softmax over the
    visible keys (and the sink's column, dropped; 0 in a row that sees no key), and the logits it
    ran over, whose logsumexp is the lse: scores, or with sinks (B, Hkv, G, Tq, Tk + 1)."""
    logits = scores if sinks is None else _with_sink_column(scores, sinks)
    probs = torch.softmax(logits, dim=-1)  # (B, Hkv, G, Tq, Tk or Tk + 1)
    if sinks is not None:
        probs = probs[..., :-1]  # (B, Hkv, G, Tq, Tk): the sink has no value
    return probs * row_sees_a_key[:, None], logits


def _sequences(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor) -> Iterator[tuple[slice, slice]]:
    """(rows of q, rows of k) of each packed sequence; reads cu_seqlens on the host."""
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(starts_q) - 1):
        yield slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])


def _heads_first(t: Tensor) -> Tensor:
    """(n, heads, D) packed rows -> (1, heads, n, D) view, the dense layout."""
    return t.transpose(0, 1)[None]


def reference_attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    scale: float | None = None,
    compute_dtype: torch.dtype | None = None,
    *,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention by the book: matmul, (soft-cap,) mask, softmax, matmul. Returns (out, lse).

    out has q's dtype and shape (B, H, Tq, D); lse is (B, H, Tq) in the compute dtype.
    compute_dtype defaults to float32 (float64 for float64 inputs); the tests pass q.dtype to get
    "plain PyTorch attention in the same precision" as the error baseline for the kernels.
    window, softcap and sinks (H,) are the variants of the module docstring; every op here is a
    torch op, so autograd differentiates all of it, the sinks included.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = compute_dtype or accumulate_dtype(q.dtype)
    _, scores, row_sees_a_key = _grouped_scores(
        q, k, causal, scale, dtype, window, softcap
    )  # (B, Hkv, G, Tq, Tk), (Tq,)
    vg = v.to(dtype).unsqueeze(2)  # (B, Hkv, 1, Tk, D)
    probs, logits = _softmax(scores, row_sees_a_key, sinks)  # (B, Hkv, G, Tq, Tk), ...
    lse = torch.logsumexp(logits, dim=-1)  # (B, Hkv, G, Tq): the sink's term included
    if sinks is None:  # a row that sees no key: +inf (with sinks, the sink's logit)
        lse = lse.masked_fill(~row_sees_a_key, float("inf"))
    out = probs @ vg  # (B, Hkv, G, Tq, D)
    return out.flatten(1, 2).to(q.dtype), lse.flatten(1, 2)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    scale: float | None = None,
    **variants,
) -> Tensor:
    """Attention output only; see reference_attention_with_lse (variants: window, softcap,
    sinks). (B, H, Tq, D) in q's dtype."""
    return reference_attention_with_lse(q, k, v, causal, scale, **variants)[0]


def reference_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    causal: bool = True,
    scale: float | None = None,
    compute_dtype: torch.dtype | None = None,
    *,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Packed variable-length attention, one sequence at a time. Returns (out, lse).

    q: (total_q, H, D); k, v: (total_k, Hkv, D); cu_seqlens_q, cu_seqlens_k: (B + 1,) prefix sums:
    sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]] against k, v[cu_seqlens_k[b]:...], and
    reference_attention_with_lse within it (causal bottom-right per sequence; a sequence may be
    empty; a query that sees no key outputs 0 with lse +inf). out is (total_q, H, D) in q's dtype,
    lse (H, total_q) in the compute dtype. Reads cu_seqlens on the host (a sync on CUDA).
    window, softcap and sinks (H,) apply within each sequence (the window bottom-right aligned
    per sequence); differentiable through torch ops.
    """
    H, D = q.shape[1], q.shape[2]
    dtype = compute_dtype or accumulate_dtype(q.dtype)
    # Empty first pieces: a batch of no sequences still concatenates to (0, H, D) and (H, 0).
    outs, lses = [q.new_zeros(0, H, D)], [q.new_zeros(H, 0, dtype=dtype)]
    for rows, cols in _sequences(cu_seqlens_q, cu_seqlens_k):
        q_b, k_b, v_b = _heads_first(q[rows]), _heads_first(k[cols]), _heads_first(v[cols])
        out_b, lse_b = reference_attention_with_lse(
            q_b, k_b, v_b, causal, scale, dtype, window=window, softcap=softcap, sinks=sinks
        )
        outs.append(out_b[0].transpose(0, 1))  # (Tq_b, H, D)
        lses.append(lse_b[0])  # (H, Tq_b)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)  # (total_q, H, D), (H, total_q)


def reference_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    scale: float | None = None,
    *,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of reference_attention, written out: (dq, dk, dv) in the inputs' dtypes.

    q, grad_out: (B, H, Tq, D); k, v: (B, Hkv, Tk, D). With p = softmax(s) over the visible keys
    (0 for a row that sees none; the sink in the denominator with sinks), s = scale * q.k:
        dv = p^T dO,   dp = dO v^T,   ds = p * (dp - rowsum(p * dp)),
        dq = scale * ds k,   dk = scale * ds^T q   (dk, dv summed over the G heads of a group).
    rowsum(p * dp) = rowsum(dO * O) with sinks too: the sink has no value. With softcap c, ds is
    multiplied by the tanh's derivative 1 - (s / c)^2 (s the capped score). The sinks' own
    gradient is reference_sinks_grad.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = accumulate_dtype(q.dtype)
    qg, scores, row_sees_a_key = _grouped_scores(
        q, k, causal, scale, dtype, window, softcap
    )  # as the forward
    dog = grad_out.to(dtype).unflatten(1, qg.shape[1:3])  # (B, Hkv, G, Tq, D)
    kg = k.to(dtype).unsqueeze(2)  # (B, Hkv, 1, Tk, D)
    vg = v.to(dtype).unsqueeze(2)  # (B, Hkv, 1, Tk, D)
    probs = _softmax(scores, row_sees_a_key, sinks)[0]  # (B, Hkv, G, Tq, Tk)

    dv = (probs.transpose(-2, -1) @ dog).sum(2)  # (B, Hkv, Tk, D)
    dp = dog @ vg.transpose(-2, -1)  # (B, Hkv, G, Tq, Tk)
    ds = probs * (dp - (probs * dp).sum(-1, keepdim=True))  # (B, Hkv, G, Tq, Tk)
    if softcap > 0.0:
        # Clamped: a masked entry holds the dtype's min (p = 0 there, and no inf * 0 = NaN).
        ds = ds * (1 - (scores.clamp(-softcap, softcap) / softcap) ** 2)
    dq = scale * ds @ kg  # (B, Hkv, G, Tq, D)
    dk = scale * (ds.transpose(-2, -1) @ qg).sum(2)  # (B, Hkv, Tk, D)
    return dq.flatten(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def reference_sinks_grad(grad_out: Tensor, out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    """d(loss)/d(sinks), (H,) in sinks' dtype, from the forward's out and lse (the sink's term
    included): each row's output shrinks by its sink probability p_sink = exp(sinks[h] - lse), so
        dsinks[h] = -sum over batch and rows of p_sink * rowsum(dO * O).
    grad_out, out: (B, H, Tq, D); lse: (B, H, Tq). For packed rows, pass (1, H, total, D) views.
    """
    dtype = accumulate_dtype(out.dtype)
    delta = (grad_out.to(dtype) * out.to(dtype)).sum(-1)  # (B, H, Tq)
    p_sink = torch.exp(sinks.to(dtype)[:, None] - lse.to(dtype))  # (B, H, Tq)
    return -(p_sink * delta).sum((0, 2)).to(sinks.dtype)  # (H,)


def reference_attention_varlen_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    causal: bool = True,
    scale: float | None = None,
    **variants,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of reference_attention_varlen, one sequence at a time: (dq, dk, dv).

    grad_out, q: (total_q, H, D); k, v: (total_k, Hkv, D); each contiguous, in its input's dtype.
    variants (window, softcap, sinks) as reference_attention_backward's, per sequence.
    """
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)  # (total_q, H, D)
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)  # (total_k, Hkv, D)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)  # (total_k, Hkv, D)
    for rows, cols in _sequences(cu_seqlens_q, cu_seqlens_k):
        do_b, q_b = _heads_first(grad_out[rows]), _heads_first(q[rows])  # (1, H, Tq_b, D)
        k_b, v_b = _heads_first(k[cols]), _heads_first(v[cols])  # (1, Hkv, Tk_b, D)
        grads = reference_attention_backward(do_b, q_b, k_b, v_b, causal, scale, **variants)
        dq[rows], dk[cols], dv[cols] = (g[0].transpose(0, 1) for g in grads)
    return dq, dk, dv
