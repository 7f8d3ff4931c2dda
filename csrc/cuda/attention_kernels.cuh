// Tiled flash-style attention kernels for CUDA: forward, delta, dK/dV and dQ.
//
// Plain CUDA with no torch include, so `nvcc -arch=sm_80 -c` can compile it on a
// machine without a GPU or a CUDA build of torch (tests/test_cpp_cuda_compile.py).
// attention_cuda.cu is the torch glue that launches these.
//
// Semantics match the CPU kernel: q (B, H, Tq, D), k/v (B, Hkv, Tk, D), query head h
// reads kv head h / (H / Hkv); causal is bottom-right (query i sees keys
// j <= i + Tk - Tq); a row with no visible key outputs 0 and lse = +inf.
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

// Strided view of a (B, H, T, D) tensor with unit stride on D.
template <typename T>
struct View {
  T* p;
  int64_t sb, sh, st;
  __device__ T* row(int64_t b, int64_t h, int64_t t) const { return p + b * sb + h * sh + t * st; }
};

template <typename T, typename A>
struct Params {
  View<const T> q, k, v, dout, out;  // dout/out only in the backward
  T *o, *dq, *dk, *dv;               // contiguous outputs
  A* lse;                            // (B, H, Tq)
  A* delta;                          // (B, H, Tq), backward scratch
  int64_t B, H, Hkv, Tq, Tk, D;
  bool causal;
  A scale;

  // Number of keys query row i sees (keys 0 .. n-1).
  __device__ int64_t visible(int64_t i) const {
    if (!causal) return Tk;
    const int64_t n = i + (Tk - Tq) + 1;
    return n < 0 ? 0 : (n > Tk ? Tk : n);
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
  const int64_t hk = h / (p.H / p.Hkv);
  const int64_t rows = min(int64_t(BM), p.Tq - i0);
  const int64_t kend = p.visible(i0 + rows - 1);

  load_tile<T, A>(Qs, p.q, b, h, i0, BM, p.Tq, D, D);
  for (int64_t idx = threadIdx.x; idx < BM * D; idx += blockDim.x) Os[idx] = 0;
  for (int r = threadIdx.x; r < BM; r += blockDim.x) {
    m[r] = -infinity<A>();
    l[r] = 0;
  }
  for (int64_t j0 = 0; j0 < kend; j0 += BN) {
    __syncthreads();  // previous tile fully consumed
    load_tile<T, A>(Ks, p.k, b, hk, j0, BN, kend, D, ldk);
    load_tile<T, A>(Vs, p.v, b, hk, j0, BN, kend, D, ldk);
    __syncthreads();
    for (int idx = threadIdx.x; idx < BM * BN; idx += blockDim.x) {
      const int r = idx / BN, c = idx % BN;
      const bool seen = i0 + r < p.Tq && j0 + c < p.visible(i0 + r);
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
  T* o = p.o + ((b * p.H + h) * p.Tq + i0) * D;
  for (int64_t idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
    const int64_t r = idx / D;
    o[idx] = from_acc<T, A>(l[r] > A(0) ? Os[idx] / l[r] : A(0));
  }
  A* lse = p.lse + (b * p.H + h) * p.Tq + i0;
  for (int r = threadIdx.x; r < rows; r += blockDim.x)
    lse[r] = l[r] > A(0) ? m[r] + acc_log(l[r]) : infinity<A>();
}

// ------------------------------------------------------------ backward

// delta[b, h, i] = sum_d dO * O; grid (ceil(B * H * Tq / kThreads)).
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) delta_kernel(Params<T, A> p) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= p.B * p.H * p.Tq) return;
  const int64_t i = row % p.Tq, bh = row / p.Tq;
  const T* dout = p.dout.row(bh / p.H, bh % p.H, i);
  const T* out = p.out.row(bh / p.H, bh % p.H, i);
  A s = 0;
  for (int64_t d = 0; d < p.D; ++d) s += to_acc(dout[d]) * to_acc(out[d]);
  p.delta[row] = s;
}

// P and dS of one (BM, BN) tile from shared Q, dO, K, V; rows past Tq give 0.
template <typename T, typename A, int BM, int BN>
__device__ inline void tile_probs(const Params<T, A>& p, int64_t b, int64_t h, int64_t i0,
                                  int64_t j0, const A* Qs, const A* dOs, const A* Ks, const A* Vs,
                                  A* P, A* dS) {
  const int64_t D = p.D, ldk = D + 1;
  for (int idx = threadIdx.x; idx < BM * BN; idx += blockDim.x) {
    const int r = idx / BN, c = idx % BN;
    const int64_t i = i0 + r;
    A pr = 0, ds = 0;
    if (i < p.Tq && j0 + c < p.visible(i)) {
      const int64_t row = (b * p.H + h) * p.Tq + i;
      pr = acc_exp(p.scale * dot(Qs + r * D, Ks + c * ldk, D) - p.lse[row]);
      ds = pr * (dot(dOs + r * D, Vs + c * ldk, D) - p.delta[row]);
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
  const int64_t cols = min(int64_t(BN), p.Tk - j0), group = p.H / p.Hkv;
  // First query row that sees key j0, rounded down to a tile.
  const int64_t first = p.causal ? max(int64_t(0), j0 - (p.Tk - p.Tq)) : 0;

  load_tile<T, A>(Ks, p.k, b, hk, j0, BN, p.Tk, D, ldk);
  load_tile<T, A>(Vs, p.v, b, hk, j0, BN, p.Tk, D, ldk);
  for (int64_t idx = threadIdx.x; idx < BN * D; idx += blockDim.x) dKs[idx] = dVs[idx] = 0;
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t i0 = first / BM * BM; i0 < p.Tq; i0 += BM) {
      __syncthreads();
      load_tile<T, A>(Qs, p.q, b, h, i0, BM, p.Tq, D, D);
      load_tile<T, A>(dOs, p.dout, b, h, i0, BM, p.Tq, D, D);
      __syncthreads();
      tile_probs<T, A, BM, BN>(p, b, h, i0, j0, Qs, dOs, Ks, Vs, P, dS);
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
  const int64_t base = ((b * p.Hkv + hk) * p.Tk + j0) * D;
  for (int64_t idx = threadIdx.x; idx < cols * D; idx += blockDim.x) {
    p.dk[base + idx] = from_acc<T, A>(dKs[idx]);
    p.dv[base + idx] = from_acc<T, A>(dVs[idx]);
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
  const int64_t hk = h / (p.H / p.Hkv);
  const int64_t rows = min(int64_t(BM), p.Tq - i0);
  const int64_t kend = p.visible(i0 + rows - 1);

  load_tile<T, A>(Qs, p.q, b, h, i0, BM, p.Tq, D, D);
  load_tile<T, A>(dOs, p.dout, b, h, i0, BM, p.Tq, D, D);
  for (int64_t idx = threadIdx.x; idx < BM * D; idx += blockDim.x) dQs[idx] = 0;
  for (int64_t j0 = 0; j0 < kend; j0 += BN) {
    __syncthreads();
    load_tile<T, A>(Ks, p.k, b, hk, j0, BN, kend, D, ldk);
    load_tile<T, A>(Vs, p.v, b, hk, j0, BN, kend, D, ldk);
    __syncthreads();
    tile_probs<T, A, BM, BN>(p, b, h, i0, j0, Qs, dOs, Ks, Vs, P, dS);
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < BM * D; idx += blockDim.x) {
      const int64_t r = idx / D, d = idx % D;
      A dq = 0;
      for (int c = 0; c < BN; ++c) dq += dS[r * BN + c] * Ks[c * ldk + d];
      dQs[idx] += p.scale * dq;
    }
  }
  __syncthreads();
  T* dq = p.dq + ((b * p.H + h) * p.Tq + i0) * D;
  for (int64_t idx = threadIdx.x; idx < rows * D; idx += blockDim.x)
    dq[idx] = from_acc<T, A>(dQs[idx]);
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
      launch(delta_kernel<T, A>, dim3(ceil_div(p.B * p.H * p.Tq, kThreads)), 0, stream, &p);
  if (err != cudaSuccess) return err;
  err = launch(dkdv_kernel<T, A, BM, BN>, dim3(ceil_div(p.Tk, BN), p.Hkv, p.B),
               SharedBytes<A>::dkdv(p.D), stream, &p);
  if (err != cudaSuccess) return err;
  return launch(dq_kernel<T, A, BM, BN>, dim3(ceil_div(p.Tq, BM), p.H, p.B),
                SharedBytes<A>::dq(p.D), stream, &p);
}

}  // namespace fastgpt::cuda
