// The dense CPU ops: q (B, H, Tq, D), k, v (B, Hkv, Tk, D), B sequences of one length.
//
// The kernel is flash_cpu.h's, shared with the packed (varlen) ops of varlen_cpu.cpp: here the
// batch dim indexes the sequences. fp32 and fp64 run natively; fp16/bf16 inputs are computed
// in fp32.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "ops_cpu.h"

namespace fastgpt::cpu {
namespace {

// (B, H, T, D) tensors (rows of D values) and (B, H, T) ones (lse, delta) as Rows.
struct DenseLayout {
  template <typename T>
  static Rows<T*> rows(const at::Tensor& t) {
    const int64_t st = t.dim() == 4 ? row_stride(t) : t.stride(2);
    return {t.data_ptr<T>(), t.stride(0), t.stride(1), st};
  }
};

Batch dense_batch(const at::Tensor& q, const at::Tensor& k, bool causal, const Variants& var) {
  Batch batch{q.size(0), q.size(1), k.size(1), q.size(3), causal};
  batch.Tq = q.size(2), batch.Tk = k.size(2);
  set_window(batch, var);
  return batch;
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, bool causal, double scale,
    at::OptionalIntArrayRef window, double softcap, const std::optional<at::Tensor>& sinks) {
  check_qkv(q_, k_, v_);
  const auto [ct, var] = op_setup(q_, window, softcap, sinks);
  const auto q = prepare(q_, ct), k = prepare(k_, ct), v = prepare(v_, ct);
  const Batch batch = dense_batch(q, k, causal, var);
  auto out = at::empty({batch.B, batch.H, batch.Tq, batch.D}, q.options());  // (B, H, Tq, D)
  auto lse = at::empty({batch.B, batch.H, batch.Tq}, q.options());           // (B, H, Tq)
  if (out.numel() > 0) run_forward<DenseLayout>(batch, scale, var, q, k, v, out, lse);
  return {out.to(q_.scalar_type()), lse};
}

// dq, dk, dv and d sinks: (H,) in the compute type, (0,) without sinks.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, bool causal, double scale,
    at::OptionalIntArrayRef window, double softcap, const std::optional<at::Tensor>& sinks) {
  check_qkv(q_, k_, v_);
  check_backward(grad_out_, q_, out_, lse_);
  const auto [ct, var] = op_setup(q_, window, softcap, sinks);
  const auto q = prepare(q_, ct), k = prepare(k_, ct);
  const Batch batch = dense_batch(q, k, causal, var);
  // dq, dk, dv are accumulated into, so zeroed (empty + zero_: one allocation each, as the
  // profiler sees it).
  const BackwardTensors t{prepare(grad_out_, ct),
                          q,
                          k,
                          prepare(v_, ct),
                          prepare(out_, ct),
                          lse_.contiguous(),
                          at::empty({batch.B, batch.H, batch.Tq}, q.options()),  // delta
                          at::empty(q.sizes(), q.options()).zero_(),  // dq (B, H, Tq, D)
                          at::empty(k.sizes(), q.options()).zero_(),  // dk (B, Hkv, Tk, D)
                          at::empty(k.sizes(), q.options()).zero_(),  // dv (B, Hkv, Tk, D)
                          sink_parts(var, batch.B, batch.H, q)};
  if (t.dq.numel() > 0 && t.dk.numel() > 0) run_backward<DenseLayout>(batch, scale, var, t);
  const auto dt = q_.scalar_type();
  return {t.dq.to(dt), t.dk.to(dt), t.dv.to(dt), sink_grad(t.dsinks, q)};
}

}  // namespace
}  // namespace fastgpt::cpu

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("cpp_attention_forward", &fastgpt::cpu::attention_forward_cpu);
  m.impl("cpp_attention_backward", &fastgpt::cpu::attention_backward_cpu);
}
