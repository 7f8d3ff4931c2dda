// Vectorized row operations of the CPU attention kernel (at::vec).
//
// float uses Vectorized<float>::exp_u20, the exp of ATen's own CPU flash
// attention; double (gradcheck's dtype) takes the exact std::exp.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace fastgpt::cpu {

using at::vec::Vectorized;

template <typename T>
inline Vectorized<T> vexp(const Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();
  } else {
    return x.map([](T a) { return std::exp(a); });
  }
}

// max over x[0:n]; -inf for n == 0.
template <typename T>
inline T row_max(const T* x, int64_t n) {
  using V = Vectorized<T>;
  T m = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  if (n >= V::size()) {
    V vm = V::loadu(x);
    for (j = V::size(); j + V::size() <= n; j += V::size())
      vm = at::vec::maximum(vm, V::loadu(x + j));
    m = at::vec::vec_reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// x[0:n] = exp(x - shift), returns the sum; shift must be finite.
template <typename T>
inline T exp_shift_sum(T* x, int64_t n, T shift) {
  using V = Vectorized<T>;
  const V vs(shift);
  V acc(T(0));
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    V e = vexp<T>(V::loadu(x + j) - vs);
    e.store(x + j);
    acc = acc + e;
  }
  T sum = at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, acc);
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

// x[0:n] = exp(x - shift); shift = +inf gives zeros.
template <typename T>
inline void exp_shift(T* x, int64_t n, T shift) {
  using V = Vectorized<T>;
  if (std::isinf(shift)) {
    std::fill(x, x + n, T(0));
    return;
  }
  const V vs(shift);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) vexp<T>(V::loadu(x + j) - vs).store(x + j);
  for (; j < n; ++j) x[j] = std::exp(x[j] - shift);
}

// x[0:n] *= a
template <typename T>
inline void scale_row(T* x, int64_t n, T a) {
  at::vec::map([a](Vectorized<T> v) { return v * Vectorized<T>(a); }, x, x, n);
}

// dp[0:n] = p * (dp - delta)
template <typename T>
inline void softmax_grad_row(T* dp, const T* p, int64_t n, T delta) {
  using V = Vectorized<T>;
  const V vd(delta);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size())
    (V::loadu(p + j) * (V::loadu(dp + j) - vd)).store(dp + j);
  for (; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

// x[0:n] = c * tanh(x / c) (the logit softcap); t[0:n] = tanh(x / c) when t is given.
template <typename T>
inline void softcap_row(T* x, int64_t n, T c, T* t = nullptr) {
  using V = Vectorized<T>;
  const V vc(c), vinv(T(1) / c);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    const V th = (V::loadu(x + j) * vinv).tanh();
    if (t != nullptr) th.store(t + j);
    (th * vc).store(x + j);
  }
  for (; j < n; ++j) {
    const T th = std::tanh(x[j] / c);
    if (t != nullptr) t[j] = th;
    x[j] = c * th;
  }
}

// ds[0:n] *= 1 - t^2: the softcap's derivative, t = tanh(s / c)
template <typename T>
inline void softcap_grad_row(T* ds, const T* t, int64_t n) {
  using V = Vectorized<T>;
  const V one(T(1));
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    const V tv = V::loadu(t + j);
    (V::loadu(ds + j) * (one - tv * tv)).store(ds + j);
  }
  for (; j < n; ++j) ds[j] *= T(1) - t[j] * t[j];
}

// sum(a[0:n] * b[0:n]) accumulated in T
template <typename T>
inline T dot_row(const T* a, const T* b, int64_t n) {
  using V = Vectorized<T>;
  V acc(T(0));
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) acc = acc + V::loadu(a + j) * V::loadu(b + j);
  T sum = at::vec::vec_reduce_all<T>([](V& x, V& y) { return x + y; }, acc);
  for (; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

}  // namespace fastgpt::cpu
