"""Flash-attention backward: numerics and tiling only (launches live in attention.py).

With s = scale * q . k, p = exp(s - lse) recomputed from the forward's row log-sum-exp as one
FMA and exp2: p = exp2(min(fma(q.k, qk_scale, -lse2), 0)) with qk_scale = fl(scale * log2(e)) and
lse2 = fl(lse * qk_scale / scale), a base-2 lse the host derives per row (attention.base2_lse);
the Lse the dK/dV and dQ kernels read is that lse2 (see p_exponent):

    dv = p^T dO          dp = dO v^T          ds = p * (dp - delta),  delta = rowsum(dO * O)
    dk = scale * ds^T q  dq = scale * ds k

Three passes, no atomics (deterministic by construction):
  1. preprocess: delta per query row;
  2. dK/dV: one program per key tile of one KV head and a slice of its GQA group's query heads,
     looping over their query tiles. With one slice (SPLITS = 1) it alone writes its dk/dv rows;
     with more (a grid smaller than the GPU) each slice writes an fp32 partial that the host sums
     in a fixed order;
  3. dQ: one program per query tile, looping over the key tiles it sees.
Both loops skip tiles the causal mask hides and mask only the diagonal / ragged tiles.

Variants (as the forward, compiled out when off): WINDOW and SOFTCAP recompute the forward's
scores and mask, and SOFTCAP multiplies ds by the tanh's derivative 1 - t^2 (t = tanh(s / c)).
Both loops visit only the tiles the window touches. Sinks need nothing in the dK/dV and dQ passes
(lse includes the sink; rowsum(p * dp) = rowsum(dO * O) still, the sink having no value); their
gradient dsinks[h] = -sum over rows of exp(sinks[h] - lse) * delta is formed in the preprocess
pass as one partial per (batch, head, query block), summed on the host (no atomics).

IS_VARLEN (constexpr): packed sequences, as in the forward (flash_fwd.py). Programs read their
sequence's rows from CuQ / CuK and exit past its end; lse and delta are (H, total_q). The
preprocess pass needs no switch: it runs over the packed rows as one sequence.
"""

import triton
import triton.language as tl

from .flash_fwd import (
    head_base_offset,
    load_tile,
    plain_key_range,
    query_program,
    row_base_offset,
    sequence_span,
    stats_offset,
    tanh,
    tile_descriptor,
    window_key_range,
    window_visible,
)


@triton.jit
def bwd_preprocess_kernel(
    Out, DO, Delta,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    H, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    Lse=None, Sinks=None, DSinks=None,  # sinks: lse (B, H, Tq), sinks (H,), partials (B*H, grid0)
):  # fmt: skip
    # Grid: (cdiv(Tq, BLOCK_M), H, B). Delta: (B, H, Tq) fp32, contiguous.
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    pid_bh = b * H + h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o_ptrs = Out + head_base_offset(b, h, stride_ob, stride_oh)
    o_ptrs += offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :]
    do_ptrs = DO + head_base_offset(b, h, stride_dob, stride_doh)
    do_ptrs += offs_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :]
    o = load_tile(o_ptrs, offs_m, offs_d, Tq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    do = load_tile(do_ptrs, offs_m, offs_d, Tq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
    tl.store(Delta + pid_bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)
    if Sinks is not None:  # this block's share of dsinks[h] = -sum_rows exp(sink - lse) * delta
        lse = tl.load(Lse + pid_bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=float("inf"))
        p_sink = tl.exp(tl.load(Sinks + h).to(tl.float32) - lse)  # (BLOCK_M,), 0 past the end
        tl.store(DSinks + pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m, -tl.sum(p_sink * delta))


@triton.jit
def p_exponent(qk, qk_scale, lse2):
    """log2 of p = exp(scale * qk - lse), clamped at 0 (p <= 1), for raw products qk: one fma.

    qk_scale = fl(scale * log2 e) and lse2 = fl(lse * qk_scale / scale), so qk * qk_scale - lse2
    is (qk_scale / scale) * (scale * qk - lse): the rounding of qk_scale cancels rather than
    scaling the score, and the fma rounds the product only with the (small, where p is not)
    difference. lse2 = +inf (a row that sees no key) gives -inf: p = 0 exactly. The clamp matters
    at scores ~1e10, where lse's rounding exceeds 128 and exp2 would overflow.
    """
    return tl.minimum(tl.fma(qk, qk_scale, -lse2), 0.0)


@triton.jit
def capped_exponent(qk, scale, softcap, cap_out, lse2):
    """(log2 p, t) for softcapped scores c * t, t = tanh(scale * qk / c): one fma with cap_out =
    fl(c * qk_scale / scale), the cap in lse2's base-2 units; clamped as p_exponent."""
    t = tanh(qk * (scale / softcap))
    return tl.minimum(tl.fma(t, cap_out, -lse2), 0.0), t


@triton.jit
def window_query_range(start_n, shift, win_left, win_right, Tq, BLOCK_M, BLOCK_N, RAGGED):
    """Query tiles that see keys [start_n, start_n + BLOCK_N) under the window: (lo, full_lo,
    full_hi, end), as window_key_range with rows and keys swapped (query i sees key j iff
    j - shift - win_right <= i <= j - shift + win_left). RAGGED (a key tile past Tk): no tile is
    unmasked."""
    last = start_n + BLOCK_N - 1
    lo = tl.minimum(tl.maximum(start_n - shift - win_right, 0), Tq) // BLOCK_M * BLOCK_M
    end = tl.maximum(tl.minimum(last - shift + win_left + 1, Tq), lo)
    full_lo = tl.cdiv(tl.maximum(last - shift - win_right, 0), BLOCK_M) * BLOCK_M
    full_hi = (start_n - shift + win_left + 1) // BLOCK_M * BLOCK_M
    full_hi = tl.where(RAGGED, 0, tl.minimum(full_hi, Tq // BLOCK_M * BLOCK_M))
    full_lo = tl.minimum(tl.maximum(full_lo, lo), end)
    full_hi = tl.maximum(tl.minimum(full_hi, end), full_lo)
    return lo, full_lo, full_hi, end


@triton.jit
def load_rows(
    base, start, n_rows, stride_row, offs_r, offs_d, HEAD_DIM,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    """Rows [start, start + BLOCK_R) (offs_r) of one (n_rows, HEAD_DIM) head slice as a
    (BLOCK_R, BLOCK_D) tile, zeros past either end; through a tensor descriptor with USE_TMA."""
    if USE_TMA:
        desc = tile_descriptor(base, n_rows, HEAD_DIM, stride_row, BLOCK_R, BLOCK_D)
        return desc.load([start, 0])
    else:
        ptrs = base + offs_r[:, None].to(tl.int64) * stride_row + offs_d[None, :]
        return load_tile(ptrs, offs_r, offs_d, n_rows, HEAD_DIM, True, BLOCK_D != HEAD_DIM)


@triton.jit
def store_rows(
    base, tile, start, n_rows, stride_row, offs_r, offs_d, HEAD_DIM,
    BLOCK_R: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    """Store `tile` as rows [start, start + BLOCK_R) of one head slice, nothing past either end."""
    if USE_TMA:
        desc = tile_descriptor(base, n_rows, HEAD_DIM, stride_row, BLOCK_R, tile.shape[1])
        desc.store([start, 0], tile)
    else:
        ptrs = base + offs_r[:, None].to(tl.int64) * stride_row + offs_d[None, :]
        tl.store(ptrs, tile, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def dkdv_step(
    dk, dv, k, v,  # (BLOCK_N, BLOCK_D): fp32 accumulators, then this program's K and V tiles
    q, do, lse, delta, rows,  # one query tile (BLOCK_M, BLOCK_D), its rows' lse2 and delta
    offs_n, Tq, causal_shift, scale, qk_scale, win_left, win_right, softcap, cap_out,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SCORES_AS_FORWARD: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    """One query tile against this program's key tile: p^T recomputed once, dv += p^T dO and
    dk += ds^T q (keys x queries). Returns dk, dv and ds^T (BLOCK_N, BLOCK_M) in q's dtype, which
    the one-pass kernel also multiplies into dq."""
    if SCORES_AS_FORWARD:
        # q k^T then transposed: the forward's product, bit for bit (the interpreter's matmul
        # rounds k q^T differently, and scores ~1e3 magnify that in p = exp(s - lse)).
        qk_t = tl.trans(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION))
    else:
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    if SOFTCAP:
        x_t, t_t = capped_exponent(qk_t, scale, softcap, cap_out, lse[None, :])
    else:
        x_t = p_exponent(qk_t, qk_scale, lse[None, :])
    if MASKED:
        visible = rows[None, :] < Tq
        if CAUSAL:
            visible = visible & (offs_n[:, None] <= rows[None, :] + causal_shift)
        if WINDOW:
            visible = visible & window_visible(
                rows[None, :], offs_n[:, None], causal_shift, win_left, win_right
            )
        x_t = tl.where(visible, x_t, float("-inf"))
    p_t = tl.exp2(x_t)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
    ds_t = p_t * (dp_t - delta[None, :])
    if SOFTCAP:
        ds_t = ds_t * (1.0 - t_t * t_t)
    ds_t = ds_t.to(q.dtype)
    dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION)
    return dk, dv, ds_t


@triton.jit
def dkdv_tiles(
    dk, dv, k, v,  # (BLOCK_N, BLOCK_D): fp32 accumulators, then this program's K and V tiles
    q_src, do_src, lse_ptr, delta_ptr, stride_qm, stride_dom,  # pointers at query tile `lo`,
    offs_n, offs_m, offs_d,  # or with USE_TMA descriptors of this head's Q and dO (Tq, HEAD_DIM)
    lo, hi, Tq, HEAD_DIM, causal_shift, scale, qk_scale, win_left, win_right, softcap, cap_out,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SCORES_AS_FORWARD: tl.constexpr, USE_TMA: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    """Accumulate the query tiles [lo, hi) into dk, dv, kept transposed (keys x queries)."""
    # Masked (diagonal, ragged) tiles are not software-pipelined, as in the forward.
    for start_m in tl.range(lo, hi, BLOCK_M, num_stages=1 if MASKED else None):
        rows = start_m + offs_m
        if USE_TMA:  # rows past Tq and columns past HEAD_DIM come back as zeros
            q = q_src.load([start_m, 0])
            do = do_src.load([start_m, 0])
        else:
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
        if not USE_TMA:
            q_src += BLOCK_M * stride_qm
            do_src += BLOCK_M * stride_dom
    return dk, dv, q_src, do_src


@triton.jit
def bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    CuQ, CuK,  # IS_VARLEN: int32 cu_seqlens (B + 1,) of q and k; None for a dense batch
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, H_KV, GROUP, SPLITS, Tq, Tk, scale,  # IS_VARLEN: Tq, Tk are total_q, total_k
    qk_scale,  # fl(scale * log2 e), signed; Lse holds lse2 (base2_lse)
    TQ_BUCKET, TK_BUCKET,  # autotune keys only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCORES_AS_FORWARD: tl.constexpr, USE_TMA: tl.constexpr = False,
    IS_VARLEN: tl.constexpr = False,
    win_left=0, win_right=0,  # WINDOW: bounds, folded with causal by the host
    softcap=1.0, cap_out=1.0,  # SOFTCAP: c (> 0) and fl(c * qk_scale / scale)
    WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
):  # fmt: skip
    # USE_TMA: K/V/Q/dO loads and the dK/dV stores through tensor descriptors, as in the forward.
    # Grid: (cdiv(Tk, BLOCK_N), H_KV * SPLITS, B) (IS_VARLEN: Tk = max_seqlen_k). Early key tiles
    # see the most queries under the causal mask, so they are launched first. Program
    # (n, h_out, b) covers the query heads [split * per_split, (split + 1) * per_split) of KV
    # head h_kv's group and writes head h_out of DK / DV: the result itself when SPLITS = 1,
    # else an fp32 partial (B, H_KV * SPLITS, ...).
    pid_n = tl.program_id(0)
    h_out = tl.program_id(1)
    b = tl.program_id(2)
    h_kv = h_out // SPLITS
    per_split = GROUP // SPLITS
    first_head = h_kv * GROUP + h_out % SPLITS * per_split
    start_n = pid_n * BLOCK_N
    total_q = Tq  # IS_VARLEN: the packed total (lse's row length); Tq, Tk become sequence b's
    if IS_VARLEN:
        q_start, Tq = sequence_span(CuQ, b)
        k_start, Tk = sequence_span(CuK, b)
        if start_n >= Tk:  # past the end of this sequence
            return
    else:
        q_start, k_start = 0, 0
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    k_base = K + row_base_offset(b, h_kv, k_start, stride_kb, stride_kh, stride_kn, IS_VARLEN)
    v_base = V + row_base_offset(b, h_kv, k_start, stride_vb, stride_vh, stride_vn, IS_VARLEN)
    k = load_rows(
        k_base, start_n, Tk, stride_kn, offs_n, offs_d, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA
    )
    v = load_rows(
        v_base, start_n, Tk, stride_vn, offs_n, offs_d, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA
    )

    # Query range: [m_lo, m_full) on the diagonal (masked), [m_full, m_tail) unmasked,
    # [m_tail, Tq) the ragged last query tile (masked). A ragged key tile masks everything: its
    # padded keys must get p = 0 rather than exp(0 - lse).
    causal_shift = Tk - Tq
    m_tail = Tq // BLOCK_M * BLOCK_M
    if CAUSAL:
        # Query i sees key j iff i >= j - shift: the first row to see this tile, and the first
        # row from which every key of the tile is seen.
        first_row = tl.minimum(tl.maximum(start_n - causal_shift, 0), Tq)
        m_lo = first_row // BLOCK_M * BLOCK_M
        all_seen = tl.maximum(start_n + BLOCK_N - 1 - causal_shift, 0)
        m_full = tl.minimum(tl.cdiv(all_seen, BLOCK_M) * BLOCK_M, Tq)
    else:
        m_lo = start_n * 0
        m_full = start_n * 0
    m_full = tl.where(start_n + BLOCK_N > Tk, Tq, m_full)
    m_tail = tl.maximum(m_tail, m_full)
    m_stop = Tq
    if WINDOW:  # [m_lo, m_full) and [m_tail, m_stop) masked, [m_full, m_tail) not
        m_lo, m_full, m_tail, m_stop = window_query_range(
            start_n, causal_shift, win_left, win_right, Tq, BLOCK_M, BLOCK_N, start_n + BLOCK_N > Tk
        )

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, per_split):
        # The query heads of this slice in a fixed order: deterministic, no atomics.
        h = first_head + g
        bh = h if IS_VARLEN else b * H + h  # lse, delta: (H, total_q) packed, (B, H, Tq) dense
        q_base = Q + row_base_offset(b, h, q_start, stride_qb, stride_qh, stride_qm, IS_VARLEN)
        do_base = DO + row_base_offset(b, h, q_start, stride_dob, stride_doh, stride_dom, IS_VARLEN)
        if USE_TMA:
            q_src = tile_descriptor(q_base, Tq, HEAD_DIM, stride_qm, BLOCK_M, BLOCK_D)
            do_src = tile_descriptor(do_base, Tq, HEAD_DIM, stride_dom, BLOCK_M, BLOCK_D)
        else:
            q_src = q_base + m_lo.to(tl.int64) * stride_qm
            q_src += offs_m[:, None] * stride_qm + offs_d[None, :]
            do_src = do_base + m_lo.to(tl.int64) * stride_dom
            do_src += offs_m[:, None] * stride_dom + offs_d[None, :]
        lse_ptr = Lse + stats_offset(bh, total_q, q_start, IS_VARLEN)
        delta_ptr = Delta + stats_offset(bh, total_q, q_start, IS_VARLEN)
        dk, dv, q_src, do_src = dkdv_tiles(
            dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, stride_qm, stride_dom,
            offs_n, offs_m, offs_d, m_lo, m_full, Tq, HEAD_DIM, causal_shift, scale, qk_scale,
            win_left, win_right, softcap, cap_out,
            True, CAUSAL, BLOCK_M, BLOCK_D, DOT_PRECISION, SCORES_AS_FORWARD, USE_TMA, WINDOW,
            SOFTCAP,
        )  # fmt: skip
        dk, dv, q_src, do_src = dkdv_tiles(
            dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, stride_qm, stride_dom,
            offs_n, offs_m, offs_d, m_full, m_tail, Tq, HEAD_DIM, causal_shift, scale, qk_scale,
            win_left, win_right, softcap, cap_out,
            False, CAUSAL, BLOCK_M, BLOCK_D, DOT_PRECISION, SCORES_AS_FORWARD, USE_TMA, WINDOW,
            SOFTCAP,
        )  # fmt: skip
        dk, dv, q_src, do_src = dkdv_tiles(
            dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, stride_qm, stride_dom,
            offs_n, offs_m, offs_d, m_tail, m_stop, Tq, HEAD_DIM, causal_shift, scale, qk_scale,
            win_left, win_right, softcap, cap_out,
            True, CAUSAL, BLOCK_M, BLOCK_D, DOT_PRECISION, SCORES_AS_FORWARD, USE_TMA, WINDOW,
            SOFTCAP,
        )  # fmt: skip

    dk = (dk * scale).to(DK.dtype.element_ty)
    dk_base = DK + row_base_offset(b, h_out, k_start, stride_dkb, stride_dkh, stride_dkn, IS_VARLEN)
    store_rows(dk_base, dk, start_n, Tk, stride_dkn, offs_n, offs_d, HEAD_DIM, BLOCK_N, USE_TMA)
    dv_base = DV + row_base_offset(b, h_out, k_start, stride_dvb, stride_dvh, stride_dvn, IS_VARLEN)
    dv = dv.to(DV.dtype.element_ty)
    store_rows(dv_base, dv, start_n, Tk, stride_dvn, offs_n, offs_d, HEAD_DIM, BLOCK_N, USE_TMA)


@triton.jit
def dq_tiles(
    dq, q, do, lse, delta,  # (BLOCK_M, BLOCK_D) fp32 acc, q, dO tiles; (BLOCK_M,) fp32 x2
    k_src, v_src, stride_kn, stride_vn,  # (BLOCK_N, BLOCK_D) pointers at key tile `lo`, or
    offs_m, offs_n, offs_d,  # with USE_TMA tensor descriptors of K and V (Tk, HEAD_DIM)
    lo, hi, Tk, HEAD_DIM, causal_shift, scale, qk_scale, win_left, win_right, softcap, cap_out,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
):  # fmt: skip
    """Accumulate the key tiles [lo, hi) into dq (unscaled)."""
    # Masked (diagonal, ragged) tiles are not software-pipelined, as in the forward.
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=1 if MASKED else None):
        cols = start_n + offs_n
        if USE_TMA:  # rows past Tk and columns past HEAD_DIM come back as zeros
            k = k_src.load([start_n, 0])
            v = v_src.load([start_n, 0])
        else:
            k = load_tile(k_src, cols, offs_d, Tk, HEAD_DIM, MASKED, BLOCK_D != HEAD_DIM)
            v = load_tile(v_src, cols, offs_d, Tk, HEAD_DIM, MASKED, BLOCK_D != HEAD_DIM)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if SOFTCAP:
            x, t = capped_exponent(qk, scale, softcap, cap_out, lse[:, None])
        else:
            x = p_exponent(qk, qk_scale, lse[:, None])
        if MASKED:
            visible = cols[None, :] < Tk
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + causal_shift)
            if WINDOW:
                visible = visible & window_visible(
                    offs_m[:, None], cols[None, :], causal_shift, win_left, win_right
                )
            x = tl.where(visible, x, float("-inf"))
        p = tl.exp2(x)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        if not USE_TMA:
            k_src += BLOCK_N * stride_kn
            v_src += BLOCK_N * stride_vn
    return dq, k_src, v_src


@triton.jit
def bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ,
    CuQ, CuK,  # IS_VARLEN: int32 cu_seqlens (B + 1,) of q and k; None for a dense batch
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    H, GROUP, Tq, Tk, scale,  # IS_VARLEN: Tq, Tk are total_q, total_k
    qk_scale,  # fl(scale * log2 e), signed; Lse holds lse2 (base2_lse)
    TQ_BUCKET, TK_BUCKET,  # autotune keys only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr = False, IS_VARLEN: tl.constexpr = False,
    win_left=0, win_right=0,  # WINDOW: bounds, folded with causal by the host
    softcap=1.0, cap_out=1.0,  # SOFTCAP: c (> 0) and fl(c * qk_scale / scale)
    WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
):  # fmt: skip
    # Grid: (cdiv(Tq, BLOCK_M), H, B), IS_VARLEN: Tq = max_seqlen_q (query_program, as forward).
    # USE_TMA: Q/dO/K/V loads and the dQ store through tensor descriptors, as in the forward.
    total_q = Tq  # IS_VARLEN: the packed total (lse's row length); Tq, Tk become sequence b's
    pid_m, h, b, pid_bh, q_start, k_start, Tq, Tk = query_program(
        CuQ, CuK, H, Tq, Tk, BLOCK_M, CAUSAL, IS_VARLEN
    )
    h_kv = h // GROUP
    start_m = pid_m * BLOCK_M
    if IS_VARLEN:  # noqa: SIM102 (Triton folds the constexpr test alone, not `and` with a tensor)
        if start_m >= Tq:  # past the end of this sequence
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_base = Q + row_base_offset(b, h, q_start, stride_qb, stride_qh, stride_qm, IS_VARLEN)
    do_base = DO + row_base_offset(b, h, q_start, stride_dob, stride_doh, stride_dom, IS_VARLEN)
    if USE_TMA:
        q = tile_descriptor(q_base, Tq, HEAD_DIM, stride_qm, BLOCK_M, BLOCK_D).load([start_m, 0])
        do = tile_descriptor(do_base, Tq, HEAD_DIM, stride_dom, BLOCK_M, BLOCK_D).load([start_m, 0])
    else:
        q_ptrs = q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :]
        do_ptrs = do_base + offs_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :]
        q = load_tile(q_ptrs, offs_m, offs_d, Tq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
        do = load_tile(do_ptrs, offs_m, offs_d, Tq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    row_ptr = stats_offset(pid_bh, total_q, q_start, IS_VARLEN) + offs_m
    lse = tl.load(Lse + row_ptr, mask=offs_m < Tq, other=float("inf"))
    delta = tl.load(Delta + row_ptr, mask=offs_m < Tq, other=0.0)

    # Same key ranges as the forward: [n_lo, n_start) and [n_full, n_end) masked, [n_start,
    # n_full) unmasked (n_lo = n_start = 0 without WINDOW).
    causal_shift = Tk - Tq
    if WINDOW:
        n_lo, n_start, n_full, n_end = window_key_range(
            start_m, causal_shift, win_left, win_right, Tk, BLOCK_M, BLOCK_N
        )
    else:
        n_full, n_end = plain_key_range(start_m, causal_shift, Tk, BLOCK_M, BLOCK_N, CAUSAL)

    k_base = K + row_base_offset(b, h_kv, k_start, stride_kb, stride_kh, stride_kn, IS_VARLEN)
    v_base = V + row_base_offset(b, h_kv, k_start, stride_vb, stride_vh, stride_vn, IS_VARLEN)
    if USE_TMA:
        k_src = tile_descriptor(k_base, Tk, HEAD_DIM, stride_kn, BLOCK_N, BLOCK_D)
        v_src = tile_descriptor(v_base, Tk, HEAD_DIM, stride_vn, BLOCK_N, BLOCK_D)
    else:
        k_src = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
        v_src = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if WINDOW:
        if not USE_TMA:
            k_src += n_lo.to(tl.int64) * stride_kn
            v_src += n_lo.to(tl.int64) * stride_vn
        dq, k_src, v_src = dq_tiles(
            dq, q, do, lse, delta, k_src, v_src, stride_kn, stride_vn, offs_m, offs_n, offs_d,
            n_lo, n_start, Tk, HEAD_DIM, causal_shift, scale, qk_scale, win_left, win_right,
            softcap, cap_out,
            True, CAUSAL, BLOCK_N, BLOCK_D, DOT_PRECISION, USE_TMA, WINDOW, SOFTCAP,
        )  # fmt: skip
    else:
        n_start = 0
    dq, k_src, v_src = dq_tiles(
        dq, q, do, lse, delta, k_src, v_src, stride_kn, stride_vn, offs_m, offs_n, offs_d,
        n_start, n_full, Tk, HEAD_DIM, causal_shift, scale, qk_scale, win_left, win_right,
        softcap, cap_out,
        False, CAUSAL, BLOCK_N, BLOCK_D, DOT_PRECISION, USE_TMA, WINDOW, SOFTCAP,
    )  # fmt: skip
    dq, k_src, v_src = dq_tiles(
        dq, q, do, lse, delta, k_src, v_src, stride_kn, stride_vn, offs_m, offs_n, offs_d,
        n_full, n_end, Tk, HEAD_DIM, causal_shift, scale, qk_scale, win_left, win_right,
        softcap, cap_out,
        True, CAUSAL, BLOCK_N, BLOCK_D, DOT_PRECISION, USE_TMA, WINDOW, SOFTCAP,
    )  # fmt: skip

    dq *= scale
    dq_base = DQ + row_base_offset(b, h, q_start, stride_dqb, stride_dqh, stride_dqm, IS_VARLEN)
    if USE_TMA:  # rows past Tq and columns past HEAD_DIM are not written
        dq_desc = tile_descriptor(dq_base, Tq, HEAD_DIM, stride_dqm, BLOCK_M, BLOCK_D)
        dq_desc.store([start_m, 0], dq.to(DQ.dtype.element_ty))
    else:
        dq_ptrs = dq_base + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :]
        mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask)
