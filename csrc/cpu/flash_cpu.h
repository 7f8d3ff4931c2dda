// Blocked flash-style attention on the CPU, forward and backward, over a batch of sequences:
// one code path for a dense batch (B sequences of one length) and a packed one (cu_seqlens).
//
// A sequence b is a (Tq, Tk) problem whose rows start at row q0 (queries) and k0 (keys) of
// batch entry b of each tensor: dense, b indexes the batch dim and q0 = k0 = 0; packed, the
// batch stride is 0 and q0, k0 are cu_seqlens_q[b], cu_seqlens_k[b]. Nothing is padded.
//
// Forward: for each (sequence, head, query block) an online softmax runs over key blocks;
// scores exist only as one (BQ, BK) tile per thread, so memory beyond the inputs and outputs is
// O(T). Causal masking is bottom-right per sequence: query i sees keys j <= i + (Tk - Tq); key
// blocks past the diagonal are never computed, and only tiles that cross it are masked. The
// row log-sum-exp is saved for the backward; a row that sees no key outputs 0 and lse = +inf.
//
// Variants (flash-attn's semantics): a sliding window narrows each row's keys to [key_lo, key_hi)
// (Shape): a query block visits only the key blocks from key_start (skipping those wholly before
// the window: O(T W) work) and masks only the tiles the window crosses. A softcap c maps the
// scaled scores to c tanh(s / c) (the backward multiplies dS by 1 - tanh^2, tanh kept per tile).
// Sinks add exp(sinks[h]) to each row's denominator in the final normalisation (lse includes it;
// a row without keys outputs 0 with lse = sink); their gradient, -sum exp(sink - lse) * delta,
// comes from the delta pass. Each costs a per-row branch when off.
//
// Backward: P = exp(scale * q.k - lse) is recomputed per tile, delta = rowsum(dO * O),
//   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dQ += scale dS K,  dK += scale dS^T Q.
// When the (sequence, kv head) pairs spread evenly enough over the threads, one task owns a
// pair and all its query heads, so dQ, dK and dV accumulate without races in a single pass.
// Otherwise two passes keep every thread busy: dK/dV over (sequence, kv head, key block), then
// dQ over (sequence, head, query block). Both are deterministic.
//
// Threads claim tasks one at a time (parallel_claim): sequences heaviest first (a long packed
// sequence never starts last), and within a head the heaviest blocks first. Each task runs
// whole on one thread, so results do not depend on the schedule.
//
// Tile products go through the register-blocked micro-kernel of tile_gemm.h, with K and V
// packed per thread and head, when the head dim is a whole number of its panels (16 floats,
// 8 doubles) and the build has AVX2; else through BLAS (blas.h). Row operations go through
// at::vec (row_ops.h). T is float or double.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "../checks.h"
#include "blas.h"
#include "row_ops.h"
#include "tile_gemm.h"

namespace fastgpt::cpu {

// Tile sizes; CFLAGS="-DFASTGPT_BQ=.. -DFASTGPT_BK=.." overrides them (experiments, NOTES_cpp).
#ifndef FASTGPT_BQ
#define FASTGPT_BQ 64
#endif
#ifndef FASTGPT_BK
#define FASTGPT_BK 256
#endif
constexpr int64_t BQ = FASTGPT_BQ;  // query rows per tile
constexpr int64_t BK = FASTGPT_BK;  // keys per tile (a multiple of tile_gemm's panel width)
static_assert(BK % 16 == 0, "BK must be a whole number of tile_gemm panels");

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// fp64 stays fp64; everything else is computed in fp32.
inline at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A dense (B, H, T, D) t in the compute type with rows the kernel can read (rows_usable).
inline at::Tensor prepare(const at::Tensor& t, at::ScalarType ct) { return rows_usable(t.to(ct)); }

// Raw view of a (batch, head, row) tensor whose rows hold D contiguous values (or one value:
// lse, delta). P is const T* for inputs, T* for outputs.
template <typename P>
struct Rows {
  P p;
  int64_t sb, sh, st;  // strides of batch, head, row (st is the BLAS leading dimension)
  P row(int64_t b, int64_t h, int64_t t) const { return p + b * sb + h * sh + t * st; }
};

// One sequence of the batch. Query i sees the keys [key_lo(i), key_hi(i)): bottom-right causal
// (j <= i + Tk - Tq) and flash-attn's sliding window (i + Tk - Tq - left <= j <= i + Tk - Tq +
// right, -1 unbounded); both bounds grow with i.
struct Shape {
  int64_t H, Hkv, D;
  bool causal;
  int64_t b, q0, k0;  // batch entry, first query row and first key row in it
  int64_t Tq, Tk;     // query and key lengths
  int64_t left = -1, right = -1;  // window (-1: unbounded)
  int64_t group() const { return H / Hkv; }
  // One past the last key query row i sees.
  int64_t key_hi(int64_t i) const {
    int64_t hi = causal ? i + (Tk - Tq) + 1 : Tk;
    if (right >= 0) hi = std::min(hi, i + (Tk - Tq) + right + 1);
    return std::clamp<int64_t>(hi, 0, Tk);
  }
  // The first key query row i sees.
  int64_t key_lo(int64_t i) const {
    return left >= 0 ? std::clamp<int64_t>(i + (Tk - Tq) - left, 0, Tk) : 0;
  }
  // First query row that sees key j (or a later one).
  int64_t first_query(int64_t j) const {
    int64_t i = 0;
    if (causal) i = j - (Tk - Tq);
    if (right >= 0) i = std::max(i, j - (Tk - Tq) - right);
    return std::clamp<int64_t>(i, 0, Tq);
  }
  // One past the last query row that sees key j (or an earlier one).
  int64_t query_end(int64_t j) const {
    return left >= 0 ? std::clamp<int64_t>(j - (Tk - Tq) + left + 1, 0, Tq) : Tq;
  }
  // Aligned start (a multiple of BK) of the key blocks the query rows [i0, i0 + rows) need.
  int64_t key_start(int64_t i0) const { return key_lo(i0) / BK * BK; }
  // Score entries one head computes, tiles clipped as the kernel clips them: the work measure.
  int64_t work() const {
    int64_t n = 0;
    for (int64_t i0 = 0; i0 < Tq; i0 += BQ) {
      const int64_t rows = std::min(BQ, Tq - i0);
      n += rows * std::max<int64_t>(key_hi(i0 + rows - 1) - key_start(i0), 0);
    }
    return n;
  }
};

// The batch: B sequences, dense (every one Tq x Tk) or packed (cu_q, cu_k: B + 1 prefix sums).
struct Batch {
  int64_t B, H, Hkv, D;
  bool causal;
  int64_t Tq = 0, Tk = 0;         // dense: every sequence's lengths
  const int32_t* cu_q = nullptr;  // packed: query rows of sequence b are cu_q[b] ..
  const int32_t* cu_k = nullptr;  // packed: key rows of sequence b are cu_k[b] ..
  int64_t left = -1, right = -1;  // sliding window (Shape), -1: unbounded
  Shape seq(int64_t b) const {
    if (cu_q == nullptr) return {H, Hkv, D, causal, b, 0, 0, Tq, Tk, left, right};
    return {H,      Hkv,    D, causal, b, cu_q[b], cu_k[b], cu_q[b + 1] - cu_q[b],
            cu_k[b + 1] - cu_k[b], left,    right};
  }
  // Sequence indices, heaviest first; ties keep the batch order (a dense batch: 0 .. B-1).
  std::vector<int64_t> heaviest_first() const {
    std::vector<int64_t> order(B), work(B);
    std::iota(order.begin(), order.end(), 0);
    for (int64_t b = 0; b < B; ++b) work[b] = seq(b).work();
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) {
      return work[a] > work[c];
    });
    return order;
  }
};

// A task: block `start` (its first row) of head h of sequence b.
struct Block {
  int64_t b, h, start;
};

// (sequence, head, query block) tasks: sequences in `order`, heads in turn, within a head the
// longest rows (causal: the last block) first.
inline std::vector<Block> query_blocks(const Batch& batch, const std::vector<int64_t>& order) {
  std::vector<Block> tasks;
  for (const int64_t b : order) {
    const int64_t nqb = ceil_div(batch.seq(b).Tq, BQ);
    for (int64_t h = 0; h < batch.H; ++h)
      for (int64_t qb = nqb - 1; qb >= 0; --qb) tasks.push_back({b, h, qb * BQ});
  }
  return tasks;
}

// (sequence, kv head, key block) tasks: early key blocks (seen by most queries) first.
inline std::vector<Block> key_blocks(const Batch& batch, const std::vector<int64_t>& order) {
  std::vector<Block> tasks;
  for (const int64_t b : order) {
    const int64_t Tk = batch.seq(b).Tk;
    for (int64_t hk = 0; hk < batch.Hkv; ++hk)
      for (int64_t j0 = 0; j0 < Tk; j0 += BK) tasks.push_back({b, hk, j0});
  }
  return tasks;
}

// The tile products go through tile_gemm.h when D fills whole panels; else through BLAS.
template <typename T>
bool use_tiles(const Shape& s) {
  return kTileRegisters && s.D % kNR<T> == 0;
}

// Runs task(state, t) for t in 0..n-1, each thread claiming the next unclaimed t (dynamic
// scheduling) with its own state = make() (scratch buffers, packed K/V): a thread that drew the
// heavy causal blocks, or that the OS paused on a shared machine, does not hold the others up at
// the end. Callers order t heaviest first. A task runs whole on one thread, so the results do
// not depend on the schedule.
template <typename Make, typename Task>
void parallel_claim(int64_t n, const Make& make, const Task& task) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  if (workers <= 0) return;
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto state = make();
    for (int64_t t = next++; t < n; t = next++) task(state, t);
  });
}

// One thread's copy of the rows [j0, j0 + n) of K or V of one (sequence, kv head) in tile_gemm
// panels, repacked only when asked for other rows: O(T) per thread. Packing costs one pass over
// the rows; every packed value then serves a query block. Two layouts: pack_panels' (keys
// padded to whole panels: B = x^T, as K in S = Q K^T) or, with `by_columns`, pack_columns' (B = x,
// as V in P V).
template <typename T>
struct Packed {
  bool by_columns = false;
  std::vector<T> buf;
  int64_t owner = -1, first = -1, count = -1;

  // x[b, hk, k0 + j0 : k0 + j0 + n] packed, or nullptr where the kernel uses BLAS.
  const T* rows(const Shape& s, const Rows<const T*>& x, int64_t hk, int64_t j0, int64_t n) {
    if (!use_tiles<T>(s)) return nullptr;
    const int64_t id = s.b * s.Hkv + hk;
    if (id != owner || j0 != first || n != count) {
      const T* src = x.row(s.b, hk, s.k0 + j0);
      if (by_columns) {
        buf.resize(std::max<int64_t>(n * s.D, 1));
        pack_columns<T>(src, n, s.D, x.st, buf.data());
      } else {
        buf.resize(std::max<int64_t>(ceil_div(n, kNR<T>) * kNR<T> * s.D, 1));
        pack_panels<T>(src, n, s.D, x.st, buf.data());
      }
      owner = id, first = j0, count = n;
    }
    return buf.data();
  }
  // All keys of the head: panels of key j0 start at the result + j0 * D.
  const T* head(const Shape& s, const Rows<const T*>& x, int64_t hk) {
    return rows(s, x, hk, 0, s.Tk);
  }
};

// ---------------------------------------------------------------- forward

template <typename T>
struct ForwardIO {
  Rows<const T*> q, k, v;
  Rows<T*> out, lse;
  T softcap = T(0);          // > 0: scores become softcap * tanh(s / softcap)
  const T* sinks = nullptr;  // (H,) or nullptr: exp(sinks[h]) joins each row's denominator
};

// Row r's keys in a tile of keys [j0, j0 + cols): the columns [lo, hi) (lo == hi: none).
struct Cols {
  int64_t lo, hi;
};
inline Cols tile_cols(const Shape& s, int64_t i, int64_t j0, int64_t cols) {
  const int64_t hi = std::clamp<int64_t>(s.key_hi(i) - j0, 0, cols);
  return {std::min(std::clamp<int64_t>(s.key_lo(i) - j0, 0, cols), hi), hi};
}

// out and lse of the rows from the online softmax's m, l and acc; a sink adds exp(sink) to each
// denominator (a row without keys then outputs 0 with lse = sink).
template <typename T>
void forward_finish(const Shape& s, const ForwardIO<T>& io, int64_t h, int64_t i0, int64_t rows,
                    const T* acc, const T* m, const T* l) {
  const int64_t D = s.D;
  T* lse_r = io.lse.row(s.b, h, s.q0 + i0);  // (rows,)
  for (int64_t r = 0; r < rows; ++r) {
    T* orow = io.out.row(s.b, h, s.q0 + i0 + r);
    T inv = T(0), lse = std::numeric_limits<T>::infinity();  // no visible key: 0, +inf
    if (io.sinks != nullptr) {  // sum = l e^m + e^sink = e^top (l e^(m - top) + e^(sink - top))
      const T sink = io.sinks[h], top = l[r] == T(0) ? sink : std::max(m[r], sink);
      const T kept = l[r] == T(0) ? T(0) : std::exp(m[r] - top);
      const T denom = l[r] * kept + std::exp(sink - top);
      inv = kept / denom;
      lse = top + std::log(denom);
    } else if (l[r] != T(0)) {
      inv = T(1) / l[r];
      lse = m[r] + std::log(l[r]);
    }
    for (int64_t d = 0; d < D; ++d) orow[d] = acc[r * D + d] * inv;
    lse_r[r] = lse;
  }
}

// A forward thread's scratch: S (BQ, BK), acc (BQ, D), m (BQ), l (BQ) and the running maxima
// of S's rows (BQ, kNR / 2) that tile_gemm keeps as it stores S.
template <typename T>
struct ForwardScratch {
  std::vector<T> buf;
  std::vector<int64_t> need;  // (BQ,): the columns each row of a diagonal tile needs
  explicit ForwardScratch(int64_t D)
      : buf(BQ * BK + BQ * D + 2 * BQ + BQ * kNR<T> / 2), need(BQ) {}
  T* S() { return buf.data(); }
  T* acc() { return S() + BQ * BK; }
  T* m(int64_t D) { return acc() + BQ * D; }
  T* l(int64_t D) { return m(D) + BQ; }
  T* vmax(int64_t D) { return l(D) + BQ; }
};

// Online softmax of one score row srow[lo:hi) (its visible keys; n = hi - lo > 0) whose max is
// `top`: srow becomes p = exp(s - m_new), l and the row's acc (D values) are rescaled.
template <typename T>
inline void softmax_row(T* srow, int64_t n, T top, T* acc, int64_t D, T& m, T& l) {
  const T m_new = std::max(m, top);
  const T sum = exp_shift_sum(srow, n, m_new);  // srow = p
  if (m_new != m) {
    const T alpha = std::exp(m - m_new);  // 0 on the row's first visible block
    l *= alpha;
    scale_row(acc, D, alpha);
    m = m_new;
  }
  l += sum;
}

// One (sequence, head, query block): online softmax over the key blocks its rows see (a window
// skips the blocks wholly outside it). A tile every row sees whole (no mask, whole panels, no
// softcap) takes its row maxima from the S product's store; the others read them from S.
template <typename T>
void forward_block(const Shape& s, T scale, const ForwardIO<T>& io, const T* kpack,
                   const T* vpack, int64_t h, int64_t i0, ForwardScratch<T>& w) {
  const int64_t D = s.D, rows = std::min(BQ, s.Tq - i0);
  const int64_t hk = h / s.group();
  const int64_t kend = s.key_hi(i0 + rows - 1);  // keys needed by the block's last row
  T *S = w.S(), *acc = w.acc(), *m = w.m(D), *l = w.l(D), *vmax = w.vmax(D);
  std::fill(m, m + rows, -std::numeric_limits<T>::infinity());
  std::fill(l, l + rows, T(0));
  std::fill(acc, acc + rows * D, T(0));
  const T* qp = io.q.row(s.b, h, s.q0 + i0);
  const int64_t qs = io.q.st, vs = io.v.st;
  for (int64_t j0 = s.key_start(i0); j0 < kend; j0 += BK) {
    const int64_t cols = std::min(BK, kend - j0);
    const bool whole = kpack && io.softcap == T(0) && cols % kNR<T> == 0 &&
                       s.key_lo(i0 + rows - 1) <= j0 && s.key_hi(i0) >= j0 + cols;
    // A tile the rows see less and less of towards its top (causal diagonal): each micro-tile
    // of S and of P V stops at the keys its last row sees.
    const bool clip = kpack && s.key_hi(i0) < j0 + cols;
    if (clip) {
      for (int64_t r = 0; r < rows; ++r) w.need[r] = tile_cols(s, i0 + r, j0, cols).hi;
    }
    const int64_t* need = clip ? w.need.data() : nullptr;
    if (kpack) {  // S (rows, cols)
      if (whole) std::fill(vmax, vmax + rows * kNR<T> / 2, -std::numeric_limits<T>::infinity());
      tile_gemm<T>(rows, cols, D, scale, {qp, qs, 1}, panels(kpack + j0 * D, D), S, BK, false,
                   whole ? vmax : nullptr, need);
    } else {
      gemm_nt<T>(rows, cols, D, scale, qp, qs, io.k.row(s.b, hk, s.k0 + j0), io.k.st, T(0), S,
                 BK);
    }
    for (int64_t r = 0; r < rows; ++r) {
      T* srow = S + r * BK;
      const Cols c = whole ? Cols{0, cols} : tile_cols(s, i0 + r, j0, cols);
      const int64_t n = c.hi - c.lo;
      if (n > 0) {
        if (io.softcap > T(0)) softcap_row(srow + c.lo, n, io.softcap);
        const T top = whole ? row_max_of(vmax, r) : row_max(srow + c.lo, n);
        softmax_row(srow + c.lo, n, top, acc + r * D, D, m[r], l[r]);
      }
      std::fill(srow, srow + c.lo, T(0));  // masked keys get p = 0
      std::fill(srow + c.hi, srow + cols, T(0));
    }
    if (kpack) {  // acc += P V
      tile_gemm<T>(rows, D, cols, T(1), {S, BK, 1}, columns(vpack, s.Tk, j0), acc, D, true,
                   nullptr, need, true);
    } else {
      gemm_nn<T>(rows, D, cols, T(1), S, BK, io.v.row(s.b, hk, s.k0 + j0), vs, T(1), acc, D);
    }
  }
  forward_finish<T>(s, io, h, i0, rows, acc, m, l);
}

// out and lse of every row of the batch.
template <typename T>
void forward_kernel(const Batch& batch, T scale, const ForwardIO<T>& io) {
  const std::vector<Block> tasks = query_blocks(batch, batch.heaviest_first());
  struct State {
    ForwardScratch<T> scratch;
    Packed<T> kpack, vpack;  // tasks are claimed head by head: K, V packed about once a head
  };
  const auto make = [&] { return State{ForwardScratch<T>(batch.D), {}, {true, {}}}; };
  parallel_claim(static_cast<int64_t>(tasks.size()), make, [&](State& st, int64_t t) {
    const Block& task = tasks[t];
    const Shape s = batch.seq(task.b);
    const int64_t hk = task.h / s.group();
    const T *kpack = st.kpack.head(s, io.k, hk), *vpack = st.vpack.head(s, io.v, hk);
    forward_block<T>(s, scale, io, kpack, vpack, task.h, task.start, st.scratch);
  });
}

// ---------------------------------------------------------------- backward

template <typename T>
struct Grads {
  Rows<const T*> q, k, v, dout, out, lse;
  Rows<T*> delta;       // rowsum(dO * O), lse's layout
  Rows<T*> dq, dk, dv;  // zeroed, accumulated into
  T softcap = T(0);          // as ForwardIO's
  const T* sinks = nullptr;  // (H,) or nullptr
  T* dsinks = nullptr;       // (B, H): sequence b's part of d sinks[h], with sinks
};

// Packed panels of K and V from key j0 of the tile (Packed), nullptr for BLAS; three (BQ, BK)
// scratch tiles (tanh(s / softcap) in the third, with softcap).
template <typename T>
struct TileWork {
  const T *kpack, *vpack;
  T *S, *dP, *tc;
};

// The rows one tile reads and writes: q and dO (rows), k and v (cols), dK and dV (cols).
template <typename T>
struct TileRows {
  const T *q, *dout, *k, *v, *lse, *delta;
  T *dq, *dk, *dv;
  int64_t i0, j0;  // the tile's first query and key in the sequence
};

// dP (rows, cols) becomes dS = P * (dP - delta), times d(softcap)/ds = 1 - tanh^2 with softcap
// (tc holds the tanh on each row's columns [lo, hi); P is 0 outside them).
template <typename T>
void tile_dS(const Shape& s, const Grads<T>& g, const TileRows<T>& x, int64_t rows, int64_t cols,
             const T* S, T* dP, const T* tc) {
  for (int64_t r = 0; r < rows; ++r) softmax_grad_row(dP + r * BK, S + r * BK, cols, x.delta[r]);
  if (g.softcap <= T(0)) return;
  for (int64_t r = 0; r < rows; ++r) {
    const Cols c = tile_cols(s, x.i0 + r, x.j0, cols);
    softcap_grad_row(dP + r * BK + c.lo, tc + r * BK + c.lo, c.hi - c.lo);
  }
}

// backward_tile's products through BLAS, from S = P onwards (head dims that are not whole panels).
template <typename T>
void backward_tile_blas(const Shape& s, T scale, const Grads<T>& g, const TileRows<T>& x,
                        int64_t rows, int64_t cols, bool want_dkdv, bool want_dq, T* S, T* dP,
                        const T* tc) {
  const int64_t D = s.D;
  if (want_dkdv)
    gemm_tn<T>(cols, D, rows, T(1), S, BK, x.dout, g.dout.st, T(1), x.dv, g.dv.st);  // dV += P^T dO
  gemm_nt<T>(rows, cols, D, T(1), x.dout, g.dout.st, x.v, g.v.st, T(0), dP, BK);     // dP = dO V^T
  tile_dS<T>(s, g, x, rows, cols, S, dP, tc);
  if (want_dq) gemm_nn<T>(rows, D, cols, scale, dP, BK, x.k, g.k.st, T(1), x.dq, g.dq.st);
  if (want_dkdv) gemm_tn<T>(cols, D, rows, scale, dP, BK, x.q, g.q.st, T(1), x.dk, g.dk.st);
}

// One (query block, key block) tile of head h of sequence s. S and dP are (BQ, BK) scratch.
template <typename T>
void backward_tile(const Shape& s, T scale, const Grads<T>& g, int64_t h, int64_t i0,
                   int64_t rows, int64_t j0, int64_t cols, bool want_dkdv, bool want_dq,
                   const TileWork<T>& w) {
  const int64_t D = s.D, hk = h / s.group(), i = s.q0 + i0, j = s.k0 + j0, b = s.b;
  const TileRows<T> x{g.q.row(b, h, i),  g.dout.row(b, h, i), g.k.row(b, hk, j),
                      g.v.row(b, hk, j), g.lse.row(b, h, i),  g.delta.row(b, h, i),
                      g.dq.row(b, h, i), g.dk.row(b, hk, j),  g.dv.row(b, hk, j),
                      i0,                j0};
  T *S = w.S, *dP = w.dP;
  if (w.kpack) {  // S (rows, cols)
    tile_gemm<T>(rows, cols, D, scale, {x.q, g.q.st, 1}, panels(w.kpack, D), S, BK, false);
  } else {
    gemm_nt<T>(rows, cols, D, scale, x.q, g.q.st, x.k, g.k.st, T(0), S, BK);
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* srow = S + r * BK;
    const Cols c = tile_cols(s, i0 + r, j0, cols);
    if (g.softcap > T(0)) softcap_row(srow + c.lo, c.hi - c.lo, g.softcap, w.tc + r * BK + c.lo);
    exp_shift(srow + c.lo, c.hi - c.lo, x.lse[r]);  // P = exp(S - lse)
    std::fill(srow, srow + c.lo, T(0));
    std::fill(srow + c.hi, srow + cols, T(0));
  }
  if (!w.kpack) {
    backward_tile_blas<T>(s, scale, g, x, rows, cols, want_dkdv, want_dq, S, dP, w.tc);
    return;
  }
  // dV += P^T dO, dP = dO V^T, dS = P * (dP - delta), dQ += scale dS K, dK += scale dS^T Q
  const TileA<T> Pt{S, 1, BK}, dS{dP, BK, 1}, dSt{dP, 1, BK};  // P^T, dS, dS^T
  if (want_dkdv)
    tile_gemm<T>(cols, D, rows, T(1), Pt, rows_of(x.dout, g.dout.st), x.dv, g.dv.st, true);
  tile_gemm<T>(rows, cols, D, T(1), {x.dout, g.dout.st, 1}, panels(w.vpack, D), dP, BK, false);
  tile_dS<T>(s, g, x, rows, cols, S, dP, w.tc);
  if (want_dq) tile_gemm<T>(rows, D, cols, scale, dS, rows_of(x.k, g.k.st), x.dq, g.dq.st, true);
  if (want_dkdv) tile_gemm<T>(cols, D, rows, scale, dSt, rows_of(x.q, g.q.st), x.dk, g.dk.st, true);
}

// delta[i] = sum_d dO[i, d] * O[i, d] over the query rows of head h of sequence s; with sinks,
// this sequence's part of d sinks[h] = -sum_i exp(sinks[h] - lse[i]) * delta[i].
template <typename T>
void head_delta(const Shape& s, const Grads<T>& g, int64_t h) {
  T dsink = T(0);
  for (int64_t i = s.q0; i < s.q0 + s.Tq; ++i) {
    const T delta = dot_row(g.dout.row(s.b, h, i), g.out.row(s.b, h, i), s.D);
    *g.delta.row(s.b, h, i) = delta;
    if (g.sinks != nullptr) dsink -= std::exp(g.sinks[h] - *g.lse.row(s.b, h, i)) * delta;
  }
  if (g.dsinks != nullptr) g.dsinks[s.b * s.H + h] = dsink;
}

// A backward thread's scratch: two (BQ, BK) tiles and its packed K and V.
template <typename T>
struct BackwardState {
  std::vector<T> buf;
  Packed<T> kpack, vpack;
  static BackwardState make() { return {std::vector<T>(3 * BQ * BK), {}, {}}; }
  // Panels from key j0 of a head packed whole (nullptr for BLAS) and the scratch tiles.
  TileWork<T> work(const T* kp, const T* vp, int64_t j0, int64_t D) {
    return {kp ? kp + j0 * D : nullptr, vp ? vp + j0 * D : nullptr, buf.data(),
            buf.data() + BQ * BK, buf.data() + 2 * BQ * BK};
  }
};

// Single pass: a task owns (sequence, kv head) with all its query heads; it packs K and V and
// computes delta for them first. Key blocks outside, so the (BK, D) rows of dK and dV being
// accumulated stay in cache.
template <typename T>
void backward_fused(const Batch& batch, const std::vector<int64_t>& order, T scale,
                    const Grads<T>& g) {
  using State = BackwardState<T>;
  const int64_t Hkv = batch.Hkv;
  parallel_claim(batch.B * Hkv, State::make, [&](State& st, int64_t t) {
    const Shape s = batch.seq(order[t / Hkv]);
    const int64_t hk = t % Hkv, g0 = hk * s.group(), g1 = g0 + s.group();
    const T *kp = st.kpack.head(s, g.k, hk), *vp = st.vpack.head(s, g.v, hk);
    for (int64_t h = g0; h < g1; ++h) head_delta<T>(s, g, h);
    for (int64_t h = g0; h < g1; ++h) {
      for (int64_t j0 = 0; j0 < s.Tk; j0 += BK) {
        const TileWork<T> w = st.work(kp, vp, j0, s.D);
        const int64_t qend = s.query_end(std::min(j0 + BK, s.Tk) - 1);
        for (int64_t i0 = s.first_query(j0) / BQ * BQ; i0 < qend; i0 += BQ) {
          const int64_t rows = std::min(BQ, s.Tq - i0), kend = s.key_hi(i0 + rows - 1);
          // only when no row of the block sees a key of the block
          if (j0 >= kend || s.key_start(i0) > j0) continue;
          backward_tile<T>(s, scale, g, h, i0, rows, j0, std::min(BK, kend - j0), true, true, w);
        }
      }
    }
  });
}

// Two passes after delta: dK/dV over (sequence, kv head, key block), then dQ over (sequence,
// head, query block).
template <typename T>
void backward_split(const Batch& batch, const std::vector<int64_t>& order, T scale,
                    const Grads<T>& g) {
  at::parallel_for(0, batch.B * batch.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) head_delta<T>(batch.seq(t / batch.H), g, t % batch.H);
  });
  using State = BackwardState<T>;
  const std::vector<Block> kv_tasks = key_blocks(batch, order);
  parallel_claim(static_cast<int64_t>(kv_tasks.size()), State::make, [&](State& st, int64_t t) {
    const Block& task = kv_tasks[t];
    const Shape s = batch.seq(task.b);
    const int64_t hk = task.h, j0 = task.start, cols = std::min(BK, s.Tk - j0);
    const int64_t qstart = s.first_query(j0) / BQ * BQ, qend = s.query_end(j0 + cols - 1);
    const TileWork<T> w = st.work(st.kpack.rows(s, g.k, hk, j0, cols),
                                  st.vpack.rows(s, g.v, hk, j0, cols), 0, s.D);
    for (int64_t h = hk * s.group(); h < (hk + 1) * s.group(); ++h) {
      for (int64_t i0 = qstart; i0 < qend; i0 += BQ)
        backward_tile<T>(s, scale, g, h, i0, std::min(BQ, s.Tq - i0), j0, cols, true, false, w);
    }
  });
  const std::vector<Block> q_tasks = query_blocks(batch, order);
  parallel_claim(static_cast<int64_t>(q_tasks.size()), State::make, [&](State& st, int64_t t) {
    const Block& task = q_tasks[t];
    const Shape s = batch.seq(task.b);
    const int64_t h = task.h, i0 = task.start, hk = h / s.group();
    const int64_t rows = std::min(BQ, s.Tq - i0), kend = s.key_hi(i0 + rows - 1);
    const T *kp = st.kpack.head(s, g.k, hk), *vp = st.vpack.head(s, g.v, hk);
    for (int64_t j0 = s.key_start(i0); j0 < kend; j0 += BK)
      backward_tile<T>(s, scale, g, h, i0, rows, j0, std::min(BK, kend - j0), false, true,
                       st.work(kp, vp, j0, s.D));
  });
}

// Whether the fused backward's (sequence, kv head) tasks, handed out heaviest first, keep the
// threads busy: its longest thread (greedy estimate) within 1.4x of an even share. The split
// backward does 7 tile products per tile to the fused pass's 5, so beyond that it wins.
inline bool fused_balances(const Batch& batch, const std::vector<int64_t>& order, int64_t threads) {
  std::vector<int64_t> load(std::max<int64_t>(threads, 1), 0);
  int64_t total = 0;
  for (const int64_t b : order) {
    const int64_t unit = batch.seq(b).work() * (batch.H / batch.Hkv);
    for (int64_t hk = 0; hk < batch.Hkv; ++hk) {
      *std::min_element(load.begin(), load.end()) += unit;
      total += unit;
    }
  }
  const int64_t longest = *std::max_element(load.begin(), load.end());
  return 10 * longest * static_cast<int64_t>(load.size()) <= 14 * total;
}

// dq, dk, dv (zeroed on entry) of every row of the batch; fills delta on the way.
template <typename T>
void backward_kernel(const Batch& batch, T scale, const Grads<T>& g) {
  const std::vector<int64_t> order = batch.heaviest_first();
  if (fused_balances(batch, order, at::get_num_threads())) {
    backward_fused<T>(batch, order, scale, g);
  } else {
    backward_split<T>(batch, order, scale, g);
  }
}

}  // namespace fastgpt::cpu
