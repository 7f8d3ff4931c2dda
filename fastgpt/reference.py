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
"""

import torch
from torch import Tensor


def causal_mask(tq: int, tk: int, device: torch.device | str | None = None) -> Tensor:
    """(Tq, Tk) bool mask, True where query i may see key j (bottom-right aligned)."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of scores and softmax: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    scale: float | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention by the book: matmul, mask, softmax, matmul. Returns (out, lse).

    out has q's dtype and shape (B, H, Tq, D); lse is (B, H, Tq) in the compute dtype.
    compute_dtype defaults to float32 (float64 for float64 inputs); the tests pass q.dtype to get
    "plain PyTorch attention in the same precision" as the error baseline for the kernels.
    """
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = H // Hkv
    scale = D**-0.5 if scale is None else scale
    dtype = compute_dtype or accumulate_dtype(q.dtype)

    # Group query heads by the kv head they share: no copy of K or V per query head.
    qg = q.to(dtype).unflatten(1, (Hkv, group))  # (B, Hkv, G, Tq, D)
    kg = k.to(dtype).unsqueeze(2)  # (B, Hkv, 1, Tk, D)
    vg = v.to(dtype).unsqueeze(2)  # (B, Hkv, 1, Tk, D)
    scores = (qg @ kg.transpose(-2, -1)) * scale  # (B, Hkv, G, Tq, Tk)

    if causal:
        visible = causal_mask(Tq, Tk, q.device)  # (Tq, Tk)
        # A finite "minus infinity": masked entries underflow to exactly 0 after the max is
        # subtracted, and a row with no visible key never produces inf - inf = NaN.
        scores = scores.masked_fill(~visible, torch.finfo(dtype).min)
        row_sees_a_key = visible.any(dim=-1)  # (Tq,)
    else:
        row_sees_a_key = torch.full((Tq,), Tk > 0, dtype=torch.bool, device=q.device)

    probs = torch.softmax(scores, dim=-1) * row_sees_a_key[:, None]  # (B, Hkv, G, Tq, Tk)
    out = probs @ vg  # (B, Hkv, G, Tq, D)
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hkv, G, Tq)
    lse = lse.masked_fill(~row_sees_a_key, float("inf"))
    return out.flatten(1, 2).to(q.dtype), lse.flatten(1, 2)


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None
) -> Tensor:
    """Attention output only; see reference_attention_with_lse. (B, H, Tq, D) in q's dtype."""
    return reference_attention_with_lse(q, k, v, causal, scale)[0]
