"""Flash-attention backward in one pass, deterministic (FASTGPT_TRITON_BACKWARD=onepass).

The same numerics as flash_bwd.py (p = exp2(min(fma(q.k, qk_scale, -lse2), 0)), ds = p (dp -
delta), the preprocess pass for delta and dsinks unchanged), with dq formed by the program that
forms ds, so each (query, key) tile pair recomputes p once and runs 5 matmuls instead of 7:

    s^T = k q^T    p^T    dv += p^T dO    dp^T = v dO^T    ds^T = p^T (dp^T - delta)
    dk += ds^T q   dq_acc[tile] += ds k

One program per (batch, KV head) walks the key tiles in an outer loop; per key tile it keeps k, v,
dk, dv in registers and visits, for every query head of the KV head's GQA group in order, the
query tiles that see the tile. dq goes into an fp32 accumulator (B, H, Tq, D) by load, add, store:
the program is alone on its heads' rows, and a CTA barrier after each key tile orders its stores
before the next key tile's loads, so every dq element is summed in increasing key-tile order, with
no atomics and no cross-program protocol: bit-reproducible. The host scales and casts dq at the
end. The grid is only B * Hkv programs: it pays where that fills the GPU (bench/NOTES_triton.md).
Variants: WINDOW and SOFTCAP as in flash_bwd.py; sinks need nothing here.
"""

import triton
import triton.language as tl

from .flash_bwd import dkdv_step, load_rows, store_rows, window_query_range
from .flash_fwd import head_base_offset, load_tile


@triton.jit
def onepass_tiles(
    dk, dv, k, v,  # (BLOCK_N, BLOCK_D): fp32 accumulators, then this program's K and V tiles
    q_src, do_src, acc_src, lse_ptr, delta_ptr,  # pointers at query tile `lo` (acc: dq fp32)
    stride_qm, stride_dom, stride_am, offs_n, offs_m, offs_d,
    lo, hi, Tq, HEAD_DIM, causal_shift, scale, qk_scale, win_left, win_right, softcap, cap_out,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SCORES_AS_FORWARD: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
):  # fmt: skip
    """Query tiles [lo, hi) against one key tile: dk, dv accumulated (keys x queries, as
    flash_bwd.dkdv_tiles) and ds k added into the dq accumulator rows of each tile."""
    for start_m in tl.range(lo, hi, BLOCK_M, num_stages=1 if MASKED else None):
        rows = start_m + offs_m
        q = load_tile(q_src, rows, offs_d, Tq, HEAD_DIM, MASKED, BLOCK_D != HEAD_DIM)
        do = load_tile(do_src, rows, offs_d, Tq, HEAD_DIM, MASKED, BLOCK_D != HEAD_DIM)
        if MASKED:
            lse = tl.load(lse_ptr + rows, mask=rows < Tq, other=float("inf"))
            delta = tl.load(delta_ptr + rows, mask=rows < Tq, other=0.0)
        else:
            lse = tl.load(lse_ptr + rows)
            delta = tl.load(delta_ptr + rows)
        dk, dv, ds_t = dkdv_step(
            dk, dv, k, v, q, do, lse, delta, rows, offs_n, Tq, causal_shift, scale, qk_scale,
            win_left, win_right, softcap, cap_out,
            MASKED, CAUSAL, DOT_PRECISION, SCORES_AS_FORWARD, WINDOW, SOFTCAP,
        )  # fmt: skip
        # This program alone owns these dq rows: plain load, add, store (L2, not a stale L1).
        acc_mask = (rows[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
        acc = tl.load(acc_src, mask=acc_mask, other=0.0, cache_modifier=".cg")
        acc = tl.dot(tl.trans(ds_t), k, acc, input_precision=DOT_PRECISION)
        tl.store(acc_src, acc, mask=acc_mask)
        q_src += BLOCK_M * stride_qm
        do_src += BLOCK_M * stride_dom
        acc_src += BLOCK_M * stride_am
    return dk, dv, q_src, do_src, acc_src


@triton.jit
def key_tile_query_range(
    start_n, Tq, Tk, causal_shift, win_left, win_right,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Query tiles of key tile [start_n, start_n + BLOCK_N), as bwd_dkdv_kernel splits them:
    [lo, full) and [tail, stop) masked, [full, tail) unmasked. A ragged key tile masks all."""
    tail = Tq // BLOCK_M * BLOCK_M
    if CAUSAL:  # query i sees key j iff i >= j - shift
        lo = tl.minimum(tl.maximum(start_n - causal_shift, 0), Tq) // BLOCK_M * BLOCK_M
        all_seen = tl.maximum(start_n + BLOCK_N - 1 - causal_shift, 0)
        full = tl.minimum(tl.cdiv(all_seen, BLOCK_M) * BLOCK_M, Tq)
    else:
        lo = start_n * 0
        full = start_n * 0
    full = tl.where(start_n + BLOCK_N > Tk, Tq, full)
    tail = tl.maximum(tail, full)
    stop = Tq
    if WINDOW:
        lo, full, tail, stop = window_query_range(
            start_n, causal_shift, win_left, win_right, Tq, BLOCK_M, BLOCK_N, start_n + BLOCK_N > Tk
        )
    return lo, full, tail, stop


@triton.jit
def bwd_onepass_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, Acc,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, GROUP, Tq, Tk, scale,
    qk_scale,  # fl(scale * log2 e), signed; Lse holds lse2 (base2_lse)
    TQ_BUCKET, TK_BUCKET,  # autotune keys only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCORES_AS_FORWARD: tl.constexpr,
    win_left=0, win_right=0,  # WINDOW: bounds, folded with causal by the host
    softcap=1.0, cap_out=1.0,  # SOFTCAP: c (> 0) and fl(c * qk_scale / scale)
    WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
):  # fmt: skip
    # Grid: (H_KV, B). Acc: (B, H, Tq, HEAD_DIM) fp32, contiguous, zeroed; Lse, Delta (B, H, Tq).
    h_kv = tl.program_id(0)
    b = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    causal_shift = Tk - Tq
    k_base = K + head_base_offset(b, h_kv, stride_kb, stride_kh)
    v_base = V + head_base_offset(b, h_kv, stride_vb, stride_vh)
    dk_base = DK + head_base_offset(b, h_kv, stride_dkb, stride_dkh)
    dv_base = DV + head_base_offset(b, h_kv, stride_dvb, stride_dvh)
    for start_n in range(0, Tk, BLOCK_N):  # key tiles in order: dq's summation order
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(
            k_base, start_n, Tk, stride_kn, offs_n, offs_d, HEAD_DIM, BLOCK_N, BLOCK_D, False
        )
        v = load_rows(
            v_base, start_n, Tk, stride_vn, offs_n, offs_d, HEAD_DIM, BLOCK_N, BLOCK_D, False
        )
        m_lo, m_full, m_tail, m_stop = key_tile_query_range(
            start_n, Tq, Tk, causal_shift, win_left, win_right, CAUSAL, WINDOW, BLOCK_M, BLOCK_N
        )
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(0, GROUP):  # the group's query heads in a fixed order
            h = h_kv * GROUP + g
            bh = b * H + h
            q_src = Q + head_base_offset(b, h, stride_qb, stride_qh)
            q_src += m_lo.to(tl.int64) * stride_qm + offs_m[:, None] * stride_qm + offs_d[None, :]
            do_src = DO + head_base_offset(b, h, stride_dob, stride_doh)
            do_src += m_lo.to(tl.int64) * stride_dom
            do_src += offs_m[:, None] * stride_dom + offs_d[None, :]
            acc_src = Acc + (bh.to(tl.int64) * Tq + m_lo) * HEAD_DIM
            acc_src += offs_m[:, None] * HEAD_DIM + offs_d[None, :]
            lse_ptr = Lse + bh.to(tl.int64) * Tq
            delta_ptr = Delta + bh.to(tl.int64) * Tq
            dk, dv, q_src, do_src, acc_src = onepass_tiles(
                dk, dv, k, v, q_src, do_src, acc_src, lse_ptr, delta_ptr,
                stride_qm, stride_dom, HEAD_DIM, offs_n, offs_m, offs_d,
                m_lo, m_full, Tq, HEAD_DIM, causal_shift, scale, qk_scale,
                win_left, win_right, softcap, cap_out,
                True, CAUSAL, BLOCK_M, BLOCK_D, DOT_PRECISION, SCORES_AS_FORWARD, WINDOW, SOFTCAP,
            )  # fmt: skip
            dk, dv, q_src, do_src, acc_src = onepass_tiles(
                dk, dv, k, v, q_src, do_src, acc_src, lse_ptr, delta_ptr,
                stride_qm, stride_dom, HEAD_DIM, offs_n, offs_m, offs_d,
                m_full, m_tail, Tq, HEAD_DIM, causal_shift, scale, qk_scale,
                win_left, win_right, softcap, cap_out,
                False, CAUSAL, BLOCK_M, BLOCK_D, DOT_PRECISION, SCORES_AS_FORWARD, WINDOW, SOFTCAP,
            )  # fmt: skip
            dk, dv, q_src, do_src, acc_src = onepass_tiles(
                dk, dv, k, v, q_src, do_src, acc_src, lse_ptr, delta_ptr,
                stride_qm, stride_dom, HEAD_DIM, offs_n, offs_m, offs_d,
                m_tail, m_stop, Tq, HEAD_DIM, causal_shift, scale, qk_scale,
                win_left, win_right, softcap, cap_out,
                True, CAUSAL, BLOCK_M, BLOCK_D, DOT_PRECISION, SCORES_AS_FORWARD, WINDOW, SOFTCAP,
            )  # fmt: skip
        dk = (dk * scale).to(DK.dtype.element_ty)
        store_rows(dk_base, dk, start_n, Tk, stride_dkn, offs_n, offs_d, HEAD_DIM, BLOCK_N, False)
        dv = dv.to(DV.dtype.element_ty)
        store_rows(dv_base, dv, start_n, Tk, stride_dvn, offs_n, offs_d, HEAD_DIM, BLOCK_N, False)
        tl.debug_barrier()  # this key tile's dq stores before the next tile's loads
