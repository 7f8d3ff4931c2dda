"""The float64 oracle of packed variable-length attention and its error rule.

The oracle is written independently of fastgpt.reference: one (total_q, total_k) mask built
position by position from cu_seqlens (a block diagonal of causal or full blocks), keys repeated
per query head, one softmax over all keys. The rule is oracle.py's: at most twice the error of
plain PyTorch in the same dtype (this oracle computed in that dtype), plus the rounding floor of
the dtype and, for gradients, the first-order rounding of a flash-style backward
(oracle.flash_backward_floor, per sequence).
"""

from collections.abc import Callable, Sequence

import torch
from oracle import DEVICE, check_rule, flash_backward_floor, random_tensors


def cu_seqlens(lengths: Sequence[int], device: torch.device | str = DEVICE) -> torch.Tensor:
    """int32 (B + 1,) prefix sums of `lengths`: [0, l0, l0 + l1, ...]."""
    sums = [0]
    for n in lengths:
        sums.append(sums[-1] + n)
    return torch.tensor(sums, dtype=torch.int32, device=device)


def varlen_mask(lens_q: Sequence[int], lens_k: Sequence[int], causal: bool) -> torch.Tensor:
    """(total_q, total_k) bool, True where a query sees a key: same sequence, and with causal
    key j <= query i + (Tk_b - Tq_b) within the sequence (bottom-right)."""
    mask = torch.zeros(sum(lens_q), sum(lens_k), dtype=torch.bool)
    row = col = 0
    for tq, tk in zip(lens_q, lens_k, strict=True):
        for i in range(tq):
            for j in range(tk):
                mask[row + i, col + j] = not causal or j <= i + tk - tq
        row, col = row + tq, col + tk
    return mask


def varlen_oracle(q, k, v, lens_q, lens_k, causal, scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (total_q, H, D), lse (H, total_q)) computed in q's dtype; +inf lse and 0 out for a
    query that sees no key. q: (total_q, H, D); k, v: (total_k, Hkv, D)."""
    H, D = q.shape[1], q.shape[2]
    scale = D**-0.5 if scale is None else scale
    group = H // k.shape[1]
    k_, v_ = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (total_k, H, D)
    mask = varlen_mask(lens_q, lens_k, causal).to(q.device)  # (total_q, total_k)
    sees = mask.any(-1)  # (total_q,)
    s = torch.einsum("qhd,khd->hqk", q, k_) * scale  # (H, total_q, total_k)
    s = s.masked_fill(~mask, float("-inf"))
    s = torch.where(sees[:, None], s, 0.0)  # a row that sees nothing: no NaN, masked out below
    p = torch.softmax(s, dim=-1) * sees[:, None]  # (H, total_q, total_k)
    out = torch.einsum("hqk,khd->qhd", p, v_)  # (total_q, H, D)
    lse = torch.logsumexp(s, dim=-1).masked_fill(~sees, float("inf"))  # (H, total_q)
    return out, lse


def random_varlen(lens_q, lens_k, H, Hkv, D, dtype=torch.float32, seed=0, **kwargs):
    """q (total_q, H, D), k, v (total_k, Hkv, D) and a gradient for the output (total_q, H, D)."""
    tq, tk = sum(lens_q), sum(lens_k)
    shapes = [(tq, H, D), (tk, Hkv, D), (tk, Hkv, D), (tq, H, D)]
    return random_tensors(*shapes, dtype=dtype, seed=seed, **kwargs)


def varlen_floors(q, k, v, grad_out, lens_q, lens_k, causal, scale, dtype):
    """oracle.flash_backward_floor per sequence, packed: (fq, fk, fv) shaped like q, k, v."""
    floors = [torch.zeros_like(t) for t in (q, k, v)]
    row = col = 0
    for tq, tk in zip(lens_q, lens_k, strict=True):
        rows, cols = slice(row, row + tq), slice(col, col + tk)
        dense = [t.transpose(0, 1)[None] for t in (q[rows], k[cols], v[cols], grad_out[rows])]
        fq, fk, fv = flash_backward_floor(*dense, causal, scale, dtype)
        for floor, f, where in zip(floors, (fq, fk, fv), (rows, cols, cols), strict=True):
            floor[where] = f[0].transpose(0, 1)
        row, col = row + tq, col + tk
    return floors


def check_varlen_against_float64(
    fn: Callable,
    leaves: list[torch.Tensor],
    grad_out: torch.Tensor,
    lens_q: Sequence[int],
    lens_k: Sequence[int],
    causal: bool,
    *,
    views: Callable | None = None,
    scale: float | None = None,
    what: str = "",
) -> None:
    """Assert fn(q, k, v)'s output and leaf gradients meet the 2x-of-PyTorch rule against the
    float64 oracle; q, k, v = views(*leaves) (the leaves themselves without views)."""
    dtype = leaves[0].dtype

    def oracle(q, k, v):  # in q's dtype: float64 for the exact side, the leaves' for plain
        return varlen_oracle(q, k, v, lens_q, lens_k, causal, scale)[0]

    def floors_of(q, k, v, grad_out):
        return varlen_floors(q, k, v, grad_out, lens_q, lens_k, causal, scale, dtype)

    check_rule(fn, oracle, oracle, floors_of, leaves, grad_out, views, what)


def check_one_graph_for_all_totals(fn: Callable, H: int, Hkv: int, D: int) -> None:
    """torch.compile(fn, fullgraph=True) with the packed totals marked dynamic: a second mix of
    lengths (same B, other totals) reuses the graph, outputs and gradients equal eager bit for
    bit. fn(q, k, v, cu_q, cu_k) -> (total_q, H, D); q: (total_q, H, D), k, v: (total_k, Hkv, D)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    mixes = [([5, 3, 8], [5, 9, 8]), ([17, 1, 30], [2, 1, 31])]  # same B, other totals
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lens_q, lens_k in mixes:
            q, k, v, grad_out = random_varlen(lens_q, lens_k, H, Hkv, D, seed=len(lens_q))
            results = []
            for run in (fn, compiled):
                leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
                for t in leaves:
                    torch._dynamo.mark_dynamic(t, 0)
                out = run(*leaves, cu_seqlens(lens_q), cu_seqlens(lens_k))
                results.append([out, *torch.autograd.grad(out, leaves, grad_out)])
            for got, want in zip(results[1], results[0], strict=True):
                torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert counter.frame_count == 1
