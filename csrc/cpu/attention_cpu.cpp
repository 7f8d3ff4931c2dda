// Blocked flash-style causal attention on the CPU: forward and backward.
//
// Forward: for each (batch, head, query block) an online softmax runs over key
// blocks; scores exist only as one (BQ, BK) tile per thread, so memory beyond the
// inputs and outputs is O(T). Causal masking is bottom-right: query i sees keys
// j <= i + (Tk - Tq); key blocks past the diagonal are never computed, and only
// tiles that cross it are masked. The row log-sum-exp is saved for the backward.
//
// Backward: P = exp(scale * q.k - lse) is recomputed per tile, delta = rowsum(dO * O),
//   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dQ += scale dS K,  dK += scale dS^T Q.
// When the (batch, kv head) pairs split evenly over the threads, one task owns a pair
// and all its query heads, so dQ, dK and dV accumulate without races in a single pass.
// Otherwise two passes keep every thread busy: dK/dV over (batch, kv head, key block),
// then dQ over (batch, head, query block). Both are deterministic.
//
// Threads claim tasks one at a time, heaviest first within a head (parallel_claim); each task
// runs whole on one thread, so results do not depend on the schedule.
//
// Tile products go through the register-blocked micro-kernel of tile_gemm.h, with K and V
// packed per thread and head, when the head dim is a whole number of its panels (16 floats,
// 8 doubles) and the build has AVX2; else through BLAS (blas.h). Row operations go through
// at::vec (row_ops.h). fp32 and fp64 run natively; fp16/bf16 inputs are computed in fp32.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "blas.h"
#include "row_ops.h"
#include "tile_gemm.h"

namespace fastgpt::cpu {
namespace {

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

// Raw view of a (B, H, T, D) tensor whose last dim has unit stride.
template <typename T>
struct Heads {
  const T* p;
  int64_t sb, sh, st;  // strides of B, H, T (st is the BLAS leading dimension)
  const T* row(int64_t b, int64_t h, int64_t t) const { return p + b * sb + h * sh + t * st; }
};

template <typename T>
Heads<T> heads(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), row_stride(t)};
}

struct Shape {
  int64_t B, H, Hkv, Tq, Tk, D;
  bool causal;
  int64_t group() const { return H / Hkv; }
  // Number of keys query row i sees (keys 0 .. n-1), bottom-right causal.
  int64_t visible(int64_t i) const {
    return causal ? std::clamp<int64_t>(i + (Tk - Tq) + 1, 0, Tk) : Tk;
  }
  // First query row that sees key j.
  int64_t first_query(int64_t j) const {
    return causal ? std::clamp<int64_t>(j - (Tk - Tq), 0, Tq) : 0;
  }
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The tile products go through tile_gemm.h when D fills whole panels; else through BLAS.
template <typename T>
bool use_tiles(const Shape& s) {
  return kTileRegisters && s.D % kNR<T> == 0;
}

// Runs task(state, t) for t in 0..n-1, each thread claiming the next unclaimed t (dynamic
// scheduling) with its own state = make() (scratch buffers, packed K/V): a thread that drew the
// heavy causal blocks, or that the OS paused on a shared machine, does not hold the others up at
// the end. Callers order t heaviest first within a head. A task runs whole on one thread, so the
// results do not depend on the schedule.
template <typename Make, typename Task>
void parallel_claim(int64_t n, const Make& make, const Task& task) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto state = make();
    for (int64_t t = next++; t < n; t = next++) task(state, t);
  });
}

// One thread's copy of the rows [j0, j0 + n) of K or V of one (batch, kv head) in tile_gemm
// panels (keys padded to whole panels), repacked only when asked for other rows: O(T) per thread.
// Packing costs one pass over the rows; every packed value then serves a whole query block.
template <typename T>
struct Packed {
  std::vector<T> buf;
  int64_t owner = -1, first = -1, count = -1;

  // Panels of x[b, hk, j0 : j0 + n], or nullptr where the kernel uses BLAS (D not whole panels).
  const T* rows(const Shape& s, const Heads<T>& x, int64_t b, int64_t hk, int64_t j0, int64_t n) {
    if (!use_tiles<T>(s)) return nullptr;
    const int64_t id = b * s.Hkv + hk;
    if (id != owner || j0 != first || n != count) {
      buf.resize(ceil_div(n, kNR<T>) * kNR<T> * s.D);
      pack_panels<T>(x.row(b, hk, j0), n, s.D, x.st, buf.data());
      owner = id, first = j0, count = n;
    }
    return buf.data();
  }
  // All keys of the head: panels of key j0 start at the result + j0 * D.
  const T* head(const Shape& s, const Heads<T>& x, int64_t b, int64_t hk) {
    return rows(s, x, b, hk, 0, s.Tk);
  }
};

// ---------------------------------------------------------------- forward

// One (batch, head, query block): online softmax over the visible key blocks.
template <typename T>
void forward_block(const Shape& s, T scale, const Heads<T>& q, const Heads<T>& k, const Heads<T>& v,
                   const T* kpack, T* out, T* lse, int64_t b, int64_t h, int64_t i0, T* S, T* acc,
                   T* m, T* l) {
  const int64_t D = s.D, rows = std::min(BQ, s.Tq - i0);
  const int64_t hk = h / s.group();
  const int64_t kend = s.visible(i0 + rows - 1);  // keys needed by the block's last row
  T* o = out + ((b * s.H + h) * s.Tq + i0) * D;   // (rows, D), contiguous
  T* lse_r = lse + (b * s.H + h) * s.Tq + i0;     // (rows,)

  std::fill(m, m + rows, -std::numeric_limits<T>::infinity());
  std::fill(l, l + rows, T(0));
  std::fill(acc, acc + rows * D, T(0));
  const T* qp = q.row(b, h, i0);
  for (int64_t j0 = 0; j0 < kend; j0 += BK) {
    const int64_t cols = std::min(BK, kend - j0);
    if (kpack) {  // S (rows, cols)
      tile_gemm<T>(rows, cols, D, scale, {qp, q.st, 1}, panels(kpack + j0 * D, D), S, BK, false);
    } else {
      gemm_nt<T>(rows, cols, D, scale, qp, q.st, k.row(b, hk, j0), k.st, T(0), S, BK);
    }
    for (int64_t r = 0; r < rows; ++r) {
      T* srow = S + r * BK;
      const int64_t n = std::clamp<int64_t>(s.visible(i0 + r) - j0, 0, cols);
      if (n > 0) {
        const T m_new = std::max(m[r], row_max(srow, n));
        const T sum = exp_shift_sum(srow, n, m_new);  // srow = p
        if (m_new != m[r]) {
          const T alpha = std::exp(m[r] - m_new);  // 0 on the row's first visible block
          l[r] *= alpha;
          scale_row(acc + r * D, D, alpha);
          m[r] = m_new;
        }
        l[r] += sum;
      }
      std::fill(srow + n, srow + cols, T(0));  // masked keys get p = 0
    }
    if (kpack) {  // acc += P V
      tile_gemm<T>(rows, D, cols, T(1), {S, BK, 1}, rows_of(v.row(b, hk, j0), v.st), acc, D, true);
    } else {
      gemm_nn<T>(rows, D, cols, T(1), S, BK, v.row(b, hk, j0), v.st, T(1), acc, D);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (l[r] == T(0)) {  // no visible key: output 0, lse = +inf
      std::fill(o + r * D, o + (r + 1) * D, T(0));
      lse_r[r] = std::numeric_limits<T>::infinity();
    } else {
      const T inv = T(1) / l[r];
      for (int64_t d = 0; d < D; ++d) o[r * D + d] = acc[r * D + d] * inv;
      lse_r[r] = m[r] + std::log(l[r]);
    }
  }
}

template <typename T>
void forward_kernel(const Shape& s, T scale, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse) {
  const auto qh = heads<T>(q), kh = heads<T>(k), vh = heads<T>(v);
  T* o = out.data_ptr<T>();
  T* l = lse.data_ptr<T>();
  const int64_t nqb = ceil_div(s.Tq, BQ);
  struct State {
    std::vector<T> buf;  // S (BQ, BK), acc (BQ, D), m (BQ), l (BQ)
    Packed<T> kpack;     // tasks are claimed head by head: K is packed about once per head
  };
  const auto make = [&] { return State{std::vector<T>(BQ * BK + BQ * s.D + 2 * BQ), {}}; };
  parallel_claim(s.B * s.H * nqb, make, [&](State& st, int64_t t) {
    const int64_t bh = t / nqb, qb = nqb - 1 - t % nqb;  // the longest rows first
    const int64_t b = bh / s.H, h = bh % s.H;
    T* S = st.buf.data();
    T* acc = S + BQ * BK;
    forward_block<T>(s, scale, qh, kh, vh, st.kpack.head(s, kh, b, h / s.group()), o, l, b, h,
                     qb * BQ, S, acc, acc + BQ * s.D, acc + BQ * s.D + BQ);
  });
}

// ---------------------------------------------------------------- backward

template <typename T>
struct Grads {
  Heads<T> q, k, v, dout;
  const T* lse;     // (B, H, Tq)
  const T* delta;   // (B, H, Tq), rowsum(dO * O)
  T *dq, *dk, *dv;  // contiguous: (B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D)
};

// Packed panels of K and V from key j0 of the tile (Packed), nullptr for BLAS; two (BQ, BK)
// scratch tiles.
template <typename T>
struct TileWork {
  const T *kpack, *vpack;
  T *S, *dP;
};

// backward_tile's products through BLAS, from S = P onwards (head dims that are not whole panels).
template <typename T>
void backward_tile_blas(const Shape& s, T scale, const Grads<T>& g, const T* qp, const T* dop,
                        const T* kp, const T* vp, int64_t row0, int64_t rows, int64_t cols,
                        bool want_dkdv, bool want_dq, T* S, T* dP, T* dk, T* dv) {
  const int64_t D = s.D;
  if (want_dkdv)
    gemm_tn<T>(cols, D, rows, T(1), S, BK, dop, g.dout.st, T(1), dv, D);      // dV += P^T dO
  gemm_nt<T>(rows, cols, D, T(1), dop, g.dout.st, vp, g.v.st, T(0), dP, BK);  // dP = dO V^T
  for (int64_t r = 0; r < rows; ++r)
    softmax_grad_row(dP + r * BK, S + r * BK, cols, g.delta[row0 + r]);
  if (want_dq) gemm_nn<T>(rows, D, cols, scale, dP, BK, kp, g.k.st, T(1), g.dq + row0 * D, D);
  if (want_dkdv) gemm_tn<T>(cols, D, rows, scale, dP, BK, qp, g.q.st, T(1), dk, D);  // dK += dS^T Q
}

// One (query block, key block) tile of head (b, h). S and dP are (BQ, BK) scratch.
template <typename T>
void backward_tile(const Shape& s, T scale, const Grads<T>& g, int64_t b, int64_t h, int64_t i0,
                   int64_t rows, int64_t j0, int64_t cols, bool want_dkdv, bool want_dq,
                   const TileWork<T>& w) {
  const int64_t D = s.D, hk = h / s.group();
  const int64_t row0 = (b * s.H + h) * s.Tq + i0;  // index of (b, h, i0) in (B, H, Tq)
  const T* qp = g.q.row(b, h, i0);
  const T* dop = g.dout.row(b, h, i0);
  const T* kp = g.k.row(b, hk, j0);
  const T* vp = g.v.row(b, hk, j0);
  T* dk = g.dk + ((b * s.Hkv + hk) * s.Tk + j0) * D;  // (cols, D)
  T* dv = g.dv + ((b * s.Hkv + hk) * s.Tk + j0) * D;  // (cols, D)

  T *S = w.S, *dP = w.dP;
  if (w.kpack) {  // S (rows, cols)
    tile_gemm<T>(rows, cols, D, scale, {qp, g.q.st, 1}, panels(w.kpack, D), S, BK, false);
  } else {
    gemm_nt<T>(rows, cols, D, scale, qp, g.q.st, kp, g.k.st, T(0), S, BK);
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* srow = S + r * BK;
    const int64_t n = std::clamp<int64_t>(s.visible(i0 + r) - j0, 0, cols);
    exp_shift(srow, n, g.lse[row0 + r]);  // P = exp(S - lse)
    std::fill(srow + n, srow + cols, T(0));
  }
  if (!w.kpack) {
    backward_tile_blas<T>(s, scale, g, qp, dop, kp, vp, row0, rows, cols, want_dkdv, want_dq, S,
                          dP, dk, dv);
    return;
  }
  // dV += P^T dO, dP = dO V^T, dS = P * (dP - delta), dQ += scale dS K, dK += scale dS^T Q
  const TileA<T> Pt{S, 1, BK}, dS{dP, BK, 1}, dSt{dP, 1, BK};  // P^T, dS, dS^T
  if (want_dkdv) tile_gemm<T>(cols, D, rows, T(1), Pt, rows_of(dop, g.dout.st), dv, D, true);
  tile_gemm<T>(rows, cols, D, T(1), {dop, g.dout.st, 1}, panels(w.vpack, D), dP, BK, false);
  for (int64_t r = 0; r < rows; ++r)
    softmax_grad_row(dP + r * BK, S + r * BK, cols, g.delta[row0 + r]);
  T* dq = g.dq + row0 * D;  // (rows, D)
  if (want_dq) tile_gemm<T>(rows, D, cols, scale, dS, rows_of(kp, g.k.st), dq, D, true);
  if (want_dkdv) tile_gemm<T>(cols, D, rows, scale, dSt, rows_of(qp, g.q.st), dk, D, true);
}

// delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] for one (b, h)
template <typename T>
void head_delta(const Shape& s, const Heads<T>& dout, const Heads<T>& out, int64_t b, int64_t h,
                T* delta) {
  for (int64_t i = 0; i < s.Tq; ++i)
    delta[(b * s.H + h) * s.Tq + i] = dot_row(dout.row(b, h, i), out.row(b, h, i), s.D);
}

// A backward thread's scratch: two (BQ, BK) tiles and its packed K and V.
template <typename T>
struct BackwardState {
  std::vector<T> buf;
  Packed<T> kpack, vpack;
  static BackwardState make() { return {std::vector<T>(2 * BQ * BK), {}, {}}; }
  // Panels from key j0 of a head packed whole (nullptr for BLAS) and the scratch tiles.
  TileWork<T> work(const T* kp, const T* vp, int64_t j0, int64_t D) {
    return {kp ? kp + j0 * D : nullptr, vp ? vp + j0 * D : nullptr, buf.data(),
            buf.data() + BQ * BK};
  }
};

// Single pass: a task owns (b, kv head) with all its query heads; it packs K and V and computes
// delta for them first. Key blocks outside, so the (BK, D) rows of dK and dV being accumulated
// stay in cache.
template <typename T>
void backward_fused(const Shape& s, T scale, const Grads<T>& g, const Heads<T>& out, T* delta) {
  using State = BackwardState<T>;
  parallel_claim(s.B * s.Hkv, State::make, [&](State& st, int64_t t) {
    const int64_t b = t / s.Hkv, hk = t % s.Hkv;
    const T *kp = st.kpack.head(s, g.k, b, hk), *vp = st.vpack.head(s, g.v, b, hk);
    for (int64_t h = hk * s.group(); h < (hk + 1) * s.group(); ++h)
      head_delta<T>(s, g.dout, out, b, h, delta);
    for (int64_t h = hk * s.group(); h < (hk + 1) * s.group(); ++h) {
      for (int64_t j0 = 0; j0 < s.Tk; j0 += BK) {
        const TileWork<T> w = st.work(kp, vp, j0, s.D);
        for (int64_t i0 = s.first_query(j0) / BQ * BQ; i0 < s.Tq; i0 += BQ) {
          const int64_t rows = std::min(BQ, s.Tq - i0), kend = s.visible(i0 + rows - 1);
          if (j0 >= kend) continue;  // only when no row of the block sees a key
          backward_tile<T>(s, scale, g, b, h, i0, rows, j0, std::min(BK, kend - j0), true, true,
                           w);
        }
      }
    }
  });
}

// Two passes after delta: dK/dV over (b, kv head, key block), then dQ over (b, head, query
// block).
template <typename T>
void backward_split(const Shape& s, T scale, const Grads<T>& g, const Heads<T>& out, T* delta) {
  const int64_t nkb = ceil_div(s.Tk, BK), nqb = ceil_div(s.Tq, BQ);
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh)
      head_delta<T>(s, g.dout, out, bh / s.H, bh % s.H, delta);
  });
  using State = BackwardState<T>;
  parallel_claim(s.B * s.Hkv * nkb, State::make, [&](State& st, int64_t t) {
    const int64_t bk = t / nkb, j0 = t % nkb * BK;  // early key blocks (most queries) first
    const int64_t b = bk / s.Hkv, hk = bk % s.Hkv, cols = std::min(BK, s.Tk - j0);
    const int64_t qstart = s.first_query(j0) / BQ * BQ;
    const TileWork<T> w = st.work(st.kpack.rows(s, g.k, b, hk, j0, cols),
                                  st.vpack.rows(s, g.v, b, hk, j0, cols), 0, s.D);
    for (int64_t h = hk * s.group(); h < (hk + 1) * s.group(); ++h) {
      for (int64_t i0 = qstart; i0 < s.Tq; i0 += BQ)
        backward_tile<T>(s, scale, g, b, h, i0, std::min(BQ, s.Tq - i0), j0, cols, true, false, w);
    }
  });
  parallel_claim(s.B * s.H * nqb, State::make, [&](State& st, int64_t t) {
    const int64_t bh = t / nqb, i0 = (nqb - 1 - t % nqb) * BQ;  // the longest rows first
    const int64_t b = bh / s.H, h = bh % s.H, hk = h / s.group();
    const int64_t rows = std::min(BQ, s.Tq - i0), kend = s.visible(i0 + rows - 1);
    const T *kp = st.kpack.head(s, g.k, b, hk), *vp = st.vpack.head(s, g.v, b, hk);
    for (int64_t j0 = 0; j0 < kend; j0 += BK) {
      backward_tile<T>(s, scale, g, b, h, i0, rows, j0, std::min(BK, kend - j0), false, true,
                       st.work(kp, vp, j0, s.D));
    }
  });
}

// ---------------------------------------------------------------- ops

Shape shape_of(const at::Tensor& q, const at::Tensor& k, bool causal) {
  return {q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), causal};
}

// fp64 stays fp64; everything else is computed in fp32.
at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor prepare(const at::Tensor& t, at::ScalarType ct) { return rows_usable(t.to(ct)); }

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                                         const at::Tensor& v_, bool causal,
                                                         double scale) {
  check_qkv(q_, k_, v_);
  const auto ct = compute_type(q_);
  const auto q = prepare(q_, ct), k = prepare(k_, ct), v = prepare(v_, ct);
  const Shape s = shape_of(q, k, causal);
  auto out = at::empty({s.B, s.H, s.Tq, s.D}, q.options());  // (B, H, Tq, D)
  auto lse = at::empty({s.B, s.H, s.Tq}, q.options());       // (B, H, Tq)
  if (out.numel() > 0) {
    if (ct == at::kDouble) {
      forward_kernel<double>(s, scale, q, k, v, out, lse);
    } else {
      forward_kernel<float>(s, static_cast<float>(scale), q, k, v, out, lse);
    }
  }
  return {out.to(q_.scalar_type()), lse};
}

template <typename T>
void backward_kernel(const Shape& s, T scale, const at::Tensor& dout, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                     const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
                     const at::Tensor& dv) {
  auto delta = at::empty({s.B, s.H, s.Tq}, q.options());  // (B, H, Tq)
  const Grads<T> g{heads<T>(q),      heads<T>(k),       heads<T>(v),
                   heads<T>(dout),   lse.data_ptr<T>(), delta.data_ptr<T>(),
                   dq.data_ptr<T>(), dk.data_ptr<T>(),  dv.data_ptr<T>()};
  const int64_t threads = at::get_num_threads(), units = s.B * s.Hkv;
  if (units % threads == 0 || units >= 4 * threads) {
    backward_fused<T>(s, scale, g, heads<T>(out), delta.data_ptr<T>());
  } else {
    backward_split<T>(s, scale, g, heads<T>(out), delta.data_ptr<T>());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, bool causal, double scale) {
  check_qkv(q_, k_, v_);
  check_backward(grad_out_, q_, out_, lse_);
  const auto ct = compute_type(q_);
  const auto q = prepare(q_, ct), k = prepare(k_, ct), v = prepare(v_, ct);
  const auto dout = prepare(grad_out_, ct), out = prepare(out_, ct);
  const auto lse = lse_.contiguous();
  const Shape s = shape_of(q, k, causal);
  // Accumulated into, so zeroed (empty + zero_: one allocation each, as the profiler sees it).
  auto dq = at::empty({s.B, s.H, s.Tq, s.D}, q.options()).zero_();    // (B, H, Tq, D)
  auto dk = at::empty({s.B, s.Hkv, s.Tk, s.D}, q.options()).zero_();  // (B, Hkv, Tk, D)
  auto dv = at::empty({s.B, s.Hkv, s.Tk, s.D}, q.options()).zero_();  // (B, Hkv, Tk, D)
  if (dq.numel() > 0 && dk.numel() > 0) {
    if (ct == at::kDouble) {
      backward_kernel<double>(s, scale, dout, q, k, v, out, lse, dq, dk, dv);
    } else {
      backward_kernel<float>(s, static_cast<float>(scale), dout, q, k, v, out, lse, dq, dk, dv);
    }
  }
  const auto dt = q_.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

}  // namespace
}  // namespace fastgpt::cpu

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("cpp_attention_forward", &fastgpt::cpu::attention_forward_cpu);
  m.impl("cpp_attention_backward", &fastgpt::cpu::attention_backward_cpu);
}
