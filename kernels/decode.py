"""Split-K decode for one query row (Tq == 1): numerics and tiling only.

With one query row the work is reading K and V once, so the key axis is cut into S chunks
("splits") that run as separate programs, each over all the query heads of one GQA group (K/V
are read once per KV head, not once per query head). Each split leaves an unnormalised partial
(acc, m, l), m the running max of q.k and l relative to 2^(m * qk_scale); a second kernel
merges the S partials of a row:

    m = max_s m_s,  w_s = 2^((m_s - m) qk_scale),  out = sum_s w_s acc_s / sum_s w_s l_s

Causal needs no mask here: the single query row sits at the bottom right and sees every key.

KV-cache decode (kvcache_split_kernel) is the same split-K scheme over a cache with a length per
sequence, dense (B, Tmax, Hkv, D) or paged (num_blocks, page_size, Hkv, D) through a block table,
and Tq >= 1 query rows: the M dim of a tile is the GQA group times Tq (rows r = i * GROUP + g),
so every key tile read serves all of them. A split past its sequence's end leaves m = -inf, l = 0
and weighs nothing in the merge; a row that sees no key at all comes out 0 (lse +inf).
"""

import triton
import triton.language as tl

from .flash_fwd import fwd_tiles, head_base_offset, load_tile, natural_lse, tanh, window_visible


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
        lo, hi_full, Tk, HEAD_DIM, 0, qk_scale, 0, 0, 1.0, 1.0,  # no window, no softcap
        False, False, SCALE_NEG, BLOCK_N, BLOCK_D, DOT_PRECISION, False, False, False,  # pointers
    )  # fmt: skip
    acc, m_i, l_i, k_ptrs, v_ptrs = fwd_tiles(
        acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_g, offs_n, offs_d,
        hi_full, hi, Tk, HEAD_DIM, 0, qk_scale, 0, 0, 1.0, 1.0,
        True, False, SCALE_NEG, BLOCK_N, BLOCK_D, DOT_PRECISION, False, False, False,
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
    Sinks=None,  # (H,) fp32 sink logits (the KV-cache path), or None
):
    # Grid: (H, B). Out: (B, H, 1, HEAD_DIM) in the input dtype; Lse: (B, H, 1) fp32. The
    # KV-cache path launches it over (H, B * Tq) rows of its (B, Tq, H, D) output.
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
    m = tl.max(m_s, 0)  # running maxima of q.k; -inf when no split saw a key
    # The shifts the splits used, bit for bit; padding and empty splits weigh 0 (m_s = -inf, and
    # -inf * qk_scale is NaN when qk_scale = 0).
    m_shift = tl.where(m == float("-inf"), 0.0, m * qk_scale)
    w = tl.where(m_s > float("-inf"), tl.exp2(m_s * qk_scale - m_shift), 0.0)
    l = tl.sum(w * l_s, 0)
    empty = l == 0.0  # the row sees no key: out 0, lse +inf
    out = tl.sum(w[:, None] * acc_s, 0) / tl.where(empty, 1.0, l)  # (BLOCK_D,)
    lse = natural_lse(tl.where(empty, 0.0, m), l, qk_scale, scale)
    if Sinks is not None:  # exp(sink) joins the denominator (out 0, lse = sink for an empty row)
        lse_keys = tl.where(empty, float("-inf"), lse)
        sink = tl.load(Sinks + h).to(tl.float32)
        top = tl.maximum(lse_keys, sink)
        lse = top + tl.log(tl.exp(lse_keys - top) + tl.exp(sink - top))
        out = out * tl.exp(lse_keys - lse)
    else:
        lse = tl.where(empty, float("inf"), lse)
    o_ptrs = Out + head_base_offset(b, h, stride_ob, stride_oh) + offs_d
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(Lse + pid_bh, lse)


@triton.jit
def kv_rows(
    Table, b, start_n, offs_n, blocks_per_seq, stride_cb, stride_ct, seqlen,
    MASKED: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Element offsets (BLOCK_N,) int64 of the cache rows of keys start_n + offs_n of sequence b
    (the head is added by the caller). Paged: key j is row j % PAGE_SIZE of page
    Table[b, j // PAGE_SIZE]; a tile inside one page reads one table entry, else one per key
    (keys >= seqlen read page 0 and are masked by the caller)."""
    cols = start_n + offs_n
    if PAGED:
        table = Table + b.to(tl.int64) * blocks_per_seq
        if PAGE_SIZE % BLOCK_N == 0:  # the tile lies in one page
            page = tl.load(table + start_n // PAGE_SIZE).to(tl.int64)
            return page * stride_cb + (start_n % PAGE_SIZE + offs_n) * stride_ct
        if MASKED:
            pages = tl.load(table + cols // PAGE_SIZE, mask=cols < seqlen, other=0)
        else:
            pages = tl.load(table + cols // PAGE_SIZE)
        return pages.to(tl.int64) * stride_cb + (cols % PAGE_SIZE) * stride_ct
    return b.to(tl.int64) * stride_cb + cols.to(tl.int64) * stride_ct


@triton.jit
def kv_tiles(
    acc, m_i, l_i, q, rows_i,  # running (acc, m, l); q (BLOCK_M, BLOCK_D); query index per row
    K, V, Table, b, lo, hi, seqlen, causal_shift, qk_scale, blocks_per_seq,
    stride_kb, stride_kt, stride_vb, stride_vt, offs_n, offs_d, HEAD_DIM,
    win_left, win_right, cap_in, cap_out,  # window bounds; softcap: |scale| / c, c / |scale|
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, SCALE_NEG: tl.constexpr, PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    """Fold the cached keys [lo, hi) of sequence b into (acc, m_i, l_i), as flash_fwd.fwd_tiles
    does: K and V point at the head's first element, each tile's rows are located by kv_rows.
    MASKED adds the length mask (keys >= seqlen) and, when CAUSAL, the bottom-right causal mask
    (query i sees key j <= i + causal_shift)."""
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=1 if MASKED else None):
        cols = start_n + offs_n
        k_rows = kv_rows(
            Table, b, start_n, offs_n, blocks_per_seq, stride_kb, stride_kt, seqlen,
            MASKED, PAGED, PAGE_SIZE, BLOCK_N,
        )  # fmt: skip
        v_rows = kv_rows(
            Table, b, start_n, offs_n, blocks_per_seq, stride_vb, stride_vt, seqlen,
            MASKED, PAGED, PAGE_SIZE, BLOCK_N,
        )  # fmt: skip
        k_ptrs = K + k_rows[:, None] + offs_d[None, :]
        v_ptrs = V + v_rows[:, None] + offs_d[None, :]
        k = load_tile(k_ptrs, cols, offs_d, seqlen, HEAD_DIM, MASKED, BLOCK_D != HEAD_DIM)
        v = load_tile(v_ptrs, cols, offs_d, seqlen, HEAD_DIM, MASKED, BLOCK_D != HEAD_DIM)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) q.k
        if SCALE_NEG:
            qk = -qk
        if SOFTCAP:  # as flash_fwd.fwd_tiles: |scale| * qk becomes c * tanh(|scale| * qk / c)
            qk = tanh(qk * cap_in) * cap_out
        if MASKED:
            visible = cols[None, :] < seqlen
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows_i[:, None] + causal_shift)
            if WINDOW:
                visible = visible & window_visible(
                    rows_i[:, None], cols[None, :], causal_shift, win_left, win_right
                )
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        shift = m_new * qk_scale
        if MASKED:
            shift = tl.where(m_new == float("-inf"), 0.0, shift)
        p = tl.exp2(qk * qk_scale - shift[:, None])
        if MASKED:
            p = tl.where(visible, p, 0.0)
        alpha = tl.exp2(tl.where(m_i == float("-inf"), float("-inf"), m_i * qk_scale) - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def kv_window_range(
    lo, hi, mb, seqlen, shift, win_left, win_right, GROUP, Tq,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The keys of split [lo, hi) (lo a multiple of BLOCK_N) that the query rows of M block mb
    see under the window: (lo, full_lo, full_hi, end). [lo, full_lo) and [full_hi, end) run
    masked, [full_lo, full_hi) holds whole tiles every row sees; nothing outside is visited."""
    first = mb * BLOCK_M // GROUP  # the block's first and last query index
    last = tl.minimum((mb * BLOCK_M + BLOCK_M - 1) // GROUP, Tq - 1)
    start = tl.minimum(tl.maximum(first + shift - win_left, 0), seqlen) // BLOCK_N * BLOCK_N
    lo = tl.maximum(lo, start)
    end = tl.maximum(tl.minimum(hi, last + shift + win_right + 1), lo)
    full_lo = tl.cdiv(tl.maximum(last + shift - win_left, 0), BLOCK_N) * BLOCK_N
    full_hi = (first + shift + win_right + 1) // BLOCK_N * BLOCK_N
    full_hi = tl.minimum(full_hi, seqlen // BLOCK_N * BLOCK_N)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), end)
    full_hi = tl.maximum(tl.minimum(full_hi, end), full_lo)
    return lo, full_lo, full_hi, end


@triton.jit
def kvcache_split_kernel(
    Q, K, V, Seqlens, Table, Acc, M, L,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    blocks_per_seq,  # row stride of the block table (paged only)
    H, H_KV, GROUP, Tq,
    qk_scale,  # |scale| * log2(e)
    chunk,  # keys per split, a multiple of every BLOCK_N
    M_ROWS,  # autotune key only: GROUP * Tq
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    SCALE_NEG: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    win_left=0, win_right=0,  # WINDOW: bounds, causal folded in by the host
    cap_in=1.0, cap_out=1.0,  # SOFTCAP: |scale| / c and c / |scale|
    WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
):  # fmt: skip
    # Grid: (S, H_KV * cdiv(GROUP * Tq, BLOCK_M), B). Partials Acc: (B, Tq, H, S, HEAD_DIM) fp32;
    # M, L: (B, Tq, H, S) fp32. K / V: (B, Tmax, H_KV, D) or paged (pages, PAGE_SIZE, H_KV, D),
    # strides (b or page, t, h). Seqlens: (B,) int32; Table: (B, blocks_per_seq) int32.
    pid_s = tl.program_id(0)
    n_splits = tl.num_programs(0)
    n_mblocks = tl.cdiv(GROUP * Tq, BLOCK_M)
    h_kv = tl.program_id(1) // n_mblocks
    mb = tl.program_id(1) % n_mblocks
    b = tl.program_id(2)
    seqlen = tl.load(Seqlens + b)
    offs_r = mb * BLOCK_M + tl.arange(0, BLOCK_M)  # rows r = i * GROUP + g of the group's tile
    rows_i = offs_r // GROUP  # query index
    heads = h_kv * GROUP + offs_r % GROUP  # query head
    r_ok = offs_r < GROUP * Tq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_rows = b.to(tl.int64) * stride_qb + rows_i * stride_qt + heads * stride_qh
    q = load_tile(Q + q_rows[:, None] + offs_d[None, :], offs_r, offs_d, GROUP * Tq, HEAD_DIM,
                  True, BLOCK_D != HEAD_DIM)  # fmt: skip

    # Keys [lo, hi) of this split; [lo, hi_full) every row sees (no mask), [hi_full, hi) the
    # ragged tail and, when causal, the last Tq - 1 keys (query 0 sees j <= seqlen - Tq).
    causal_shift = seqlen - Tq
    lo = pid_s * chunk
    hi = tl.minimum(lo + chunk, seqlen)
    seen_by_all = tl.maximum(causal_shift + 1, 0) if CAUSAL else seqlen
    hi_full = tl.minimum(hi, tl.maximum(lo, seen_by_all // BLOCK_N * BLOCK_N))
    K += h_kv.to(tl.int64) * stride_kh
    V += h_kv.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if WINDOW:  # [lo, w_full) masked (the window's left edge), then as without
        lo, w_full, hi_full, hi = kv_window_range(
            lo, hi, mb, seqlen, causal_shift, win_left, win_right, GROUP, Tq, BLOCK_M, BLOCK_N
        )
        acc, m_i, l_i = kv_tiles(
            acc, m_i, l_i, q, rows_i, K, V, Table, b, lo, w_full, seqlen, causal_shift, qk_scale,
            blocks_per_seq, stride_kb, stride_kt, stride_vb, stride_vt, offs_n, offs_d, HEAD_DIM,
            win_left, win_right, cap_in, cap_out, True, CAUSAL, SCALE_NEG, PAGED, PAGE_SIZE,
            BLOCK_N, BLOCK_D, DOT_PRECISION, WINDOW, SOFTCAP,
        )  # fmt: skip
        lo = w_full
    acc, m_i, l_i = kv_tiles(
        acc, m_i, l_i, q, rows_i, K, V, Table, b, lo, hi_full, seqlen, causal_shift, qk_scale,
        blocks_per_seq, stride_kb, stride_kt, stride_vb, stride_vt, offs_n, offs_d, HEAD_DIM,
        win_left, win_right, cap_in, cap_out, False, CAUSAL, SCALE_NEG, PAGED, PAGE_SIZE,
        BLOCK_N, BLOCK_D, DOT_PRECISION, WINDOW, SOFTCAP,
    )  # fmt: skip
    acc, m_i, l_i = kv_tiles(
        acc, m_i, l_i, q, rows_i, K, V, Table, b, hi_full, hi, seqlen, causal_shift, qk_scale,
        blocks_per_seq, stride_kb, stride_kt, stride_vb, stride_vt, offs_n, offs_d, HEAD_DIM,
        win_left, win_right, cap_in, cap_out, True, CAUSAL, SCALE_NEG, PAGED, PAGE_SIZE,
        BLOCK_N, BLOCK_D, DOT_PRECISION, WINDOW, SOFTCAP,
    )  # fmt: skip

    # Row of a partial: ((b * Tq + i) * H + h) * S + s.
    rows = ((b.to(tl.int64) * Tq + rows_i) * H + heads) * n_splits + pid_s  # (BLOCK_M,)
    tl.store(M + rows, m_i, mask=r_ok)
    tl.store(L + rows, l_i, mask=r_ok)
    acc_ptrs = Acc + rows[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(acc_ptrs, acc, mask=r_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
