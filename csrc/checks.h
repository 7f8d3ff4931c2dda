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

// The kernels read rows of a tensor through a row stride: rows at dim row_dim (2 for dense
// (B, H, T, D), 0 for packed (total, H, D)), D values each on the last dim. They need a unit
// stride on the last dim and rows that do not overlap; anything else is copied once.
inline at::Tensor rows_usable(const at::Tensor& t, int64_t row_dim = 2) {
  const int64_t last = t.dim() - 1;
  const bool last_ok = t.size(last) <= 1 || t.stride(last) == 1;
  const bool rows_ok = t.size(row_dim) <= 1 || t.stride(row_dim) >= t.size(last);
  return (last_ok && rows_ok) ? t : t.contiguous();
}

// Row stride to hand to BLAS: a tensor with a single row may carry any stride there.
inline int64_t row_stride(const at::Tensor& t, int64_t row_dim = 2) {
  return t.size(row_dim) <= 1 ? t.size(t.dim() - 1) : t.stride(row_dim);
}

// Checks packed q: (total_q, H, D), k, v: (total_k, Hkv, D) and cu_seqlens_q, cu_seqlens_k:
// int32 (B + 1,) on q's device. The values are checked by check_cu_seqlens (host memory).
inline void check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& cu_q, const at::Tensor& cu_k) {
  TORCH_CHECK_VALUE(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
                    "fastgpt varlen attention expects 3-d q (total_q, H, D) and k, v "
                    "(total_k, Hkv, D), got q ",
                    q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), ".");
  // The dense rules on (1, heads, total, D) views: dtypes, devices, shapes, head dims, GQA.
  check_qkv(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0));
  for (const auto* cu : {&cu_q, &cu_k}) {
    TORCH_CHECK_TYPE(cu->scalar_type() == at::kInt,
                     "fastgpt varlen attention expects int32 cu_seqlens, got ", cu->scalar_type(),
                     ".");
    TORCH_CHECK_VALUE(cu->dim() == 1 && cu->numel() >= 1 && cu->device() == q.device(),
                      "fastgpt varlen attention expects 1-d cu_seqlens (B + 1,) on ", q.device(),
                      ", got ", cu->sizes(), " on ", cu->device(), ".");
  }
  TORCH_CHECK_VALUE(cu_q.numel() == cu_k.numel(),
                    "fastgpt varlen attention expects cu_seqlens_q and cu_seqlens_k of one size, "
                    "got ",
                    cu_q.sizes(), " and ", cu_k.sizes(), ".");
}

// The values of one contiguous host cu_seqlens: from 0, non-decreasing, up to `total`.
inline void check_cu_seqlens(const at::Tensor& cu, int64_t total, const char* name) {
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n = cu.numel();
  bool ok = c[0] == 0 && c[n - 1] == total;
  for (int64_t i = 1; i < n && ok; ++i) ok = c[i] >= c[i - 1];
  TORCH_CHECK_VALUE(ok, "fastgpt varlen attention expects ", name,
                    " to run from 0 to the packed length ", total, " without decreasing, got ",
                    cu, ".");
}

// Checks the extra varlen backward inputs: grad_out and out like q, lse (H, total_q).
inline void check_varlen_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                  const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK_VALUE(lse.dim() == 2,
                    "fastgpt varlen attention backward expects lse of shape (H, total_q) for q ",
                    q.sizes(), ", got ", lse.sizes(), ".");
  // The dense rules on (1, H, total_q, D) and (1, H, total_q) views.
  const auto dense = [](const at::Tensor& t) { return t.transpose(0, 1).unsqueeze(0); };
  check_backward(dense(grad_out), dense(q), dense(out), lse.unsqueeze(0));
}

}  // namespace fastgpt
