"""Split-K decode for one query row (Tq == 1): numerics and tiling only.

With one query row the work is reading K and V once, so the key axis is cut into S chunks
("splits") that run as separate programs, each over all the query heads of one GQA group (K/V
are read once per KV head, not once per query head). Each split leaves an unnormalised partial
(acc, m, l), m the running max of q.k and l relative to 2^(m * qk_scale); a second kernel
merges the S partials of a row:

    m = max_s m_s,  w_s = 2^((m_s - m) qk_scale),  out = sum_s w_s acc_s / sum_s w_s l_s

Causal needs no mask here: the single query row sits at the bottom right and sees every key.
"""

import triton
import triton.language as tl

from .flash_fwd import fwd_tiles, head_base_offset, load_tile, natural_lse


@triton.jit
def decode_split_kernel(
    Q, K, V, Acc, M, L,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H_KV, GROUP, Tk,
    qk_scale,  # |scale| * log2(e)
    chunk,
    TK_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
    SCALE_NEG: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Grid: (S, H_KV, B). Partials Acc: (B, H, S, HEAD_DIM) fp32; M, L: (B, H, S) fp32.
    pid_s = tl.program_id(0)
    n_splits = tl.num_programs(0)
    h_kv = tl.program_id(1)
    b = tl.program_id(2)
    pid_bh = b * H_KV + h_kv
    offs_g = tl.arange(0, BLOCK_G)  # query heads of the group, padded to a dot-sized tile
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = Q + head_base_offset(b, h_kv * GROUP, stride_qb, stride_qh)
    q_ptrs += offs_g[:, None] * stride_qh + offs_d[None, :]
    q = load_tile(q_ptrs, offs_g, offs_d, GROUP, HEAD_DIM, True, BLOCK_D != HEAD_DIM)

    lo = pid_s * chunk  # chunk is a multiple of BLOCK_N: only the last split has a ragged tile
    hi = tl.minimum(lo + chunk, Tk)
    hi_full = tl.minimum(hi, Tk // BLOCK_N * BLOCK_N)
    k_ptrs = K + head_base_offset(b, h_kv, stride_kb, stride_kh) + lo.to(tl.int64) * stride_kn
    k_ptrs += offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + head_base_offset(b, h_kv, stride_vb, stride_vh) + lo.to(tl.int64) * stride_vn
    v_ptrs += offs_n[:, None] * stride_vn + offs_d[None, :]

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i, k_ptrs, v_ptrs = fwd_tiles(
        acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_g, offs_n, offs_d,
        lo, hi_full, Tk, HEAD_DIM, 0, qk_scale,
        False, False, SCALE_NEG, BLOCK_N, BLOCK_D, DOT_PRECISION, False,  # pointer loads
    )  # fmt: skip
    acc, m_i, l_i, k_ptrs, v_ptrs = fwd_tiles(
        acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_g, offs_n, offs_d,
        hi_full, hi, Tk, HEAD_DIM, 0, qk_scale,
        True, False, SCALE_NEG, BLOCK_N, BLOCK_D, DOT_PRECISION, False,
    )  # fmt: skip

    # Row of a partial: ((b * H + h) * S + s), with h = h_kv * GROUP + g.
    rows = (pid_bh.to(tl.int64) * GROUP + offs_g) * n_splits + pid_s  # (BLOCK_G,)
    g_ok = offs_g < GROUP
    tl.store(M + rows, m_i, mask=g_ok)
    tl.store(L + rows, l_i, mask=g_ok)
    acc_ptrs = Acc + rows[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(acc_ptrs, acc, mask=g_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def decode_combine_kernel(
    Acc,
    M,
    L,
    Out,
    Lse,
    stride_ob,
    stride_oh,
    H,
    n_splits,
    qk_scale,  # |scale| * log2(e)
    scale,  # |scale|
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # Grid: (H, B). Out: (B, H, 1, HEAD_DIM) in the input dtype; Lse: (B, H, 1) fp32.
    h = tl.program_id(0)
    b = tl.program_id(1)
    pid_bh = b * H + h
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    rows = pid_bh.to(tl.int64) * n_splits + offs_s
    s_ok = offs_s < n_splits
    m_s = tl.load(M + rows, mask=s_ok, other=float("-inf"))
    l_s = tl.load(L + rows, mask=s_ok, other=0.0)
    acc_s = tl.load(
        Acc + rows[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    m = tl.max(m_s, 0)  # running maxima of q.k; every split holds a key, so m is finite
    # The shifts the splits used, bit for bit; padding splits weigh 0 (m_s = -inf, and
    # -inf * qk_scale is NaN when qk_scale = 0).
    w = tl.where(s_ok, tl.exp2(m_s * qk_scale - m * qk_scale), 0.0)
    l = tl.sum(w * l_s, 0)
    out = tl.sum(w[:, None] * acc_s, 0) / l  # (BLOCK_D,)
    lse = natural_lse(m, l, qk_scale, scale)
    o_ptrs = Out + head_base_offset(b, h, stride_ob, stride_oh) + offs_d
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(Lse + pid_bh, lse)
