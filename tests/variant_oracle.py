"""An oracle for the attention variants written independently of fastgpt.reference: a (Tq, Tk)
mask built key by key from the window rule, keys repeated per query head, -inf for hidden keys, the
sink as one more column of logits (-inf without sinks) and one softmax, in the inputs' dtype
(float64 in the tests). Gradients, d(sinks) included, come from autograd through it."""

import functools

import torch


@functools.cache
def visible(tq: int, tk: int, causal: bool, window: tuple[int, int]) -> torch.Tensor:
    """(Tq, Tk) bool, key by key: j in [d - left, d + right] with d = i + Tk - Tq, and j <= d
    when causal; -1 is unbounded."""
    left, right = window
    mask = torch.zeros(tq, tk, dtype=torch.bool)
    for i in range(tq):
        d = i + tk - tq
        for j in range(tk):
            ok = (left < 0 or j >= d - left) and (right < 0 or j <= d + right)
            mask[i, j] = ok and (not causal or j <= d)
    return mask


def oracle(q, k, v, causal, window=(-1, -1), softcap=0.0, sinks=None, scale=None):
    """(out (B, H, Tq, D), lse (B, H, Tq)) in q's dtype; lse is log(sum of exp over the visible
    keys + exp(sink)), +inf for a row with neither."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    group = H // k.shape[1]
    k_, v_ = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (B, H, Tk, D)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k_) * scale  # (B, H, Tq, Tk)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~visible(Tq, Tk, causal, tuple(window)), float("-inf"))
    if sinks is None:
        sink = torch.full((B, H, Tq, 1), float("-inf"), dtype=q.dtype)
    else:
        sink = sinks.to(q.dtype)[None, :, None, None].expand(B, H, Tq, 1)
    logits = torch.cat([s, sink], dim=-1)  # (B, H, Tq, Tk + 1)
    lse = torch.logsumexp(logits, dim=-1)  # -inf for a row with no key and no sink
    alive = torch.isfinite(lse)[..., None]
    p = torch.softmax(torch.where(alive, logits, 0.0), dim=-1)[..., :Tk] * alive  # (B, H, Tq, Tk)
    out = p @ v_  # (B, H, Tq, D)
    return out, torch.where(torch.isfinite(lse), lse, float("inf"))
