// What the dense ops (attention_cpu.cpp) and the packed ones (varlen_cpu.cpp) share around
// flash_cpu.h's kernels: the compute type and variants read once, the float / double dispatch,
// the kernels' arguments built from tensors, and d sinks. A Layout says how a tensor's rows are
// read: Layout::rows<T>(t) gives the Rows view of a q-like tensor (rows of D values) or an
// lse-like one (one value per row).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "flash_cpu.h"
#include "variants.h"

namespace fastgpt::cpu {

// The compute type of q (fp64 or fp32) and the checked variants: every op's first step.
struct OpSetup {
  at::ScalarType ct;
  Variants var;
};
inline OpSetup op_setup(const at::Tensor& q, at::OptionalIntArrayRef window, double softcap,
                        const std::optional<at::Tensor>& sinks) {
  const at::ScalarType ct = compute_type(q);
  return {ct, read_variants(window, softcap, sinks, q.size(1), q, ct)};  // q: (.., H, .., D)
}

// Calls f(T()) with T = double for an fp64 compute type, float otherwise.
template <typename F>
void dispatch_compute(at::ScalarType ct, const F& f) {
  if (ct == at::kDouble) {
    f(double());
  } else {
    f(float());
  }
}

template <typename T>
Rows<const T*> as_input(const Rows<T*>& r) {
  return {r.p, r.sb, r.sh, r.st};
}

// out and lse (allocated, in the compute type) of the batch from q, k, v (compute type).
template <typename Layout>
void run_forward(const Batch& batch, double scale, const Variants& var, const at::Tensor& q,
                 const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                 const at::Tensor& lse) {
  dispatch_compute(q.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    const auto in = [](const at::Tensor& t) { return as_input(Layout::template rows<T>(t)); };
    const ForwardIO<T> io{in(q),
                          in(k),
                          in(v),
                          Layout::template rows<T>(out),
                          Layout::template rows<T>(lse),
                          static_cast<T>(var.softcap),
                          sinks_ptr<T>(var)};
    forward_kernel<T>(batch, static_cast<T>(scale), io);
  });
}

// The backward's tensors, all in the compute type but lse (fp32, fp64 for fp64): inputs, delta
// (scratch in lse's layout), dq, dk, dv (zeroed, accumulated into) and dsinks (sink_parts).
struct BackwardTensors {
  at::Tensor dout, q, k, v, out, lse, delta, dq, dk, dv, dsinks;
};

template <typename Layout>
void run_backward(const Batch& batch, double scale, const Variants& var, const BackwardTensors& t) {
  dispatch_compute(t.q.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    const auto in = [](const at::Tensor& x) { return as_input(Layout::template rows<T>(x)); };
    const auto out = [](const at::Tensor& x) { return Layout::template rows<T>(x); };
    const Grads<T> g{in(t.q),
                     in(t.k),
                     in(t.v),
                     in(t.dout),
                     in(t.out),
                     in(t.lse),
                     out(t.delta),
                     out(t.dq),
                     out(t.dk),
                     out(t.dv),
                     static_cast<T>(var.softcap),
                     sinks_ptr<T>(var),
                     t.dsinks.defined() ? t.dsinks.data_ptr<T>() : nullptr};
    backward_kernel<T>(batch, static_cast<T>(scale), g);
  });
}

// (B, H) zeros for each sequence's part of d sinks (summed by sink_grad: deterministic, no
// shared writes), or undefined without sinks.
inline at::Tensor sink_parts(const Variants& var, int64_t B, int64_t H, const at::Tensor& like) {
  return var.sinks.defined() ? at::zeros({B, H}, like.options()) : at::Tensor();
}

// d sinks: (H,) in the compute type, (0,) without sinks.
inline at::Tensor sink_grad(const at::Tensor& parts, const at::Tensor& like) {
  return parts.defined() ? parts.sum(0) : at::empty({0}, like.options());
}

}  // namespace fastgpt::cpu
