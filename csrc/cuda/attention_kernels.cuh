// Tiled flash-style attention kernels for CUDA: forward, delta, dK/dV and dQ.
//
// Plain CUDA with no torch include, so `nvcc -arch=sm_80 -c` can compile it on a
// machine without a GPU or a CUDA build of torch (tests/test_cpp_cuda_compile.py).
// attention_cuda.cu is the torch glue that launches these.
//
// Semantics match the CPU kernel: q (B, H, Tq, D), k/v (B, Hkv, Tk, D), query head h
// reads kv head h / (H / Hkv); causal is bottom-right (query i sees keys
// j <= i + Tk - Tq); a row with no visible key outputs 0 and lse = +inf.
// Variants (flash-attn's semantics, as the CPU kernel's): a sliding window (left, right) narrows
// query i to keys i + Tk - Tq - left <= j <= i + Tk - Tq + right (-1: unbounded), and the loops
// skip key (query) blocks wholly outside it; a softcap c maps the scaled scores s to c tanh(s / c)
// (the backward multiplies dS by 1 - tanh^2); sinks add exp(sinks[h]) to each row's denominator
// (lse includes it, a row without keys outputs 0 with lse = sink), and their gradient
// dsinks[h] = -sum over rows of exp(sinks[h] - lse) * delta is one block's fixed-order sum.
// Packed sequences (varlen) run the same kernels: q (total_q, H, D), k/v (total_k, Hkv, D)
// as views with batch stride 0, sequence b at rows cu_q[b] .. cu_q[b + 1] (cu_k for keys);
// grids span the longest sequence and blocks past a sequence's end return at once.
// Each thread block holds BM query rows and BN keys in shared memory; every sum is
// accumulated in A (float, or double for double inputs). Loops stride over the block,
// so any tile size and head dim 1..256 work.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace fastgpt::cuda {

constexpr int kThreads = 256;

// ------------------------------------------------------------ element helpers

__device__ inline float to_acc(float x) { return x; }
__device__ inline double to_acc(double x) { return x; }
__device__ inline float to_acc(__half x) { return __half2float(x); }
__device__ inline float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T, typename A>
__device__ inline T from_acc(A x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16(x);
  } else {
    return static_cast<T>(x);
  }
}

__device__ inline float acc_exp(float x) { return expf(x); }
__device__ inline double acc_exp(double x) { return exp(x); }
__device__ inline float acc_log(float x) { return logf(x); }
__device__ inline double acc_log(double x) { return log(x); }
__device__ inline float acc_tanh(float x) { return tanhf(x); }
__device__ inline double acc_tanh(double x) { return tanh(x); }

__device__ inline int64_t clamp_to(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

template <typename A>
__device__ inline A infinity() {
  return static_cast<A>(__int_as_float(0x7f800000));
}

// Strided view of a (B, H, T, D) tensor with unit stride on D (or of a (B, H, T) one: lse,
// delta); packed (total, H, D) or (H, total) tensors have sb = 0.
template <typename T>
struct View {
  T* p;
  int64_t sb, sh, st;
  __device__ T* row(int64_t b, int64_t h, int64_t t) const { return p + b * sb + h * sh + t * st; }
  // The view from row t0 on (the rows of one packed sequence).
  __device__ View from(int64_t t0) const { return {p + t0 * st, sb, sh, st}; }
};

// One sequence: its query rows start at q0 and its key rows at k0 of its batch entry. Query i
// sees the keys [key_lo(i), key_hi(i)): causal (j <= i + Tk - Tq) and the window (left, right);
// both bounds grow with i.
struct Seq {
  int64_t q0, k0, Tq, Tk;
  bool causal;
  int64_t left, right;  // window, -1: unbounded

  // One past the last key query row i sees.
  __device__ int64_t key_hi(int64_t i) const {
    const int64_t diag = i + (Tk - Tq);
    int64_t hi = causal ? diag + 1 : Tk;
    if (right >= 0 && diag + right + 1 < hi) hi = diag + right + 1;
    return clamp_to(hi, 0, Tk);
  }
  // The first key query row i sees.
  __device__ int64_t key_lo(int64_t i) const {
    return left >= 0 ? clamp_to(i + (Tk - Tq) - left, 0, Tk) : 0;
  }
  __device__ bool sees(int64_t i, int64_t j) const {
    return i < Tq && j >= key_lo(i) && j < key_hi(i);
  }
  // The first query row that sees key j (or a later key).
  __device__ int64_t first_query(int64_t j) const {
    int64_t i = 0;
    if (causal) i = j - (Tk - Tq);
    if (right >= 0 && j - (Tk - Tq) - right > i) i = j - (Tk - Tq) - right;
    return clamp_to(i, 0, Tq);
  }
  // One past the last query row that sees key j (or an earlier key).
  __device__ int64_t query_end(int64_t j) const {
    return left >= 0 ? clamp_to(j - (Tk - Tq) + left + 1, 0, Tq) : Tq;
  }
};

template <typename T, typename A>
struct Params {
  View<const T> q, k, v, dout, out;  // dout/out only in the backward
  View<T> o, dq, dk, dv;             // outputs, shaped like q, q, k, v
  View<A> lse;                       // (B, H, Tq), packed (H, total_q)
  View<A> delta;                     // lse's layout, backward scratch
  const int32_t* cu_q;               // packed: (B + 1,) query row offsets; nullptr when dense
  const int32_t* cu_k;               // packed: (B + 1,) key row offsets
  int64_t B, H, Hkv, Tq, Tk, D;      // packed: Tq, Tk are the longest lengths (grid sizes)
  bool causal;
  A scale;
  int64_t left, right;  // window, -1: unbounded
  A softcap;            // > 0: scores become softcap * tanh(s / softcap); 0: off
  const A* sinks;       // (H,) or nullptr: exp(sinks[h]) joins each row's denominator
  A* dsinks;            // (H,) backward output, with sinks

  __device__ Seq seq(int64_t b) const {
    if (cu_q == nullptr) return {0, 0, Tq, Tk, causal, left, right};
    return {cu_q[b], cu_k[b], cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b], causal, left, right};
  }
};

// The score of a scaled dot product s: s, or softcap * tanh(s / softcap) with a softcap. t gets
// the tanh (0 without a cap), so d score / ds = 1 - t^2 either way.
template <typename A>
__device__ inline A capped(A s, A softcap, A& t) {
  if (softcap <= A(0)) {
    t = 0;
    return s;
  }
  t = acc_tanh(s / softcap);
  return softcap * t;
}

// A row's output scale and lse from the online softmax's max m and sum l of exp(s - m); a sink
// adds exp(sink) to the denominator: l e^m + e^sink = e^top (l e^(m - top) + e^(sink - top)).
template <typename A>
struct RowEnd {
  A inv, lse;
};
template <typename A>
__device__ inline RowEnd<A> row_end(A m, A l, const A* sink) {
  if (sink == nullptr) {
    if (l > A(0)) return {A(1) / l, m + acc_log(l)};
    return {A(0), infinity<A>()};  // no visible key
  }
  const A top = l > A(0) ? max(m, *sink) : *sink;
  const A kept = l > A(0) ? acc_exp(m - top) : A(0);
  const A denom = l * kept + acc_exp(*sink - top);
  return {kept / denom, top + acc_log(denom)};
}

// rows x D tile of a head into shared memory as A with row stride ld; rows past `limit` are
// zero. K and V tiles use ld = D + 1: a warp reading one column of 16 key rows then hits 16
// different banks instead of one.
template <typename T, typename A>
__device__ inline void load_tile(A* dst, const View<const T>& src, int64_t b, int64_t h, int64_t t0,
                                 int64_t rows, int64_t limit, int64_t D, int64_t ld) {
  for (int64_t idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
    const int64_t r = idx / D, d = idx % D;
    dst[r * ld + d] = (t0 + r < limit) ? to_acc(src.row(b, h, t0 + r)[d]) : A(0);
  }
}

// Dot product of two shared-memory rows of length D.
template <typename A>
__device__ inline A dot(const A* x, const A* y, int64_t D) {
  A s = 0;
  for (int64_t d = 0; d < D; ++d) s += x[d] * y[d];
  return s;
}

// ------------------------------------------------------------ forward

// grid (ceil(Tq / BM), H, B). Shared: Q (BM, D), K and V (BN, D + 1), O (BM, D), S (BM, BN),
// m, l, alpha (BM). Key blocks run from the one holding the first row's first key (key_lo) to
// the last row's last (key_hi).
template <typename T, typename A, int BM, int BN>
__global__ void __launch_bounds__(kThreads) forward_kernel(Params<T, A> p) {
  extern __shared__ unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const int64_t D = p.D, ldk = D + 1;
  A *Qs = smem, *Ks = Qs + BM * D, *Vs = Ks + BN * ldk, *Os = Vs + BN * ldk, *S = Os + BM * D;
  A *m = S + BM * BN, *l = m + BM, *alpha = l + BM;

  const int64_t b = blockIdx.z, h = blockIdx.y, i0 = int64_t(blockIdx.x) * BM;
  const Seq s = p.seq(b);
  if (i0 >= s.Tq) return;  // packed: past this sequence's queries (the whole block)
  const int64_t hk = h / (p.H / p.Hkv);
  const int64_t rows = min(int64_t(BM), s.Tq - i0);
  const int64_t kend = s.key_hi(i0 + rows - 1);
  const View<const T> q = p.q.from(s.q0), k = p.k.from(s.k0), v = p.v.from(s.k0);

  load_tile<T, A>(Qs, q, b, h, i0, BM, s.Tq, D, D);
  for (int64_t idx = threadIdx.x; idx < BM * D; idx += blockDim.x) Os[idx] = 0;
  for (int r = threadIdx.x; r < BM; r += blockDim.x) {
    m[r] = -infinity<A>();
    l[r] = 0;
  }
  for (int64_t j0 = s.key_lo(i0) / BN * BN; j0 < kend; j0 += BN) {
    __syncthreads();  // previous tile fully consumed
    load_tile<T, A>(Ks, k, b, hk, j0, BN, kend, D, ldk);
    load_tile<T, A>(Vs, v, b, hk, j0, BN, kend, D, ldk);
    __syncthreads();
    for (int idx = threadIdx.x; idx < BM * BN; idx += blockDim.x) {  // S = capped scale Q K^T
      const int r = idx / BN, c = idx % BN;
      A t;
      S[idx] = s.sees(i0 + r, j0 + c)
                   ? capped(p.scale * dot(Qs + r * D, Ks + c * ldk, D), p.softcap, t)
                   : -infinity<A>();
    }
    __syncthreads();
    for (int r = threadIdx.x; r < BM; r += blockDim.x) {  // online softmax, one thread per row
      A mx = m[r];
      for (int c = 0; c < BN; ++c) mx = max(mx, S[r * BN + c]);
      A sum = 0;
      for (int c = 0; c < BN; ++c) {
        const A s = S[r * BN + c];
        const A e = (s == -infinity<A>()) ? A(0) : acc_exp(s - mx);
        S[r * BN + c] = e;
        sum += e;
      }
      alpha[r] = (m[r] == -infinity<A>()) ? A(0) : acc_exp(m[r] - mx);
      l[r] = l[r] * alpha[r] + sum;
      m[r] = mx;
    }
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < BM * D; idx += blockDim.x) {  // O = alpha O + P V
      const int64_t r = idx / D, d = idx % D;
      A acc = Os[idx] * alpha[r];
      for (int c = 0; c < BN; ++c) acc += S[r * BN + c] * Vs[c * ldk + d];
      Os[idx] = acc;
    }
  }
  __syncthreads();
  const A* sink = p.sinks == nullptr ? nullptr : p.sinks + h;
  const View<A> lse = p.lse.from(s.q0);
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    const RowEnd<A> end = row_end(m[r], l[r], sink);
    alpha[r] = end.inv;  // alpha now holds each row's output scale
    *lse.row(b, h, i0 + r) = end.lse;
  }
  __syncthreads();
  const View<T> o = p.o.from(s.q0);
  for (int64_t idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
    const int64_t r = idx / D;
    o.row(b, h, i0 + r)[idx % D] = from_acc<T, A>(Os[idx] * alpha[r]);
  }
}

// ------------------------------------------------------------ backward

// delta[b, h, i] = sum_d dO * O; grid (ceil(Tq / blockDim), H, B), one row per thread.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) delta_kernel(Params<T, A> p) {
  const int64_t b = blockIdx.z, h = blockIdx.y, i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const Seq s = p.seq(b);
  if (i >= s.Tq) return;
  const T* dout = p.dout.from(s.q0).row(b, h, i);
  const T* out = p.out.from(s.q0).row(b, h, i);
  A sum = 0;
  for (int64_t d = 0; d < p.D; ++d) sum += to_acc(dout[d]) * to_acc(out[d]);
  *p.delta.from(s.q0).row(b, h, i) = sum;
}

// dsinks[h] = -sum of exp(sinks[h] - lse) * delta over the rows of head h of every sequence;
// grid (1, H, 1), shared: blockDim.x A. Thread t sums rows t, t + blockDim.x, ... of each sequence
// in turn, then a tree over the block: a fixed order, so the result is deterministic.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) dsinks_kernel(Params<T, A> p) {
  extern __shared__ unsigned char smem_raw[];
  A* part = reinterpret_cast<A*>(smem_raw);  // (blockDim.x,)
  const int64_t h = blockIdx.y;
  const A sink = p.sinks[h];
  A sum = 0;
  for (int64_t b = 0; b < p.B; ++b) {
    const Seq s = p.seq(b);
    const View<A> lse = p.lse.from(s.q0), delta = p.delta.from(s.q0);
    for (int64_t i = threadIdx.x; i < s.Tq; i += blockDim.x)
      sum -= acc_exp(sink - *lse.row(b, h, i)) * *delta.row(b, h, i);
  }
  part[threadIdx.x] = sum;
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {  // blockDim.x: a power of two
    __syncthreads();
    if (threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
  }
  if (threadIdx.x == 0) p.dsinks[h] = part[0];
}

// P and dS of one (BM, BN) tile of sequence s from shared Q, dO, K, V; masked entries and rows
// past Tq give 0. With a softcap, dS also takes d score / ds = 1 - tanh^2.
template <typename T, typename A, int BM, int BN>
__device__ inline void tile_probs(const Params<T, A>& p, const Seq& s, int64_t b, int64_t h,
                                  int64_t i0, int64_t j0, const A* Qs, const A* dOs, const A* Ks,
                                  const A* Vs, A* P, A* dS) {
  const int64_t D = p.D, ldk = D + 1;
  for (int idx = threadIdx.x; idx < BM * BN; idx += blockDim.x) {
    const int r = idx / BN, c = idx % BN;
    const int64_t i = i0 + r;
    A pr = 0, ds = 0;
    if (s.sees(i, j0 + c)) {
      const A lse = *p.lse.row(b, h, s.q0 + i), delta = *p.delta.row(b, h, s.q0 + i);
      A t;
      pr = acc_exp(capped(p.scale * dot(Qs + r * D, Ks + c * ldk, D), p.softcap, t) - lse);
      ds = pr * (dot(dOs + r * D, Vs + c * ldk, D) - delta) * (A(1) - t * t);
    }
    P[idx] = pr;
    dS[idx] = ds;
  }
}

// dK, dV of one key block over every query head of its kv head; grid (ceil(Tk / BN), Hkv, B).
// Query blocks run from the one holding the first query that sees key j0 to the last that sees
// the block's last key. Shared: K, V (BN, D + 1), dK, dV (BN, D), Q, dO (BM, D), P, dS (BM, BN).
template <typename T, typename A, int BM, int BN>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(Params<T, A> p) {
  extern __shared__ unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const int64_t D = p.D, ldk = D + 1;
  A *Ks = smem, *Vs = Ks + BN * ldk, *dKs = Vs + BN * ldk, *dVs = dKs + BN * D;
  A *Qs = dVs + BN * D, *dOs = Qs + BM * D, *P = dOs + BM * D, *dS = P + BM * BN;

  const int64_t b = blockIdx.z, hk = blockIdx.y, j0 = int64_t(blockIdx.x) * BN;
  const Seq s = p.seq(b);
  if (j0 >= s.Tk) return;  // packed: past this sequence's keys (the whole block)
  const int64_t cols = min(int64_t(BN), s.Tk - j0), group = p.H / p.Hkv;
  const int64_t first = s.first_query(j0), qend = s.query_end(j0 + cols - 1);
  const View<const T> q = p.q.from(s.q0), dout = p.dout.from(s.q0);

  load_tile<T, A>(Ks, p.k.from(s.k0), b, hk, j0, BN, s.Tk, D, ldk);
  load_tile<T, A>(Vs, p.v.from(s.k0), b, hk, j0, BN, s.Tk, D, ldk);
  for (int64_t idx = threadIdx.x; idx < BN * D; idx += blockDim.x) dKs[idx] = dVs[idx] = 0;
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t i0 = first / BM * BM; i0 < qend; i0 += BM) {
      __syncthreads();
      load_tile<T, A>(Qs, q, b, h, i0, BM, s.Tq, D, D);
      load_tile<T, A>(dOs, dout, b, h, i0, BM, s.Tq, D, D);
      __syncthreads();
      tile_probs<T, A, BM, BN>(p, s, b, h, i0, j0, Qs, dOs, Ks, Vs, P, dS);
      __syncthreads();
      for (int64_t idx = threadIdx.x; idx < BN * D; idx += blockDim.x) {
        const int64_t c = idx / D, d = idx % D;
        A dv = 0, dk = 0;
        for (int r = 0; r < BM; ++r) {
          dv += P[r * BN + c] * dOs[r * D + d];
          dk += dS[r * BN + c] * Qs[r * D + d];
        }
        dVs[idx] += dv;
        dKs[idx] += p.scale * dk;
      }
    }
  }
  __syncthreads();
  const View<T> dk = p.dk.from(s.k0), dv = p.dv.from(s.k0);
  for (int64_t idx = threadIdx.x; idx < cols * D; idx += blockDim.x) {
    const int64_t c = idx / D, d = idx % D;
    dk.row(b, hk, j0 + c)[d] = from_acc<T, A>(dKs[idx]);
    dv.row(b, hk, j0 + c)[d] = from_acc<T, A>(dVs[idx]);
  }
}

// dQ of one query block over the key blocks the forward visits; grid (ceil(Tq / BM), H, B).
// Shared: Q, dO, dQ (BM, D), K, V (BN, D + 1), P, dS (BM, BN).
template <typename T, typename A, int BM, int BN>
__global__ void __launch_bounds__(kThreads) dq_kernel(Params<T, A> p) {
  extern __shared__ unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const int64_t D = p.D, ldk = D + 1;
  A *Qs = smem, *dOs = Qs + BM * D, *dQs = dOs + BM * D, *Ks = dQs + BM * D, *Vs = Ks + BN * ldk;
  A *P = Vs + BN * ldk, *dS = P + BM * BN;

  const int64_t b = blockIdx.z, h = blockIdx.y, i0 = int64_t(blockIdx.x) * BM;
  const Seq s = p.seq(b);
  if (i0 >= s.Tq) return;  // packed: past this sequence's queries (the whole block)
  const int64_t hk = h / (p.H / p.Hkv);
  const int64_t rows = min(int64_t(BM), s.Tq - i0);
  const int64_t kend = s.key_hi(i0 + rows - 1);
  const View<const T> k = p.k.from(s.k0), v = p.v.from(s.k0);

  load_tile<T, A>(Qs, p.q.from(s.q0), b, h, i0, BM, s.Tq, D, D);
  load_tile<T, A>(dOs, p.dout.from(s.q0), b, h, i0, BM, s.Tq, D, D);
  for (int64_t idx = threadIdx.x; idx < BM * D; idx += blockDim.x) dQs[idx] = 0;
  for (int64_t j0 = s.key_lo(i0) / BN * BN; j0 < kend; j0 += BN) {
    __syncthreads();
    load_tile<T, A>(Ks, k, b, hk, j0, BN, kend, D, ldk);
    load_tile<T, A>(Vs, v, b, hk, j0, BN, kend, D, ldk);
    __syncthreads();
    tile_probs<T, A, BM, BN>(p, s, b, h, i0, j0, Qs, dOs, Ks, Vs, P, dS);
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < BM * D; idx += blockDim.x) {
      const int64_t r = idx / D, d = idx % D;
      A dq = 0;
      for (int c = 0; c < BN; ++c) dq += dS[r * BN + c] * Ks[c * ldk + d];
      dQs[idx] += p.scale * dq;
    }
  }
  __syncthreads();
  const View<T> dq = p.dq.from(s.q0);
  for (int64_t idx = threadIdx.x; idx < rows * D; idx += blockDim.x)
    dq.row(b, h, i0 + idx / D)[idx % D] = from_acc<T, A>(dQs[idx]);
}

// ------------------------------------------------------------ launchers

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename Kernel>
inline cudaError_t launch(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream,
                          const void* params_ptr) {
  if (smem > 48 * 1024) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  void* args[] = {const_cast<void*>(params_ptr)};
  return cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, dim3(kThreads), args, smem,
                          stream);
}

// Tile sizes: 16 x 16 keeps D = 256 in fp32 under 70 KiB; double takes 8 x 8.
template <typename A>
struct Tiles {
  static constexpr int BM = sizeof(A) == 8 ? 8 : 16;
  static constexpr int BN = sizeof(A) == 8 ? 8 : 16;
};

// Dynamic shared memory of each kernel for head dim D (see the layouts above each kernel).
template <typename A>
struct SharedBytes {
  static constexpr int BM = Tiles<A>::BM, BN = Tiles<A>::BN;
  static constexpr size_t forward(int64_t D) {
    return sizeof(A) * (2 * BM * D + 2 * BN * (D + 1) + BM * BN + 3 * BM);
  }
  static constexpr size_t dkdv(int64_t D) {
    return sizeof(A) * (2 * BN * (D + 1) + (2 * BN + 2 * BM) * D + 2 * BM * BN);
  }
  static constexpr size_t dq(int64_t D) {
    return sizeof(A) * (3 * BM * D + 2 * BN * (D + 1) + 2 * BM * BN);
  }
};

template <typename T, typename A>
cudaError_t attention_forward(const Params<T, A>& p, cudaStream_t stream) {
  constexpr int BM = Tiles<A>::BM, BN = Tiles<A>::BN;
  const dim3 grid(ceil_div(p.Tq, BM), p.H, p.B);
  return launch(forward_kernel<T, A, BM, BN>, grid, SharedBytes<A>::forward(p.D), stream, &p);
}

template <typename T, typename A>
cudaError_t attention_backward(const Params<T, A>& p, cudaStream_t stream) {
  constexpr int BM = Tiles<A>::BM, BN = Tiles<A>::BN;
  cudaError_t err =
      launch(delta_kernel<T, A>, dim3(ceil_div(p.Tq, kThreads), p.H, p.B), 0, stream, &p);
  if (err == cudaSuccess && p.sinks != nullptr)
    err = launch(dsinks_kernel<T, A>, dim3(1, p.H, 1), kThreads * sizeof(A), stream, &p);
  if (err != cudaSuccess) return err;
  err = launch(dkdv_kernel<T, A, BM, BN>, dim3(ceil_div(p.Tk, BN), p.Hkv, p.B),
               SharedBytes<A>::dkdv(p.D), stream, &p);
  if (err != cudaSuccess) return err;
  return launch(dq_kernel<T, A, BM, BN>, dim3(ceil_div(p.Tq, BM), p.H, p.B),
                SharedBytes<A>::dq(p.D), stream, &p);
}

}  // namespace fastgpt::cuda
