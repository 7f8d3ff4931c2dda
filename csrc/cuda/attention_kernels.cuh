// Tiled flash-style attention kernels for CUDA: forward, delta, dK/dV and dQ.
//
// Plain CUDA with no torch include, so `nvcc -arch=sm_80 -c` can compile it on a
// machine without a GPU or a CUDA build of torch (tests/test_cpp_cuda_compile.py).
// attention_cuda.cu is the torch glue that launches these.
//
// Semantics match the CPU kernel: q (B, H, Tq, D), k/v (B, Hkv, Tk, D), query head h
// reads kv head h / (H / Hkv); causal is bottom-right (query i sees keys
// j <= i + Tk - Tq); a row with no visible key outputs 0 and lse = +inf.
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

// One sequence: its query rows start at q0 and its key rows at k0 of its batch entry.
struct Seq {
  int64_t q0, k0, Tq, Tk;
  bool causal;
  // Number of keys query row i sees (keys 0 .. n-1).
  __device__ int64_t visible(int64_t i) const {
    if (!causal) return Tk;
    const int64_t n = i + (Tk - Tq) + 1;
    return n < 0 ? 0 : (n > Tk ? Tk : n);
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

  __device__ Seq seq(int64_t b) const {
    if (cu_q == nullptr) return {0, 0, Tq, Tk, causal};
    return {cu_q[b], cu_k[b], cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b], causal};
  }
};

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
// m, l, alpha (BM).
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
  const int64_t kend = s.visible(i0 + rows - 1);
  const View<const T> q = p.q.from(s.q0), k = p.k.from(s.k0), v = p.v.from(s.k0);

  load_tile<T, A>(Qs, q, b, h, i0, BM, s.Tq, D, D);
  for (int64_t idx = threadIdx.x; idx < BM * D; idx += blockDim.x) Os[idx] = 0;
  for (int r = threadIdx.x; r < BM; r += blockDim.x) {
    m[r] = -infinity<A>();
    l[r] = 0;
  }
  for (int64_t j0 = 0; j0 < kend; j0 += BN) {
    __syncthreads();  // previous tile fully consumed
    load_tile<T, A>(Ks, k, b, hk, j0, BN, kend, D, ldk);
    load_tile<T, A>(Vs, v, b, hk, j0, BN, kend, D, ldk);
    __syncthreads();
    for (int idx = threadIdx.x; idx < BM * BN; idx += blockDim.x) {
      const int r = idx / BN, c = idx % BN;
      const bool seen = i0 + r < s.Tq && j0 + c < s.visible(i0 + r);
      S[idx] = seen ? p.scale * dot(Qs + r * D, Ks + c * ldk, D) : -infinity<A>();
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
  const View<T> o = p.o.from(s.q0);
  for (int64_t idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
    const int64_t r = idx / D;
    o.row(b, h, i0 + r)[idx % D] = from_acc<T, A>(l[r] > A(0) ? Os[idx] / l[r] : A(0));
  }
  const View<A> lse = p.lse.from(s.q0);
  for (int r = threadIdx.x; r < rows; r += blockDim.x)
    *lse.row(b, h, i0 + r) = l[r] > A(0) ? m[r] + acc_log(l[r]) : infinity<A>();
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

// P and dS of one (BM, BN) tile of sequence s from shared Q, dO, K, V; rows past Tq give 0.
template <typename T, typename A, int BM, int BN>
__device__ inline void tile_probs(const Params<T, A>& p, const Seq& s, int64_t b, int64_t h,
                                  int64_t i0, int64_t j0, const A* Qs, const A* dOs, const A* Ks,
                                  const A* Vs, A* P, A* dS) {
  const int64_t D = p.D, ldk = D + 1;
  for (int idx = threadIdx.x; idx < BM * BN; idx += blockDim.x) {
    const int r = idx / BN, c = idx % BN;
    const int64_t i = i0 + r;
    A pr = 0, ds = 0;
    if (i < s.Tq && j0 + c < s.visible(i)) {
      const A lse = *p.lse.row(b, h, s.q0 + i), delta = *p.delta.row(b, h, s.q0 + i);
      pr = acc_exp(p.scale * dot(Qs + r * D, Ks + c * ldk, D) - lse);
      ds = pr * (dot(dOs + r * D, Vs + c * ldk, D) - delta);
    }
    P[idx] = pr;
    dS[idx] = ds;
  }
}

// dK, dV of one key block over every query head of its kv head; grid (ceil(Tk / BN), Hkv, B).
// Shared: K, V (BN, D + 1), dK, dV (BN, D), Q, dO (BM, D), P, dS (BM, BN).
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
  // First query row that sees key j0, rounded down to a tile.
  const int64_t first = s.causal ? max(int64_t(0), j0 - (s.Tk - s.Tq)) : 0;
  const View<const T> q = p.q.from(s.q0), dout = p.dout.from(s.q0);

  load_tile<T, A>(Ks, p.k.from(s.k0), b, hk, j0, BN, s.Tk, D, ldk);
  load_tile<T, A>(Vs, p.v.from(s.k0), b, hk, j0, BN, s.Tk, D, ldk);
  for (int64_t idx = threadIdx.x; idx < BN * D; idx += blockDim.x) dKs[idx] = dVs[idx] = 0;
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t i0 = first / BM * BM; i0 < s.Tq; i0 += BM) {
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

// dQ of one query block; grid (ceil(Tq / BM), H, B).
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
  const int64_t kend = s.visible(i0 + rows - 1);
  const View<const T> k = p.k.from(s.k0), v = p.v.from(s.k0);

  load_tile<T, A>(Qs, p.q.from(s.q0), b, h, i0, BM, s.Tq, D, D);
  load_tile<T, A>(dOs, p.dout.from(s.q0), b, h, i0, BM, s.Tq, D, D);
  for (int64_t idx = threadIdx.x; idx < BM * D; idx += blockDim.x) dQs[idx] = 0;
  for (int64_t j0 = 0; j0 < kend; j0 += BN) {
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
  if (err != cudaSuccess) return err;
  err = launch(dkdv_kernel<T, A, BM, BN>, dim3(ceil_div(p.Tk, BN), p.Hkv, p.B),
               SharedBytes<A>::dkdv(p.D), stream, &p);
  if (err != cudaSuccess) return err;
  return launch(dq_kernel<T, A, BM, BN>, dim3(ceil_div(p.Tq, BM), p.H, p.B),
                SharedBytes<A>::dq(p.D), stream, &p);
}

}  // namespace fastgpt::cuda
