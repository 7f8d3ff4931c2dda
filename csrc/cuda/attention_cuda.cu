// torch glue for the CUDA kernels in attention_kernels.cuh: checks, allocation, launch, for
// dense (B, H, T, D) tensors and packed (total, H, D) sequences with cu_seqlens (varlen), with
// the attention variants (window, softcap, sinks) read and checked as the CPU ops read them.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../checks.h"
#include "../cpu/variants.h"
#include "attention_kernels.cuh"

namespace fastgpt::cuda {
namespace {

using cpu::read_variants;
using cpu::Variants;

// A dense (B, H, T, D) or (B, H, T) tensor, or a packed (total, H, D) or (H, total) one (batch
// stride 0), as a View of element type T.
template <typename T>
View<T> view_of(const at::Tensor& t, bool packed) {
  T* p = reinterpret_cast<T*>(t.data_ptr());
  if (!packed) return {p, t.stride(0), t.stride(1), t.stride(2)};
  if (t.dim() == 2) return {p, 0, t.stride(0), t.stride(1)};
  return {p, 0, t.stride(1), t.stride(0)};
}

// The sequences of a call: dense (cu_q == nullptr) or packed.
struct Seqs {
  const at::Tensor* cu_q = nullptr;  // int32 (B + 1,) on the device
  const at::Tensor* cu_k = nullptr;
  int64_t max_q = 0, max_k = 0;
  bool packed() const { return cu_q != nullptr; }
};

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
Params<T, A> params_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const Seqs& seqs, bool causal, double scale, const Variants& var) {
  Params<T, A> p{};
  const bool packed = seqs.packed();
  p.q = view_of<const T>(q, packed);
  p.k = view_of<const T>(k, packed);
  p.v = view_of<const T>(v, packed);
  if (packed) {
    p.cu_q = seqs.cu_q->data_ptr<int32_t>(), p.cu_k = seqs.cu_k->data_ptr<int32_t>();
    p.B = seqs.cu_q->numel() - 1, p.H = q.size(1), p.Hkv = k.size(1), p.D = q.size(2);
    p.Tq = seqs.max_q, p.Tk = seqs.max_k;
  } else {
    p.B = q.size(0), p.H = q.size(1), p.Hkv = k.size(1), p.Tq = q.size(2), p.Tk = k.size(2);
    p.D = q.size(3);
  }
  p.causal = causal;
  p.scale = static_cast<A>(scale);
  p.left = var.left, p.right = var.right;
  p.softcap = static_cast<A>(var.softcap);
  p.sinks = var.sinks.defined() ? var.sinks.data_ptr<A>() : nullptr;  // (H,) in A (lse_type)
  return p;
}

template <typename T, typename A>
void run_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                 at::Tensor& lse, const Seqs& seqs, bool causal, double scale,
                 const Variants& var) {
  auto p = params_of<T, A>(q, k, v, seqs, causal, scale, var);
  p.o = view_of<T>(out, seqs.packed());
  p.lse = view_of<A>(lse, seqs.packed());
  check_launch(attention_forward<T, A>(p, c10::cuda::getCurrentCUDAStream()), "forward");
}

template <typename T, typename A>
void run_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                  at::Tensor& delta, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                  at::Tensor& dsinks, const Seqs& seqs, bool causal, double scale,
                  const Variants& var) {
  const bool packed = seqs.packed();
  auto p = params_of<T, A>(q, k, v, seqs, causal, scale, var);
  p.dout = view_of<const T>(dout, packed);
  p.out = view_of<const T>(out, packed);
  p.lse = view_of<A>(lse, packed);
  p.delta = view_of<A>(delta, packed);
  p.dq = view_of<T>(dq, packed);
  p.dk = view_of<T>(dk, packed);
  p.dv = view_of<T>(dv, packed);
  p.dsinks = dsinks.numel() > 0 ? dsinks.data_ptr<A>() : nullptr;
  check_launch(attention_backward<T, A>(p, c10::cuda::getCurrentCUDAStream()), "backward");
}

// The schema's trailing variant arguments, checked, with the sinks as (H,) in lse's dtype.
Variants variants_of(const at::Tensor& q, at::OptionalIntArrayRef window, double softcap,
                     const std::optional<at::Tensor>& sinks) {
  return read_variants(window, softcap, sinks, q.size(1), q, lse_type(q));
}

// The backward's dsinks output: (H,) in lse's dtype with sinks (zero until a kernel writes it),
// (0,) without.
at::Tensor dsinks_for(const at::Tensor& q, const Variants& var) {
  const auto options = q.options().dtype(lse_type(q));
  return var.sinks.defined() ? at::zeros({q.size(1)}, options) : at::empty({0}, options);
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, bool causal, double scale,
    at::OptionalIntArrayRef window, double softcap, const std::optional<at::Tensor>& sinks) {
  check_qkv(q_, k_, v_);
  const c10::cuda::CUDAGuard guard(q_.device());
  const Variants var = variants_of(q_, window, softcap, sinks);
  const auto q = rows_usable(q_), k = rows_usable(k_), v = rows_usable(v_);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3);
  auto out = at::empty({B, H, Tq, D}, q.options());                  // (B, H, Tq, D)
  auto lse = at::empty({B, H, Tq}, q.options().dtype(lse_type(q)));  // (B, H, Tq)
  if (out.numel() == 0) return {out, lse};
  DISPATCH(q.scalar_type(), run_forward, q, k, v, out, lse, Seqs{}, causal, scale, var);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, bool causal, double scale,
    at::OptionalIntArrayRef window, double softcap, const std::optional<at::Tensor>& sinks) {
  check_qkv(q_, k_, v_);
  check_backward(grad_out_, q_, out_, lse_);
  const c10::cuda::CUDAGuard guard(q_.device());
  const Variants var = variants_of(q_, window, softcap, sinks);
  auto dsinks = dsinks_for(q_, var);  // (H,) or (0,)
  const auto q = rows_usable(q_), k = rows_usable(k_), v = rows_usable(v_);
  const auto dout = rows_usable(grad_out_), out = rows_usable(out_), lse = lse_.contiguous();
  auto dq = at::empty(q.sizes(), q.options());  // (B, H, Tq, D)
  auto dk = at::empty(k.sizes(), k.options());  // (B, Hkv, Tk, D)
  auto dv = at::empty(v.sizes(), v.options());  // (B, Hkv, Tk, D)
  // No query or no key: every gradient is 0 (out = 0, so delta and dsinks are too).
  if (dq.numel() == 0 || dk.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_(), dsinks};
  auto delta = at::empty(lse.sizes(), lse.options());  // (B, H, Tq)
  DISPATCH(q.scalar_type(), run_backward, dout, q, k, v, out, lse, delta, dq, dk, dv, dsinks,
           Seqs{}, causal, scale, var);
  return {dq, dk, dv, dsinks};
}

// ------------------------------------------------------------ packed sequences (varlen)

// The cu_seqlens values are not read on the host (that would synchronise): fastgpt.varlen
// validates them, and grids span max_seqlen_q / max_seqlen_k, which must bound every length.
void check_max_seqlens(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_q,
                       int64_t max_q, int64_t max_k) {
  const bool q_ok = q.size(0) == 0 || (max_q > 0 && cu_q.numel() > 1);
  TORCH_CHECK_VALUE(q_ok && (k.size(0) == 0 || max_k > 0),
                    "fastgpt varlen attention expects max_seqlen_q and max_seqlen_k >= the longest "
                    "sequence, got ",
                    max_q, " and ", max_k, " for q ", q.sizes(), " and k ", k.sizes(), ".");
}
std::tuple<at::Tensor, at::Tensor> varlen_forward_cuda(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& cu_q_,
    const at::Tensor& cu_k_, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
    double scale, at::OptionalIntArrayRef window, double softcap,
    const std::optional<at::Tensor>& sinks) {
  check_varlen(q_, k_, v_, cu_q_, cu_k_);
  check_max_seqlens(q_, k_, cu_q_, max_seqlen_q, max_seqlen_k);
  const c10::cuda::CUDAGuard guard(q_.device());
  const Variants var = variants_of(q_, window, softcap, sinks);
  const auto q = rows_usable(q_, 0), k = rows_usable(k_, 0), v = rows_usable(v_, 0);
  const auto cu_q = cu_q_.contiguous(), cu_k = cu_k_.contiguous();
  const int64_t total_q = q.size(0), H = q.size(1), D = q.size(2);
  auto out = at::empty({total_q, H, D}, q.options());                  // (total_q, H, D)
  auto lse = at::empty({H, total_q}, q.options().dtype(lse_type(q)));  // (H, total_q)
  if (out.numel() == 0) return {out, lse};
  const Seqs seqs{&cu_q, &cu_k, max_seqlen_q, max_seqlen_k};
  DISPATCH(q.scalar_type(), run_forward, q, k, v, out, lse, seqs, causal, scale, var);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_backward_cuda(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, const at::Tensor& cu_q_,
    const at::Tensor& cu_k_, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
    double scale, at::OptionalIntArrayRef window, double softcap,
    const std::optional<at::Tensor>& sinks) {
  check_varlen(q_, k_, v_, cu_q_, cu_k_);
  check_varlen_backward(grad_out_, q_, out_, lse_);
  check_max_seqlens(q_, k_, cu_q_, max_seqlen_q, max_seqlen_k);
  const c10::cuda::CUDAGuard guard(q_.device());
  const Variants var = variants_of(q_, window, softcap, sinks);
  auto dsinks = dsinks_for(q_, var);  // (H,) or (0,)
  const auto q = rows_usable(q_, 0), k = rows_usable(k_, 0), v = rows_usable(v_, 0);
  const auto dout = rows_usable(grad_out_, 0), out = rows_usable(out_, 0);
  const auto lse = lse_.contiguous(), cu_q = cu_q_.contiguous(), cu_k = cu_k_.contiguous();
  auto dq = at::empty(q.sizes(), q.options());  // (total_q, H, D)
  auto dk = at::empty(k.sizes(), k.options());  // (total_k, Hkv, D)
  auto dv = at::empty(v.sizes(), v.options());  // (total_k, Hkv, D)
  // No query or no key: every gradient is 0 (out = 0, so delta and dsinks are too).
  if (dq.numel() == 0 || dk.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_(), dsinks};
  auto delta = at::empty(lse.sizes(), lse.options());  // (H, total_q)
  const Seqs seqs{&cu_q, &cu_k, max_seqlen_q, max_seqlen_k};
  DISPATCH(q.scalar_type(), run_backward, dout, q, k, v, out, lse, delta, dq, dk, dv, dsinks,
           seqs, causal, scale, var);
  return {dq, dk, dv, dsinks};
}

}  // namespace
}  // namespace fastgpt::cuda

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("cpp_attention_forward", &fastgpt::cuda::attention_forward_cuda);
  m.impl("cpp_attention_backward", &fastgpt::cuda::attention_backward_cuda);
  m.impl("cpp_attention_varlen_forward", &fastgpt::cuda::varlen_forward_cuda);
  m.impl("cpp_attention_varlen_backward", &fastgpt::cuda::varlen_backward_cuda);
}
