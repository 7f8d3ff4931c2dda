// The dense CPU ops: q (B, H, Tq, D), k, v (B, Hkv, Tk, D), B sequences of one length.
//
// The kernel is flash_cpu.h's, shared with the packed (varlen) ops of varlen_cpu.cpp: here the
// batch dim indexes the sequences. fp32 and fp64 run natively; fp16/bf16 inputs are computed
// in fp32.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "flash_cpu.h"
#include "variants.h"

namespace fastgpt::cpu {
namespace {

// A (B, H, T, D) tensor (rows of D values) or a (B, H, T) one (lse, delta) as Rows.
template <typename T>
Rows<T*> dense_rows(const at::Tensor& t) {
  const int64_t st = t.dim() == 4 ? row_stride(t) : t.stride(2);
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), st};
}

template <typename T>
Rows<const T*> in(const at::Tensor& t) {
  const Rows<T*> r = dense_rows<T>(t);
  return {r.p, r.sb, r.sh, r.st};
}

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
  const auto ct = compute_type(q_);
  const Variants var = read_variants(window, softcap, sinks, q_.size(1), q_, ct);
  const auto q = prepare(q_, ct), k = prepare(k_, ct), v = prepare(v_, ct);
  const Batch batch = dense_batch(q, k, causal, var);
  auto out = at::empty({batch.B, batch.H, batch.Tq, batch.D}, q.options());  // (B, H, Tq, D)
  auto lse = at::empty({batch.B, batch.H, batch.Tq}, q.options());           // (B, H, Tq)
  if (out.numel() > 0) {
    if (ct == at::kDouble) {
      const ForwardIO<double> io{in<double>(q),          in<double>(k),         in<double>(v),
                                 dense_rows<double>(out), dense_rows<double>(lse), var.softcap,
                                 sinks_ptr<double>(var)};
      forward_kernel<double>(batch, scale, io);
    } else {
      const ForwardIO<float> io{in<float>(q),
                                in<float>(k),
                                in<float>(v),
                                dense_rows<float>(out),
                                dense_rows<float>(lse),
                                static_cast<float>(var.softcap),
                                sinks_ptr<float>(var)};
      forward_kernel<float>(batch, static_cast<float>(scale), io);
    }
  }
  return {out.to(q_.scalar_type()), lse};
}

template <typename T>
void run_backward(const Batch& batch, T scale, const at::Tensor& dout, const at::Tensor& q,
                  const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                  const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
                  const at::Tensor& dv, const Variants& var, const at::Tensor& dsinks) {
  auto delta = at::empty({batch.B, batch.H, batch.Tq}, q.options());  // (B, H, Tq)
  const Grads<T> g{in<T>(q),
                   in<T>(k),
                   in<T>(v),
                   in<T>(dout),
                   in<T>(out),
                   in<T>(lse),
                   dense_rows<T>(delta),
                   dense_rows<T>(dq),
                   dense_rows<T>(dk),
                   dense_rows<T>(dv),
                   static_cast<T>(var.softcap),
                   sinks_ptr<T>(var),
                   dsinks.defined() ? dsinks.data_ptr<T>() : nullptr};
  backward_kernel<T>(batch, scale, g);
}

// dq, dk, dv and d sinks: (H,) in the compute type, (0,) without sinks.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, bool causal, double scale,
    at::OptionalIntArrayRef window, double softcap, const std::optional<at::Tensor>& sinks) {
  check_qkv(q_, k_, v_);
  check_backward(grad_out_, q_, out_, lse_);
  const auto ct = compute_type(q_);
  const Variants var = read_variants(window, softcap, sinks, q_.size(1), q_, ct);
  const auto q = prepare(q_, ct), k = prepare(k_, ct), v = prepare(v_, ct);
  const auto dout = prepare(grad_out_, ct), out = prepare(out_, ct);
  const auto lse = lse_.contiguous();
  const Batch batch = dense_batch(q, k, causal, var);
  // (B, H): each sequence's part of d sinks, summed below (deterministic, no shared writes)
  auto dsinks_bh = var.sinks.defined() ? at::zeros({batch.B, batch.H}, q.options()) : at::Tensor();
  // Accumulated into, so zeroed (empty + zero_: one allocation each, as the profiler sees it).
  auto dq = at::empty(q.sizes(), q.options()).zero_();  // (B, H, Tq, D)
  auto dk = at::empty(k.sizes(), q.options()).zero_();  // (B, Hkv, Tk, D)
  auto dv = at::empty(k.sizes(), q.options()).zero_();  // (B, Hkv, Tk, D)
  if (dq.numel() > 0 && dk.numel() > 0) {
    if (ct == at::kDouble) {
      run_backward<double>(batch, scale, dout, q, k, v, out, lse, dq, dk, dv, var, dsinks_bh);
    } else {
      run_backward<float>(batch, static_cast<float>(scale), dout, q, k, v, out, lse, dq, dk, dv,
                          var, dsinks_bh);
    }
  }
  const auto dt = q_.scalar_type();
  auto dsinks = dsinks_bh.defined() ? dsinks_bh.sum(0) : at::empty({0}, q.options());  // (H,)
  return {dq.to(dt), dk.to(dt), dv.to(dt), dsinks};
}

}  // namespace
}  // namespace fastgpt::cpu

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("cpp_attention_forward", &fastgpt::cpu::attention_forward_cpu);
  m.impl("cpp_attention_backward", &fastgpt::cpu::attention_backward_cpu);
}
