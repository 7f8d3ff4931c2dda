// Runs the CUDA kernels of csrc/cuda/attention_kernels.cuh on the CPU, one thread per block.
//
// Test harness for tests/test_cpp_cuda_compile.py, compiled with the host C++ compiler and the
// CUDA headers (no GPU, no nvcc device pass). Every loop in the kernels strides over the block,
// so with blockDim.x = 1 a single thread does all of a block's work and __syncthreads() is a
// no-op: this checks the kernels' indexing, masking and numerics (not their races, which need
// a GPU). Usage:
//   cpp_cuda_emulator f|d|h|b B H Hkv Tq Tk D causal scale left right softcap sinks in.bin out.bin
//   [cu.bin]
// (fp32, fp64, fp16, bf16; window (left, right), -1 unbounded; softcap 0: off; sinks 0|1). in.bin
// holds q, k, v, grad_out (contiguous, the given dtype), then with sinks (H,) float64; out.bin gets
// out, lse (fp32, fp64 for fp64), dq, dk, dv, then with sinks dsinks (H,) in lse's dtype. With
// cu.bin (int32 cu_seqlens_q then cu_seqlens_k, B + 1 each) the sequences are packed: q,
// grad_out, out, dq (total_q, H, D), k, v, dk, dv (total_k, Hkv, D), lse (H, total_q), and Tq, Tk
// are the longest lengths.

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

// Strides (batch, head, row) of a contiguous tensor with `rows` rows of `heads` heads: dense
// (B, heads, rows, width), or packed (rows, heads, width) with batch stride 0.
std::vector<int64_t> strides(bool packed, int64_t heads, int64_t rows, int64_t width) {
  if (packed) return {0, width, heads * width};
  return {heads * rows * width, rows * width, width};
}

template <typename T>
View<T> view(T* p, const std::vector<int64_t>& s) {
  return {p, s[0], s[1], s[2]};
}

// The attention variants of a run (Params' left, right, softcap, sinks).
struct Variants {
  int64_t left, right;
  double softcap;
  bool sinks;
};

// Runs every kernel of the forward and the backward as attention_forward / attention_backward
// launch them.
template <typename T, typename A>
void launch_all(const Params<T, A>& p) {
  constexpr int BM = Tiles<A>::BM, BN = Tiles<A>::BN;
  grid(ceil_div(p.Tq, BM), p.H, p.B, [&] { forward_kernel<T, A, BM, BN>(p); });
  grid(p.Tq, p.H, p.B, [&] { delta_kernel<T, A>(p); });  // one row per block here
  if (p.sinks != nullptr) grid(1, p.H, 1, [&] { dsinks_kernel<T, A>(p); });
  grid(ceil_div(p.Tk, BN), p.Hkv, p.B, [&] { dkdv_kernel<T, A, BM, BN>(p); });
  grid(ceil_div(p.Tq, BM), p.H, p.B, [&] { dq_kernel<T, A, BM, BN>(p); });
}

template <typename T, typename A>
void run(FILE* in, FILE* out, const std::vector<int32_t>& cu, int64_t B, int64_t H, int64_t Hkv,
         int64_t Tq, int64_t Tk, int64_t D, bool causal, double scale, const Variants& var) {
  const bool packed = !cu.empty();
  const int64_t rows_q = packed ? cu[B] : Tq, rows_k = packed ? cu[2 * B + 1] : Tk;
  const int64_t nb = packed ? 1 : B;  // batch entries in memory
  std::vector<T> q(nb * H * rows_q * D), k(nb * Hkv * rows_k * D), v(k.size()), dout(q.size());
  for (auto* t : {&q, &k, &v, &dout}) {
    if (std::fread(t->data(), sizeof(T), t->size(), in) != t->size()) std::exit(2);
  }
  std::vector<double> sinks64(var.sinks ? H : 0);  // (H,) or none
  const size_t n_sinks = sinks64.size();
  if (std::fread(sinks64.data(), sizeof(double), n_sinks, in) != n_sinks) std::exit(2);
  const std::vector<A> sinks(sinks64.begin(), sinks64.end());
  std::vector<T> o(q.size()), dq(q.size()), dk(k.size()), dv(k.size());
  std::vector<A> lse(nb * H * rows_q), delta(lse.size()), dsinks(sinks.size());
  const auto sq = strides(packed, H, rows_q, D), sk = strides(packed, Hkv, rows_k, D);
  // lse: dense (B, H, Tq); packed (H, total_q)
  const std::vector<int64_t> sl = packed ? std::vector<int64_t>{0, rows_q, 1}
                                         : std::vector<int64_t>{H * Tq, Tq, 1};
  Params<T, A> p{};
  p.q = view<const T>(q.data(), sq), p.dout = view<const T>(dout.data(), sq);
  p.k = view<const T>(k.data(), sk), p.v = view<const T>(v.data(), sk);
  p.out = view<const T>(o.data(), sq);
  p.o = view(o.data(), sq), p.dq = view(dq.data(), sq);
  p.dk = view(dk.data(), sk), p.dv = view(dv.data(), sk);
  p.lse = view(lse.data(), sl), p.delta = view(delta.data(), sl);
  if (packed) p.cu_q = cu.data(), p.cu_k = cu.data() + B + 1;
  p.B = B, p.H = H, p.Hkv = Hkv, p.Tq = Tq, p.Tk = Tk, p.D = D, p.causal = causal;
  p.scale = A(scale);
  p.left = var.left, p.right = var.right, p.softcap = A(var.softcap);
  p.sinks = var.sinks ? sinks.data() : nullptr, p.dsinks = var.sinks ? dsinks.data() : nullptr;
  launch_all(p);
  std::fwrite(o.data(), sizeof(T), o.size(), out);
  std::fwrite(lse.data(), sizeof(A), lse.size(), out);
  for (auto* t : {&dq, &dk, &dv}) std::fwrite(t->data(), sizeof(T), t->size(), out);
  std::fwrite(dsinks.data(), sizeof(A), dsinks.size(), out);
}

int main(int argc, char** argv) {
  if (argc != 16 && argc != 17) return 1;
  const int64_t B = std::atol(argv[2]), H = std::atol(argv[3]), Hkv = std::atol(argv[4]);
  const int64_t Tq = std::atol(argv[5]), Tk = std::atol(argv[6]), D = std::atol(argv[7]);
  const bool causal = std::atoi(argv[8]) != 0;
  const double scale = std::atof(argv[9]);
  const Variants var{std::atol(argv[10]), std::atol(argv[11]), std::atof(argv[12]),
                     std::atoi(argv[13]) != 0};
  FILE* in = std::fopen(argv[14], "rb");
  FILE* out = std::fopen(argv[15], "wb");
  if (in == nullptr || out == nullptr) return 1;
  std::vector<int32_t> cu;  // packed: cu_seqlens_q, cu_seqlens_k
  if (argc == 17) {
    cu.resize(2 * (B + 1));
    FILE* f = std::fopen(argv[16], "rb");
    if (f == nullptr || std::fread(cu.data(), sizeof(int32_t), cu.size(), f) != cu.size()) return 1;
    std::fclose(f);
  }
  switch (argv[1][0]) {
    case 'd':
      run<double, double>(in, out, cu, B, H, Hkv, Tq, Tk, D, causal, scale, var);
      break;
    case 'f':
      run<float, float>(in, out, cu, B, H, Hkv, Tq, Tk, D, causal, scale, var);
      break;
    case 'h':
      run<__half, float>(in, out, cu, B, H, Hkv, Tq, Tk, D, causal, scale, var);
      break;
    case 'b':
      run<__nv_bfloat16, float>(in, out, cu, B, H, Hkv, Tq, Tk, D, causal, scale, var);
      break;
    default:
      return 1;
  }
  std::fclose(in);
  std::fclose(out);
  return 0;
}
