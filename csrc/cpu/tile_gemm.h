// Register-blocked tile products of the CPU attention kernel, without per-call packing.
//
//   C (m, n) = alpha * A (m, k) @ B (k, n)       (accumulate: C += ...)
//
// A is read through two strides, a[i * ais + p * aps], so a row-major tile (ais = lda,
// aps = 1) and a transposed one (ais = 1, aps = lda: P^T, dS^T) cost the same. B is read
// in panels of NR columns whose rows hold NR contiguous values: a row-major (k, n) matrix
// with n % NR == 0 (panel j starts at b + j * NR, rows ldb apart), or K / V packed by
// pack_panels (panel j starts at b + j * k * NR, rows NR apart). The micro-kernel keeps an
// (MR, NR) block of C in MR x 2 vector registers, broadcasts one element of A per row and
// does 2 * MR fused multiply-adds per step of p: 12 accumulators on AVX2 (MR = 6, NR = 16
// floats or 8 doubles), the register blocking BLAS kernels use.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace fastgpt::cpu {

template <typename T>
constexpr int64_t kNR = 2 * at::vec::Vectorized<T>::size();  // columns of B per panel
constexpr int64_t kMR = 6;                                   // rows of C per micro-tile

// Register type of T: raw AVX2 vectors where built with AVX2 (GCC keeps an array of them in
// registers, not an array of at::vec::Vectorized), at::vec otherwise.
#if defined(CPU_CAPABILITY_AVX2)
constexpr bool kTileRegisters = true;
template <typename T>
struct Reg;
template <>
struct Reg<float> {
  using R = __m256;
  static R zero() { return _mm256_setzero_ps(); }
  static R set(float x) { return _mm256_set1_ps(x); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static void store(float* p, R x) { _mm256_storeu_ps(p, x); }
};
template <>
struct Reg<double> {
  using R = __m256d;
  static R zero() { return _mm256_setzero_pd(); }
  static R set(double x) { return _mm256_set1_pd(x); }
  static R load(const double* p) { return _mm256_loadu_pd(p); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
  static R mul(R a, R b) { return _mm256_mul_pd(a, b); }
  static R max(R a, R b) { return _mm256_max_pd(a, b); }
  static void store(double* p, R x) { _mm256_storeu_pd(p, x); }
};
#else
constexpr bool kTileRegisters = false;  // correct but slow: the kernel then uses BLAS
template <typename T>
struct Reg {
  using R = at::vec::Vectorized<T>;
  static R zero() { return R(T(0)); }
  static R set(T x) { return R(x); }
  static R load(const T* p) { return R::loadu(p); }
  static R fma(R a, R b, R c) { return at::vec::fmadd(a, b, c); }
  static R mul(R a, R b) { return a * b; }
  static R max(R a, R b) { return at::vec::maximum(a, b); }
  static void store(T* p, R x) { x.store(p); }
};
#endif

// C[0:MR, 0:NR] (+)= alpha * sum_p a[i * ais + p * aps] * b[p * ldb + 0:NR]. With vmax (and
// not accumulating): vmax[i * W : (i + 1) * W] = max(itself, both halves of C's row i), W = NR / 2.
template <typename T, int MR>
inline void micro_kernel(int64_t k, const T* a, int64_t ais, int64_t aps, const T* b, int64_t ldb,
                         T* c, int64_t ldc, T alpha, bool accumulate, T* vmax) {
  using G = Reg<T>;
  using R = typename G::R;
  constexpr int64_t W = kNR<T> / 2;
  R acc0[MR], acc1[MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = G::zero();
  for (int64_t p = 0; p < k; ++p) {
    const R b0 = G::load(b + p * ldb), b1 = G::load(b + p * ldb + W);
    const T* ap = a + p * aps;
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const R ai = G::set(ap[i * ais]);
      acc0[i] = G::fma(ai, b0, acc0[i]);
      acc1[i] = G::fma(ai, b1, acc1[i]);
    }
  }
  const R va = G::set(alpha);
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    T* ci = c + i * ldc;
    if (accumulate) {
      G::store(ci, G::fma(acc0[i], va, G::load(ci)));
      G::store(ci + W, G::fma(acc1[i], va, G::load(ci + W)));
    } else {
      const R c0 = G::mul(acc0[i], va), c1 = G::mul(acc1[i], va);
      G::store(ci, c0);
      G::store(ci + W, c1);
      if (vmax != nullptr) G::store(vmax + i * W, G::max(G::load(vmax + i * W), G::max(c0, c1)));
    }
  }
}

// The last m % MR rows of a panel.
template <typename T>
inline void micro_kernel_rows(int64_t rows, int64_t k, const T* a, int64_t ais, int64_t aps,
                              const T* b, int64_t ldb, T* c, int64_t ldc, T alpha, bool acc,
                              T* vmax) {
  switch (rows) {
    case 1: return micro_kernel<T, 1>(k, a, ais, aps, b, ldb, c, ldc, alpha, acc, vmax);
    case 2: return micro_kernel<T, 2>(k, a, ais, aps, b, ldb, c, ldc, alpha, acc, vmax);
    case 3: return micro_kernel<T, 3>(k, a, ais, aps, b, ldb, c, ldc, alpha, acc, vmax);
    case 4: return micro_kernel<T, 4>(k, a, ais, aps, b, ldb, c, ldc, alpha, acc, vmax);
    case 5: return micro_kernel<T, 5>(k, a, ais, aps, b, ldb, c, ldc, alpha, acc, vmax);
    default: return;
  }
}

// A as (pointer, row stride, column stride); B as (pointer, panel stride, row stride).
template <typename T>
struct TileA {
  const T* p;
  int64_t ais, aps;
};
template <typename T>
struct TileB {
  const T* p;
  int64_t panel, ldb;
};

// Row-major B (k, n): panel j starts NR columns after panel j - 1.
template <typename T>
inline TileB<T> rows_of(const T* b, int64_t ldb) {
  return {b, kNR<T>, ldb};
}

// C (m, n) (+)= alpha * A (m, k) @ B (k, n); n is rounded up to whole panels of NR columns
// (C must have room for them), m and k are any sizes. With rowmax (m x NR / 2 values, set to
// -inf by the caller; not accumulating), each row's NR / 2 values end up holding its running
// maxima: row_max_of reduces them (the row maxima of C over the whole panels, padding included).
// With `need` (m values, non-decreasing): row i needs only its first need[i] columns (n_lim) or
// terms of the sum (k_lim); a micro-tile stops at what its last row needs (causal diagonal tiles).
template <typename T>
inline void tile_gemm(int64_t m, int64_t n, int64_t k, T alpha, TileA<T> a, TileB<T> b, T* c,
                      int64_t ldc, bool accumulate, T* rowmax = nullptr,
                      const int64_t* need = nullptr, bool need_k = false) {
  constexpr int64_t W = kNR<T> / 2;
  const int64_t body = m / kMR * kMR;
  // columns (or terms) the rows [i, i + r) need
  const auto limit = [&](int64_t i, int64_t r, int64_t all) {
    return need == nullptr ? all : std::min(all, need[i + r - 1]);
  };
  for (int64_t j = 0; j * kNR<T> < n; ++j) {
    const T* bp = b.p + j * b.panel;
    T* cj = c + j * kNR<T>;
    for (int64_t i = 0; i < body; i += kMR) {
      if (!need_k && j * kNR<T> >= limit(i, kMR, n)) continue;
      micro_kernel<T, kMR>(need_k ? limit(i, kMR, k) : k, a.p + i * a.ais, a.ais, a.aps, bp,
                           b.ldb, cj + i * ldc, ldc, alpha, accumulate,
                           rowmax ? rowmax + i * W : nullptr);
    }
    if (body < m && (need_k || j * kNR<T> < limit(body, m - body, n)))
      micro_kernel_rows<T>(m - body, need_k ? limit(body, m - body, k) : k, a.p + body * a.ais,
                           a.ais, a.aps, bp, b.ldb, cj + body * ldc, ldc, alpha, accumulate,
                           rowmax ? rowmax + body * W : nullptr);
  }
}

// The maximum of row r's NR / 2 running maxima (tile_gemm's rowmax).
template <typename T>
inline T row_max_of(const T* rowmax, int64_t r) {
  constexpr int64_t W = kNR<T> / 2;
  return *std::max_element(rowmax + r * W, rowmax + (r + 1) * W);
}

// Packs x (rows, D) (row stride ld) into panels of NR rows, each stored d-major:
// out[j][d][r] = x[j * NR + r][d], zero past the last row. out holds
// ceil(rows / NR) * NR * D values. As B of tile_gemm, the packed panels give x^T.
template <typename T>
inline void pack_panels(const T* x, int64_t rows, int64_t D, int64_t ld, T* out) {
  constexpr int64_t NR = kNR<T>;
  for (int64_t j0 = 0; j0 < rows; j0 += NR) {
    T* panel = out + j0 * D;
    const int64_t n = std::min(NR, rows - j0);
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t r = 0; r < n; ++r) panel[d * NR + r] = x[(j0 + r) * ld + d];
      for (int64_t r = n; r < NR; ++r) panel[d * NR + r] = T(0);
    }
  }
}

// Packs x (rows, D) (row stride ld) as B of x itself, one panel per NR columns, each panel's rows
// contiguous: out[j][r][c] = x[r][j * NR + c] (D % NR == 0). Every step of a product then reads
// NR consecutive values, where x's own rows (ld apart) touch a new cache line per step.
template <typename T>
inline void pack_columns(const T* x, int64_t rows, int64_t D, int64_t ld, T* out) {
  constexpr int64_t NR = kNR<T>;
  for (int64_t j = 0; j < D / NR; ++j) {
    T* panel = out + j * rows * NR;
    for (int64_t r = 0; r < rows; ++r) std::copy_n(x + r * ld + j * NR, NR, panel + r * NR);
  }
}

// pack_columns' output of `rows` rows as B, from its row r0 on.
template <typename T>
inline TileB<T> columns(const T* packed, int64_t rows, int64_t r0) {
  return {packed + r0 * kNR<T>, rows * kNR<T>, kNR<T>};
}

// pack_panels' output as B: its rows from j0 (j0 % NR == 0) start at packed + j0 * D.
template <typename T>
inline TileB<T> panels(const T* packed, int64_t D) {
  return {packed, D * kNR<T>, kNR<T>};
}

}  // namespace fastgpt::cpu
