// torch glue for the CUDA kernels in attention_kernels.cuh: checks, allocation, launch.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "attention_kernels.cuh"

namespace fastgpt::cuda {
namespace {

template <typename T>
View<const T> view_of(const at::Tensor& t) {
  return {reinterpret_cast<const T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

at::ScalarType lse_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fastgpt CUDA ", what,
              " failed to launch: ", cudaGetErrorString(err), ".");
}

// Runs FN<T, A>(args...) with the CUDA element type T and accumulator A of `dtype`.
#define DISPATCH(dtype, FN, ...)                                                             \
  switch (dtype) {                                                                           \
    case at::kFloat:                                                                         \
      FN<float, float>(__VA_ARGS__);                                                         \
      break;                                                                                 \
    case at::kDouble:                                                                        \
      FN<double, double>(__VA_ARGS__);                                                       \
      break;                                                                                 \
    case at::kHalf:                                                                          \
      FN<__half, float>(__VA_ARGS__);                                                        \
      break;                                                                                 \
    case at::kBFloat16:                                                                      \
      FN<__nv_bfloat16, float>(__VA_ARGS__);                                                 \
      break;                                                                                 \
    default:                                                                                 \
      TORCH_CHECK_TYPE(false,                                                                \
                       "fastgpt attention on CUDA supports fp16, bf16, fp32 and fp64, got ", \
                       dtype, ".");                                                          \
  }

template <typename T, typename A>
Params<T, A> params_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                       double scale) {
  Params<T, A> p{};
  p.q = view_of<T>(q);
  p.k = view_of<T>(k);
  p.v = view_of<T>(v);
  p.B = q.size(0), p.H = q.size(1), p.Hkv = k.size(1), p.Tq = q.size(2), p.Tk = k.size(2);
  p.D = q.size(3);
  p.causal = causal;
  p.scale = static_cast<A>(scale);
  return p;
}

template <typename T, typename A>
void run_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                 at::Tensor& lse, bool causal, double scale) {
  auto p = params_of<T, A>(q, k, v, causal, scale);
  p.o = ptr<T>(out);
  p.lse = ptr<A>(lse);
  check_launch(attention_forward<T, A>(p, c10::cuda::getCurrentCUDAStream()), "forward");
}

template <typename T, typename A>
void run_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                  at::Tensor& delta, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, bool causal,
                  double scale) {
  auto p = params_of<T, A>(q, k, v, causal, scale);
  p.dout = view_of<T>(dout);
  p.out = view_of<T>(out);
  p.lse = ptr<A>(lse);
  p.delta = ptr<A>(delta);
  p.dq = ptr<T>(dq);
  p.dk = ptr<T>(dk);
  p.dv = ptr<T>(dv);
  check_launch(attention_backward<T, A>(p, c10::cuda::getCurrentCUDAStream()), "backward");
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q_,
                                                          const at::Tensor& k_,
                                                          const at::Tensor& v_, bool causal,
                                                          double scale) {
  check_qkv(q_, k_, v_);
  const c10::cuda::CUDAGuard guard(q_.device());
  const auto q = rows_usable(q_), k = rows_usable(k_), v = rows_usable(v_);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3);
  auto out = at::empty({B, H, Tq, D}, q.options());                  // (B, H, Tq, D)
  auto lse = at::empty({B, H, Tq}, q.options().dtype(lse_type(q)));  // (B, H, Tq)
  if (out.numel() == 0) return {out, lse};
  DISPATCH(q.scalar_type(), run_forward, q, k, v, out, lse, causal, scale);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, bool causal, double scale) {
  check_qkv(q_, k_, v_);
  check_backward(grad_out_, q_, out_, lse_);
  const c10::cuda::CUDAGuard guard(q_.device());
  const auto q = rows_usable(q_), k = rows_usable(k_), v = rows_usable(v_);
  const auto dout = rows_usable(grad_out_), out = rows_usable(out_), lse = lse_.contiguous();
  auto dq = at::empty(q.sizes(), q.options());  // (B, H, Tq, D)
  auto dk = at::empty(k.sizes(), k.options());  // (B, Hkv, Tk, D)
  auto dv = at::empty(v.sizes(), v.options());  // (B, Hkv, Tk, D)
  if (dq.numel() == 0 || dk.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  auto delta = at::empty(lse.sizes(), lse.options());  // (B, H, Tq)
  DISPATCH(q.scalar_type(), run_backward, dout, q, k, v, out, lse, delta, dq, dk, dv, causal,
           scale);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace fastgpt::cuda

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("cpp_attention_forward", &fastgpt::cuda::attention_forward_cuda);
  m.impl("cpp_attention_backward", &fastgpt::cuda::attention_backward_cuda);
}
