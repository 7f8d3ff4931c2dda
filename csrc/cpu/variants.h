// The attention variants of the CPU ops (flash-attn's semantics): a sliding window (left, right),
// a logit softcap and per-head sinks, read from the ops' optional arguments and checked once.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastgpt::cpu {

struct Variants {
  int64_t left = -1, right = -1;  // window, -1: unbounded
  double softcap = 0.0;           // > 0: scores become softcap * tanh(s / softcap)
  at::Tensor sinks;               // (H,) in the compute type, or undefined
};

// window: None or [left, right] (ints >= -1); softcap >= 0; sinks: None or (H,) on q's device.
inline Variants read_variants(at::OptionalIntArrayRef window, double softcap,
                              const std::optional<at::Tensor>& sinks, int64_t H,
                              const at::Tensor& q, at::ScalarType ct) {
  Variants v;
  if (window.has_value()) {
    const auto w = *window;
    TORCH_CHECK_VALUE(w.size() == 2 && w[0] >= -1 && w[1] >= -1,
                      "fastgpt attention expects window = [left, right] with ints >= -1, got ", w,
                      ".");
    v.left = w[0], v.right = w[1];
  }
  TORCH_CHECK_VALUE(softcap >= 0.0, "fastgpt attention expects softcap >= 0, got ", softcap, ".");
  v.softcap = softcap;
  if (sinks.has_value() && sinks->defined()) {
    const at::Tensor& s = *sinks;
    TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == H && s.device() == q.device(),
                      "fastgpt attention expects sinks of shape (", H, ",) on ", q.device(),
                      ", got ", s.sizes(), " on ", s.device(), ".");
    TORCH_CHECK_TYPE(at::isFloatingType(s.scalar_type()),
                     "fastgpt attention expects floating-point sinks, got ", s.scalar_type(), ".");
    v.sinks = s.to(ct).contiguous();
  }
  return v;
}

// Puts the window into the batch (flash_cpu.h's Batch: every sequence shares it).
template <typename Batch>
void set_window(Batch& batch, const Variants& v) {
  batch.left = v.left, batch.right = v.right;
}

template <typename T>
const T* sinks_ptr(const Variants& v) {
  return v.sinks.defined() ? v.sinks.data_ptr<T>() : nullptr;
}

}  // namespace fastgpt::cpu
