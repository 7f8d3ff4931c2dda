// Input checks shared by the CPU and CUDA implementations.
//
// The Python layer (fastgpt/attention.py) validates first; these checks keep a
// direct torch.ops.fastgpt.* call from crashing or silently computing garbage.
#pragma once

#include <ATen/ATen.h>

namespace fastgpt {

// Checks q: (B, H, Tq, D) and k, v: (B, Hkv, Tk, D) against each other.
inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                    "fastgpt attention expects 4-d q, k, v of shape (B, H, T, D), got q ",
                    q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), ".");
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                   "fastgpt attention expects q, k, v of one dtype, got ", q.scalar_type(), ", ",
                   k.scalar_type(), ", ", v.scalar_type(), ".");
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()),
                   "fastgpt attention expects floating-point q, k, v, got ", q.scalar_type(), ".");
  TORCH_CHECK_VALUE(q.device() == k.device() && q.device() == v.device(),
                    "fastgpt attention expects q, k, v on one device, got ", q.device(), ", ",
                    k.device(), ", ", v.device(), ".");
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(),
                    "fastgpt attention expects k and v of one shape, got k ", k.sizes(), " and v ",
                    v.sizes(), ".");
  TORCH_CHECK_VALUE(q.size(0) == k.size(0),
                    "fastgpt attention expects q and k with the same batch, got q ", q.sizes(),
                    " and k ", k.sizes(), ".");
  TORCH_CHECK_VALUE(q.size(3) == k.size(3),
                    "fastgpt attention expects q and k with the same head dim, got q ", q.sizes(),
                    " and k ", k.sizes(), ".");
  TORCH_CHECK_VALUE(q.size(3) >= 1 && q.size(3) <= 256,
                    "fastgpt attention supports head dims 1..256, got q ", q.sizes(), ".");
  TORCH_CHECK_VALUE(
      k.size(1) >= 1 && q.size(1) % k.size(1) == 0,
      "fastgpt attention expects the query heads to be a multiple of the key-value heads, "
      "got q ",
      q.sizes(), " and k ", k.sizes(), ".");
}

// Checks the extra backward inputs against q.
inline void check_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out,
                           const at::Tensor& lse) {
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
                    "fastgpt attention backward expects grad_out and out shaped like q ", q.sizes(),
                    ", got grad_out ", grad_out.sizes(), " and out ", out.sizes(), ".");
  TORCH_CHECK_TYPE(
      grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
      "fastgpt attention backward expects grad_out and out in q's dtype ", q.scalar_type(),
      ", got ", grad_out.scalar_type(), " and ", out.scalar_type(), ".");
  TORCH_CHECK_VALUE(
      grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
      "fastgpt attention backward expects all tensors on ", q.device(), ".");
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                        lse.size(2) == q.size(2),
                    "fastgpt attention backward expects lse of shape (B, H, Tq) for q ", q.sizes(),
                    ", got ", lse.sizes(), ".");
  const auto lse_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(lse.scalar_type() == lse_type, "fastgpt attention backward expects lse in ",
                   lse_type, " for ", q.scalar_type(), " inputs, got ", lse.scalar_type(), ".");
}

// The kernels read rows of a (B, H, T, D) tensor through a row stride: they need a unit
// stride on the last dim and rows that do not overlap; anything else is copied once.
inline at::Tensor rows_usable(const at::Tensor& t) {
  const bool last_ok = t.size(3) <= 1 || t.stride(3) == 1;
  const bool rows_ok = t.size(2) <= 1 || t.stride(2) >= t.size(3);
  return (last_ok && rows_ok) ? t : t.contiguous();
}

// Row stride to hand to BLAS: a tensor with a single row may carry any stride there.
inline int64_t row_stride(const at::Tensor& t) { return t.size(2) <= 1 ? t.size(3) : t.stride(2); }

}  // namespace fastgpt
