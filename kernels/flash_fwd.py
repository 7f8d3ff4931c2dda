"""Flash-attention forward: numerics and tiling only (launches live in attention.py).

One program owns BLOCK_M query rows of one (batch, head) and streams the visible keys in tiles of
BLOCK_N through an online softmax kept in base 2:

    s2 = (q . k) * scale * log2(e)          (the scale folded into one multiply)
    m  = running row max of s2,  l = running sum of 2^(s2 - m),  acc = running sum of 2^(s2 - m) v
    out = acc / l,   lse = m * ln(2) + ln(l)   (natural log, what the backward and callers read)

Causal (bottom-right: query i sees key j <= i + Tk - Tq) splits the key range of a program in two:
tiles every row of the program sees in full run without a mask, the tiles on the diagonal (and a
ragged last tile) run with one. Tiles no row sees are never visited.

Packed variable-length sequences (IS_VARLEN, constexpr): q (total_q, H, D) and k, v (total_k, Hkv,
D) hold B sequences one after another; program (m, h, b) reads sequence b's first row and length
from CuQ / CuK (int32 cu_seqlens, (B + 1,)) and exits when its query tile starts past the end.
Everything after that is the dense program on a (Tq_b, Tk_b) slice; off, the kernel compiles to
the dense code (CuQ / CuK are None there).

Variants (constexpr, each compiled out when off): WINDOW restricts query i to keys j in
[i + shift - win_left, i + shift + win_right] (shift = Tk - Tq; the host folds causal into
win_right = 0 and an unbounded side into a bound past every key). A program then visits only the
key tiles its rows' windows touch: masked tiles on the two window edges, unmasked ones between, so
the cost is O(Tq * W). SOFTCAP turns each score s into c * tanh(s / c). Sinks ((H,) fp32, or None)
adds exp(sinks[h]) to each row's denominator at the end: lse includes it and out is rescaled.

Two load paths (USE_TMA, constexpr): pointer loads (any GPU, any stride) or, on sm_90 with
16-byte-aligned bases and strides, tensor descriptors for Q/K/V and the O store, which pad
out-of-bounds rows and columns themselves.
"""

import triton
import triton.language as tl

# 1 / ln(2): the kernels' base-2 exponent. Host code reads LOG2E.value (qk_scale = scale * log2 e).
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def head_base_offset(b, h, stride_b, stride_h):
    """Element offset of the (b, h) slice in int64: B * H * T * D may pass 2**31."""
    return b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def row_base_offset(b, h, start, stride_b, stride_h, stride_row, IS_VARLEN: tl.constexpr):
    """Element offset of head h of sequence b, in int64: the (b, h) slice of a dense batch, or the
    rows from `start` of a packed (total, heads, D) tensor."""
    if IS_VARLEN:
        return start.to(tl.int64) * stride_row + h.to(tl.int64) * stride_h
    else:
        return head_base_offset(b, h, stride_b, stride_h)


@triton.jit
def stats_offset(pid_bh, n_rows, start, IS_VARLEN: tl.constexpr):
    """Offset (int64) of the first lse / delta entry of one (sequence, head): row pid_bh = b * H + h
    of (B, H, Tq) for a dense batch (n_rows = Tq), or from `start` (the sequence's first row) in
    row pid_bh = h of (H, total_q) for packed sequences (n_rows = total_q)."""
    if IS_VARLEN:
        return pid_bh.to(tl.int64) * n_rows + start
    else:
        return pid_bh.to(tl.int64) * n_rows


@triton.jit
def sequence_span(Cu, b):
    """(first row, length) of sequence b of a packed batch, from its cu_seqlens Cu (B + 1,)."""
    start = tl.load(Cu + b)
    return start, tl.load(Cu + b + 1) - start


@triton.jit
def query_program(
    CuQ, CuK, H, Tq, Tk,
    BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    """Which query tile, head and sequence this program of the forward / dQ grid owns:
    (pid_m, h, b, pid_bh, q_start, k_start, Tq, Tk).

    Grid (cdiv(Tq, BLOCK_M), H, B), with Tq = max_seqlen_q for packed sequences. Under causal the
    diagonal-heavy (late) query tiles come first, so the longest programs start early and the
    short ones fill the tail; programs of one head run together (K/V in L2). pid_bh is the
    lse / delta row (stats_offset). Packed: q_start, k_start are sequence b's first rows and
    Tq, Tk its lengths; dense: 0, 0 and the lengths given.
    """
    if IS_VARLEN:
        h = tl.program_id(1)
        b = tl.program_id(2)
        pid_bh = h  # lse: (H, total_q)
        q_start, Tq = sequence_span(CuQ, b)
        k_start, Tk = sequence_span(CuK, b)
        n_m_blocks = tl.num_programs(0)
        pid_m = n_m_blocks - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    else:
        n_m_blocks = tl.cdiv(Tq, BLOCK_M)
        pid_m = n_m_blocks - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        pid_bh = b * H + h  # lse: (B, H, Tq)
        q_start, k_start = 0, 0
    return pid_m, h, b, pid_bh, q_start, k_start, Tq, Tk


@triton.jit
def tanh(x):
    """tanh(x) to a few fp32 ulps, relative (Gemma's cap c = 50 multiplies its absolute error).

    |x| >= 0.55: 1 - 2 / (e^2|x| + 1) with the sign, saturating to +-1 (exp2 -> inf). Below,
    where that form cancels, the odd series to x^9 at y = x / 4 (truncation ~1e-11 relative),
    then tanh(2y) = 2 tanh(y) / (1 + tanh(y)^2) twice."""
    ax = tl.abs(x)
    big = 1.0 - 2.0 / (tl.exp2(ax * (2.0 * LOG2E)) + 1.0)
    y = x * 0.25
    y2 = y * y
    t = y * (
        1.0 + y2 * (-1.0 / 3.0 + y2 * (2.0 / 15.0 + y2 * (-17.0 / 315.0 + y2 * (62.0 / 2835.0))))
    )
    t = 2.0 * t / (1.0 + t * t)
    t = 2.0 * t / (1.0 + t * t)
    return tl.where(ax < 0.55, t, tl.where(x < 0, -big, big))


@triton.jit
def window_visible(rows, cols, shift, win_left, win_right):
    """Whether key cols sees query rows under the window (broadcast shapes from the caller)."""
    return (cols >= rows + shift - win_left) & (cols <= rows + shift + win_right)


@triton.jit
def window_key_range(start_m, shift, win_left, win_right, Tk, BLOCK_M, BLOCK_N):
    """Key tiles of query rows [start_m, start_m + BLOCK_M) under the window: (lo, full_lo,
    full_hi, end). [lo, full_lo) and [full_hi, end) are masked edge tiles; [full_lo, full_hi)
    holds whole tiles every row sees (none past the last full tile of Tk). lo is tile-aligned."""
    last = start_m + BLOCK_M - 1
    lo = tl.minimum(tl.maximum(start_m + shift - win_left, 0), Tk) // BLOCK_N * BLOCK_N
    end = tl.maximum(tl.minimum(last + shift + win_right + 1, Tk), lo)
    full_lo = tl.cdiv(tl.maximum(last + shift - win_left, 0), BLOCK_N) * BLOCK_N
    full_hi = tl.minimum(
        (start_m + shift + win_right + 1) // BLOCK_N * BLOCK_N, Tk // BLOCK_N * BLOCK_N
    )
    full_lo = tl.minimum(tl.maximum(full_lo, lo), end)
    full_hi = tl.maximum(tl.minimum(full_hi, end), full_lo)
    return lo, full_lo, full_hi, end


@triton.jit
def load_tile(ptrs, rows, cols, n_rows, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a 2-D tile, masking only the dimensions the caller says can run past the end."""
    if CHECK_ROWS and CHECK_COLS:
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        return tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def tile_descriptor(base, n_rows, n_cols, stride_row, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Tensor descriptor of one (n_rows, n_cols) head slice with unit column stride, read and
    written in (BLOCK_R, BLOCK_C) tiles; out-of-bounds elements load as 0 and are not stored."""
    return tl.make_tensor_descriptor(
        base, shape=[n_rows, n_cols], strides=[stride_row, 1], block_shape=[BLOCK_R, BLOCK_C]
    )


@triton.jit
def natural_lse(m, l, qk_scale, scale):
    """ln(sum_j exp(scale * q.k_j)) from the running max m of q.k and l = sum_j 2^(q.k_j * qk_scale
    - fl(m * qk_scale)). Scores ~1e3 leave ~3e-5 of fp32 resolution, so this per-row step runs in
    fp64: the rounding of fl(m * qk_scale) is undone exactly and lse is rounded once."""
    qk_scale = tl.zeros_like(m) + qk_scale  # (BLOCK_M,) fp32, as the loop multiplied by it
    scale = tl.zeros_like(m) + scale
    m64 = m.to(tl.float64)
    residual = (m * qk_scale).to(tl.float64) - m64 * qk_scale.to(tl.float64)  # exact in fp64
    lse = m64 * scale.to(tl.float64) + tl.log(tl.where(l == 0.0, 1.0, l)).to(tl.float64)
    return (lse + residual * LN2).to(tl.float32)


@triton.jit
def plain_key_range(start_m, causal_shift, Tk, BLOCK_M, BLOCK_N, CAUSAL: tl.constexpr):
    """(n_full, n_end) of query rows [start_m, start_m + BLOCK_M) without a window: key tiles
    [0, n_full) need no mask, [n_full, n_end) do (the causal diagonal, a ragged last tile)."""
    n_tiles_full = Tk // BLOCK_N * BLOCK_N
    if CAUSAL:
        # The first row (start_m) sees keys <= start_m + shift: every row sees those.
        seen_by_all = tl.maximum(start_m + causal_shift + 1, 0)
        n_full = tl.minimum(seen_by_all // BLOCK_N * BLOCK_N, n_tiles_full)
        # The last row sees keys < start_m + BLOCK_M + shift; nothing past that is visited.
        n_end = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_shift, 0), Tk)
    else:
        n_full = n_tiles_full
        n_end = Tk
    return tl.minimum(n_full, n_end), n_end


@triton.jit
def add_sink(out, lse_keys, sink):
    """(out, lse) with exp(sink) added to the denominator: lse = log(exp(lse_keys) + exp(sink)),
    out scaled by exp(lse_keys - lse). lse_keys = -inf for a row that saw no key (out 0)."""
    sink = sink.to(tl.float32)
    top = tl.maximum(lse_keys, sink)
    lse = top + tl.log(tl.exp(lse_keys - top) + tl.exp(sink - top))
    return out * tl.exp(lse_keys - lse)[:, None], lse


@triton.jit
def fwd_tiles(
    acc, m_i, l_i, q,  # (BLOCK_M, BLOCK_D) fp32, (BLOCK_M,) fp32 x2, (BLOCK_M, BLOCK_D) input dtype
    k_src, v_src, stride_kn, stride_vn,  # (BLOCK_N, BLOCK_D) pointers at key tile `lo`, or
    offs_m, offs_n, offs_d,  # with USE_TMA tensor descriptors of K and V (Tk, HEAD_DIM)
    lo, hi, Tk, HEAD_DIM, causal_shift, qk_scale,
    win_left, win_right, cap_in, cap_out,  # window bounds; softcap: s / c per unit of q.k, c / s
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, SCALE_NEG: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    """Fold key tiles [lo, hi) into the running (acc, m_i, l_i). MASKED adds causal + length masks.

    Returns the pointers advanced past `hi` (descriptors as they were: they take the tile's row),
    so the masked pass continues where the unmasked ended.
    qk_scale may be 0 (scale 0, -0.0 or below fp32's range): no -inf score is ever multiplied by
    it, so scores are then all 0 and the softmax is uniform over the visible keys.
    """
    # The masked (diagonal) tiles are not software-pipelined: pipelining them made ptxas
    # serialize wgmma in every pipelined loop of the kernel (C7515, measured by compile_check).
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=1 if MASKED else None):
        cols = start_n + offs_n
        if USE_TMA:  # rows past Tk and columns past HEAD_DIM come back as zeros
            k = k_src.load([start_n, 0])
            v = v_src.load([start_n, 0])
        else:
            k = load_tile(k_src, cols, offs_d, Tk, HEAD_DIM, MASKED, BLOCK_D != HEAD_DIM)
            v = load_tile(v_src, cols, offs_d, Tk, HEAD_DIM, MASKED, BLOCK_D != HEAD_DIM)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) q.k
        if SCALE_NEG:
            qk = -qk  # scores are scale * q.k = |scale| * (-q.k): qk_scale is positive
        if SOFTCAP:  # |scale| * qk becomes c * tanh(|scale| * qk / c)
            qk = tanh(qk * cap_in) * cap_out
        if MASKED:
            visible = cols[None, :] < Tk
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + causal_shift)
            if WINDOW:
                visible = visible & window_visible(
                    offs_m[:, None], cols[None, :], causal_shift, win_left, win_right
                )
            qk = tl.where(visible, qk, float("-inf"))
        # m is the running max of the unscaled products; the base-2 shift is fl(m * qk_scale),
        # recomputed bit-identically for alpha and at the end (so lse can undo its rounding).
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        shift = m_new * qk_scale
        if MASKED:
            # A row with nothing visible yet keeps m = -inf; shift by 0 so no inf - inf appears.
            shift = tl.where(m_new == float("-inf"), 0.0, shift)
        p = tl.exp2(qk * qk_scale - shift[:, None])
        if MASKED:
            p = tl.where(visible, p, 0.0)  # masked after scaling: -inf * 0 would be NaN
        # Per row: m_i = -inf (no key seen yet) gives alpha = 0 even when qk_scale = 0.
        alpha = tl.exp2(tl.where(m_i == float("-inf"), float("-inf"), m_i * qk_scale) - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
        if not USE_TMA:
            k_src += BLOCK_N * stride_kn
            v_src += BLOCK_N * stride_vn
    return acc, m_i, l_i, k_src, v_src


@triton.jit
def attn_fwd_kernel(
    Q, K, V, Out, Lse,
    CuQ, CuK,  # IS_VARLEN: int32 cu_seqlens (B + 1,) of q and k; None for a dense batch
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    H, GROUP, Tq, Tk,  # lengths; IS_VARLEN: the packed totals total_q, total_k
    qk_scale,  # |scale| * log2(e)
    scale,  # |scale|
    TQ_BUCKET, TK_BUCKET,  # autotune keys only (lengths rounded up to a power of two)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    SCALE_NEG: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr = False,
    IS_VARLEN: tl.constexpr = False,
    Sinks=None,  # (H,) fp32 sink logits, or None
    win_left=0, win_right=0,  # WINDOW: bounds, folded with causal by the host
    softcap=1.0,  # SOFTCAP: c (> 0)
    WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
):  # fmt: skip
    # USE_TMA: Q/K/V loads and the O store through tensor descriptors (sm_90 TMA); the host asks
    # for it only when every base and row stride is 16-byte aligned.
    # Grid: (cdiv(Tq, BLOCK_M), H, B), IS_VARLEN: Tq = max_seqlen_q (query_program).
    total_q = Tq  # IS_VARLEN: the packed total (lse's row length); Tq, Tk become sequence b's
    pid_m, h, b, pid_bh, q_start, k_start, Tq, Tk = query_program(
        CuQ, CuK, H, Tq, Tk, BLOCK_M, CAUSAL, IS_VARLEN
    )
    h_kv = h // GROUP  # GQA: index mapping, never a copy of K/V

    start_m = pid_m * BLOCK_M
    if IS_VARLEN:  # noqa: SIM102 (Triton folds the constexpr test alone, not `and` with a tensor)
        if start_m >= Tq:  # past the end of this sequence
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_base = Q + row_base_offset(b, h, q_start, stride_qb, stride_qh, stride_qm, IS_VARLEN)
    k_base = K + row_base_offset(b, h_kv, k_start, stride_kb, stride_kh, stride_kn, IS_VARLEN)
    v_base = V + row_base_offset(b, h_kv, k_start, stride_vb, stride_vh, stride_vn, IS_VARLEN)
    if USE_TMA:
        q = tile_descriptor(q_base, Tq, HEAD_DIM, stride_qm, BLOCK_M, BLOCK_D).load([start_m, 0])
    else:
        q_ptrs = q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :]
        q = load_tile(q_ptrs, offs_m, offs_d, Tq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Key range of this program: [n_lo, n_start) and [n_full, n_end) need a mask, [n_start,
    # n_full) does not. Without WINDOW, n_lo = n_start = 0.
    causal_shift = Tk - Tq
    if WINDOW:
        n_lo, n_start, n_full, n_end = window_key_range(
            start_m, causal_shift, win_left, win_right, Tk, BLOCK_M, BLOCK_N
        )
    else:
        n_full, n_end = plain_key_range(start_m, causal_shift, Tk, BLOCK_M, BLOCK_N, CAUSAL)
    if SOFTCAP:
        cap_in = scale / softcap
        cap_out = softcap / scale
    else:
        cap_in, cap_out = scale, scale  # unused

    if USE_TMA:
        k_src = tile_descriptor(k_base, Tk, HEAD_DIM, stride_kn, BLOCK_N, BLOCK_D)
        v_src = tile_descriptor(v_base, Tk, HEAD_DIM, stride_vn, BLOCK_N, BLOCK_D)
    else:
        k_src = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]  # (BLOCK_N, BLOCK_D), key 0
        v_src = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
    if WINDOW:
        if not USE_TMA:
            k_src += n_lo.to(tl.int64) * stride_kn
            v_src += n_lo.to(tl.int64) * stride_vn
        acc, m_i, l_i, k_src, v_src = fwd_tiles(
            acc, m_i, l_i, q, k_src, v_src, stride_kn, stride_vn, offs_m, offs_n, offs_d,
            n_lo, n_start, Tk, HEAD_DIM, causal_shift, qk_scale, win_left, win_right, cap_in,
            cap_out, True, CAUSAL, SCALE_NEG, BLOCK_N, BLOCK_D, DOT_PRECISION, USE_TMA, WINDOW,
            SOFTCAP,
        )  # fmt: skip
    else:
        n_start = 0
    acc, m_i, l_i, k_src, v_src = fwd_tiles(
        acc, m_i, l_i, q, k_src, v_src, stride_kn, stride_vn, offs_m, offs_n, offs_d,
        n_start, n_full, Tk, HEAD_DIM, causal_shift, qk_scale, win_left, win_right, cap_in,
        cap_out, False, CAUSAL, SCALE_NEG, BLOCK_N, BLOCK_D, DOT_PRECISION, USE_TMA, WINDOW,
        SOFTCAP,
    )  # fmt: skip
    acc, m_i, l_i, k_src, v_src = fwd_tiles(
        acc, m_i, l_i, q, k_src, v_src, stride_kn, stride_vn, offs_m, offs_n, offs_d,
        n_full, n_end, Tk, HEAD_DIM, causal_shift, qk_scale, win_left, win_right, cap_in,
        cap_out, True, CAUSAL, SCALE_NEG, BLOCK_N, BLOCK_D, DOT_PRECISION, USE_TMA, WINDOW,
        SOFTCAP,
    )  # fmt: skip

    # A row that saw no key has l = 0 and acc = 0: output 0 and lse = +inf (never NaN).
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = natural_lse(tl.where(empty, 0.0, m_i), l_i, qk_scale, scale)
    if Sinks is not None:  # the sink's term joins the denominator: out shrinks by exp(lse_k - lse)
        out, lse = add_sink(out, tl.where(empty, float("-inf"), lse), tl.load(Sinks + h))
    else:
        lse = tl.where(empty, float("inf"), lse)

    o_base = Out + row_base_offset(b, h, q_start, stride_ob, stride_oh, stride_om, IS_VARLEN)
    if USE_TMA:  # rows past Tq and columns past HEAD_DIM are not written
        o_desc = tile_descriptor(o_base, Tq, HEAD_DIM, stride_om, BLOCK_M, BLOCK_D)
        o_desc.store([start_m, 0], out.to(Out.dtype.element_ty))
    else:
        o_ptrs = o_base + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :]
        mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask)
    lse_ptrs = Lse + stats_offset(pid_bh, total_q, q_start, IS_VARLEN) + offs_m
    tl.store(lse_ptrs, lse, mask=offs_m < Tq)
