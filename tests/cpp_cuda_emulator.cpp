// Runs the CUDA kernels of csrc/cuda/attention_kernels.cuh on the CPU, one thread per block.
//
// Test harness for tests/test_cpp_cuda_compile.py, compiled with the host C++ compiler and the
// CUDA headers (no GPU, no nvcc device pass). Every loop in the kernels strides over the block,
// so with blockDim.x = 1 a single thread does all of a block's work and __syncthreads() is a
// no-op: this checks the kernels' indexing, masking and numerics (not their races, which need
// a GPU). Usage: cpp_cuda_emulator f|d|h|b B H Hkv Tq Tk D causal scale in.bin out.bin
// (fp32, fp64, fp16, bf16). in.bin holds q, k, v, grad_out (contiguous, the given dtype);
// out.bin gets out, lse (fp32, fp64 for fp64), dq, dk, dv.

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

using std::max;
using std::min;
uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
inline void __syncthreads() {}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}
#define __launch_bounds__(n)
namespace fastgpt::cuda {
alignas(16) unsigned char smem_raw[1 << 21];  // the blocks' dynamic shared memory
}

#include "attention_kernels.cuh"

using namespace fastgpt::cuda;

// Runs `block` for every block of a (gx, gy, gz) grid with one thread per block.
template <typename F>
void grid(int64_t gx, int64_t gy, int64_t gz, F block) {
  blockDim = dim3(1, 1, 1);
  threadIdx = make_uint3(0, 0, 0);
  for (int64_t z = 0; z < gz; ++z)
    for (int64_t y = 0; y < gy; ++y)
      for (int64_t x = 0; x < gx; ++x) {
        blockIdx = make_uint3(x, y, z);
        block();
      }
}

template <typename T, typename A>
void run(FILE* in, FILE* out, int64_t B, int64_t H, int64_t Hkv, int64_t Tq, int64_t Tk, int64_t D,
         bool causal, double scale) {
  constexpr int BM = Tiles<A>::BM, BN = Tiles<A>::BN;
  std::vector<T> q(B * H * Tq * D), k(B * Hkv * Tk * D), v(k.size()), dout(q.size());
  for (auto* t : {&q, &k, &v, &dout}) {
    if (std::fread(t->data(), sizeof(T), t->size(), in) != t->size()) std::exit(2);
  }
  std::vector<T> o(q.size()), dq(q.size()), dk(k.size()), dv(k.size());
  std::vector<A> lse(B * H * Tq), delta(B * H * Tq);
  Params<T, A> p{};
  p.q = {q.data(), H * Tq * D, Tq * D, D};
  p.k = {k.data(), Hkv * Tk * D, Tk * D, D};
  p.v = {v.data(), Hkv * Tk * D, Tk * D, D};
  p.dout = {dout.data(), H * Tq * D, Tq * D, D};
  p.out = {o.data(), H * Tq * D, Tq * D, D};
  p.o = o.data(), p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
  p.lse = lse.data(), p.delta = delta.data();
  p.B = B, p.H = H, p.Hkv = Hkv, p.Tq = Tq, p.Tk = Tk, p.D = D, p.causal = causal;
  p.scale = A(scale);
  grid(ceil_div(Tq, BM), H, B, [&] { forward_kernel<T, A, BM, BN>(p); });
  grid(B * H * Tq, 1, 1, [&] { delta_kernel<T, A>(p); });  // one row per block here
  grid(ceil_div(Tk, BN), Hkv, B, [&] { dkdv_kernel<T, A, BM, BN>(p); });
  grid(ceil_div(Tq, BM), H, B, [&] { dq_kernel<T, A, BM, BN>(p); });
  std::fwrite(o.data(), sizeof(T), o.size(), out);
  std::fwrite(lse.data(), sizeof(A), lse.size(), out);
  for (auto* t : {&dq, &dk, &dv}) std::fwrite(t->data(), sizeof(T), t->size(), out);
}

int main(int argc, char** argv) {
  if (argc != 12) return 1;
  const int64_t B = std::atol(argv[2]), H = std::atol(argv[3]), Hkv = std::atol(argv[4]);
  const int64_t Tq = std::atol(argv[5]), Tk = std::atol(argv[6]), D = std::atol(argv[7]);
  const bool causal = std::atoi(argv[8]) != 0;
  const double scale = std::atof(argv[9]);
  FILE* in = std::fopen(argv[10], "rb");
  FILE* out = std::fopen(argv[11], "wb");
  if (in == nullptr || out == nullptr) return 1;
  switch (argv[1][0]) {
    case 'd':
      run<double, double>(in, out, B, H, Hkv, Tq, Tk, D, causal, scale);
      break;
    case 'f':
      run<float, float>(in, out, B, H, Hkv, Tq, Tk, D, causal, scale);
      break;
    case 'h':
      run<__half, float>(in, out, B, H, Hkv, Tq, Tk, D, causal, scale);
      break;
    case 'b':
      run<__nv_bfloat16, float>(in, out, B, H, Hkv, Tq, Tk, D, causal, scale);
      break;
    default:
      return 1;
  }
  std::fclose(in);
  std::fclose(out);
  return 0;
}
