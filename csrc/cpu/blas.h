// Row-major block GEMMs for the CPU kernel.
//
// The BLAS that ships inside libtorch (MKL on x86 builds) exports the Fortran
// symbols sgemm_/dgemm_. They are declared weak: when a torch build lacks them the
// pointers are null and the same products go through at::addmm_ on views instead.
#pragma once

#include <ATen/ATen.h>

extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace fastgpt::cpu {

// Column-major BLAS call: C(m, n) = alpha * op(A) @ op(B) + beta * C.
template <typename T>
inline void blas_col_major(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                           int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
  } else {
    dgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
  }
}

template <typename T>
inline bool have_blas() {
  if constexpr (std::is_same_v<T, float>) {
    return sgemm_ != nullptr;
  } else {
    return dgemm_ != nullptr;
  }
}

// A row-major (rows, cols) view of raw memory with row stride ld.
template <typename T>
inline at::Tensor view(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, opts);
}

// Fallback without BLAS symbols: C = alpha * op(A) @ op(B) + beta * C through ATen.
template <typename T>
inline void addmm_views(const at::Tensor& a, const at::Tensor& b, T* c, int64_t m, int64_t n,
                        int64_t ldc, T alpha, T beta) {
  auto cv = view(c, m, n, ldc);
  if (beta == T(0)) {
    at::mm_out(cv, a, b);
    if (alpha != T(1)) cv.mul_(alpha);
  } else {
    cv.addmm_(a, b, beta, alpha);
  }
}

// All three helpers take row-major operands and compute an (m, n) row-major C.
// C[m, n] = alpha * A[m, k] @ B[n, k]^T + beta * C
template <typename T>
inline void gemm_nt(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                    int64_t ldb, T beta, T* c, int64_t ldc) {
  if (have_blas<T>()) {
    // Column-major: C^T(n, m) = B(n, k) @ A^T(k, m).
    blas_col_major<T>('T', 'N', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
  } else {
    addmm_views<T>(view(a, m, k, lda), view(b, n, k, ldb).t(), c, m, n, ldc, alpha, beta);
  }
}

// C[m, n] = alpha * A[m, k] @ B[k, n] + beta * C
template <typename T>
inline void gemm_nn(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                    int64_t ldb, T beta, T* c, int64_t ldc) {
  if (have_blas<T>()) {
    // Column-major: C^T(n, m) = B^T(n, k) @ A^T(k, m).
    blas_col_major<T>('N', 'N', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
  } else {
    addmm_views<T>(view(a, m, k, lda), view(b, k, n, ldb), c, m, n, ldc, alpha, beta);
  }
}

// C[m, n] = alpha * A[k, m]^T @ B[k, n] + beta * C
template <typename T>
inline void gemm_tn(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                    int64_t ldb, T beta, T* c, int64_t ldc) {
  if (have_blas<T>()) {
    // Column-major: C^T(n, m) = B^T(n, k) @ A(k, m).
    blas_col_major<T>('N', 'T', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
  } else {
    addmm_views<T>(view(a, k, m, lda).t(), view(b, k, n, ldb), c, m, n, ldc, alpha, beta);
  }
}

}  // namespace fastgpt::cpu
