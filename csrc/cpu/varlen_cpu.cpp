// The packed variable-length CPU ops: q (total_q, H, D), k, v (total_k, Hkv, D), sequence b
// at rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] of q (and cu_seqlens_k's of k, v).
//
// The kernel is flash_cpu.h's, shared with the dense ops of attention_cpu.cpp: here the batch
// stride is 0 and each sequence starts at its cu_seqlens row. No padding is materialised;
// tasks are (sequence, head, block), sequences heaviest first. max_seqlen_q/k only size GPU
// grids; the CPU kernel reads the lengths from cu_seqlens. lse is (H, total_q).
//
// The backward runs on head-major copies ((total, H, D) views of (H, total, D) buffers), as the
// dense kernel's (B, H, T, D): each head's rows D apart instead of H * D apart. On the packed
// layout itself it measured 19 % slower than the dense op on the same sequences (H=8, D=64,
// T=2048, 2 threads, under load), with the copies 9-14 %. The forward reads the packed layout:
// there the copies (q, k, v in, out back) cost more than they saved (14 % -> 23 % over dense).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "ops_cpu.h"

namespace fastgpt::cpu {
namespace {

// Packed (total, H, D) tensors (rows of D values) and (H, total) ones (lse, delta) as Rows:
// batch stride 0, the rows of sequence b start at its cu_seqlens value.
struct PackedLayout {
  template <typename T>
  static Rows<T*> rows(const at::Tensor& t) {
    if (t.dim() == 2) return {t.data_ptr<T>(), 0, t.stride(0), t.stride(1)};
    return {t.data_ptr<T>(), 0, t.stride(1), row_stride(t, 0)};
  }
};

// A packed t in the compute type with rows the kernel can read (rows_usable, rows at dim 0).
at::Tensor packed_usable(const at::Tensor& t, at::ScalarType ct) {
  return rows_usable(t.to(ct), 0);
}

// t in the compute type, head-major: each head's rows D apart (no copy when they already are).
at::Tensor head_major(const at::Tensor& t, at::ScalarType ct) {
  auto x = t.to(ct);
  if (x.stride(2) == 1 && (x.size(0) <= 1 || x.stride(0) == x.size(2))) return x;
  return x.transpose(0, 1).contiguous().transpose(0, 1);  // (total, H, D)
}

// A zeroed (or uninitialised) head-major (total, heads, D) buffer.
at::Tensor new_head_major(int64_t total, int64_t heads, int64_t D, const at::Tensor& like,
                          bool zero) {
  auto buf = at::empty({heads, total, D}, like.options());  // (heads, total, D)
  if (zero) buf.zero_();
  return buf.transpose(0, 1);  // (total, heads, D)
}

// A kernel result in dtype dt, laid out as the ops promise: contiguous (total, H, D).
at::Tensor result(const at::Tensor& t, at::ScalarType dt) {
  if (t.is_contiguous() && t.scalar_type() == dt) return t;  // one head: already (total, 1, D)
  return at::empty(t.sizes(), t.options().dtype(dt)).copy_(t);
}

// Checks q, k, v and cu_seqlens; the cu_seqlens as contiguous tensors the batch points into.
std::tuple<at::Tensor, at::Tensor> checked_cu(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v, const at::Tensor& cu_q_,
                                              const at::Tensor& cu_k_) {
  check_varlen(q, k, v, cu_q_, cu_k_);
  auto cu_q = cu_q_.contiguous(), cu_k = cu_k_.contiguous();
  check_cu_seqlens(cu_q, q.size(0), "cu_seqlens_q");
  check_cu_seqlens(cu_k, k.size(0), "cu_seqlens_k");
  return {cu_q, cu_k};
}

Batch packed_batch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_q,
                   const at::Tensor& cu_k, bool causal, const Variants& var) {
  Batch batch{cu_q.numel() - 1, q.size(1), k.size(1), q.size(2), causal};
  batch.cu_q = cu_q.data_ptr<int32_t>(), batch.cu_k = cu_k.data_ptr<int32_t>();
  set_window(batch, var);
  return batch;
}

std::tuple<at::Tensor, at::Tensor> varlen_forward_cpu(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double scale, at::OptionalIntArrayRef window,
    double softcap, const std::optional<at::Tensor>& sinks) {
  const auto [cu_q, cu_k] = checked_cu(q_, k_, v_, cu_seqlens_q, cu_seqlens_k);
  const auto [ct, var] = op_setup(q_, window, softcap, sinks);
  const auto q = packed_usable(q_, ct), k = packed_usable(k_, ct), v = packed_usable(v_, ct);
  const Batch batch = packed_batch(q, k, cu_q, cu_k, causal, var);
  const int64_t total_q = q.size(0);
  auto out = at::empty({total_q, batch.H, batch.D}, q.options());  // (total_q, H, D)
  auto lse = at::empty({batch.H, total_q}, q.options());           // (H, total_q)
  if (out.numel() > 0) run_forward<PackedLayout>(batch, scale, var, q, k, v, out, lse);
  return {out.to(q_.scalar_type()), lse};
}

// dq, dk, dv and d sinks: (H,) in the compute type, (0,) without sinks.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_backward_cpu(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
    double scale, at::OptionalIntArrayRef window, double softcap,
    const std::optional<at::Tensor>& sinks) {
  const auto [cu_q, cu_k] = checked_cu(q_, k_, v_, cu_seqlens_q, cu_seqlens_k);
  check_varlen_backward(grad_out_, q_, out_, lse_);
  const auto [ct, var] = op_setup(q_, window, softcap, sinks);
  const auto q = head_major(q_, ct), k = head_major(k_, ct);
  const Batch batch = packed_batch(q, k, cu_q, cu_k, causal, var);
  const int64_t total_q = q.size(0), total_k = k.size(0), H = batch.H, Hkv = batch.Hkv;
  const BackwardTensors t{head_major(grad_out_, ct),
                          q,
                          k,
                          head_major(v_, ct),
                          head_major(out_, ct),
                          lse_.contiguous(),
                          at::empty({H, total_q}, q.options()),  // delta (H, total_q)
                          new_head_major(total_q, H, batch.D, q, true),  // dq (total_q, H, D)
                          new_head_major(total_k, Hkv, batch.D, q, true),  // dk (total_k, Hkv, D)
                          new_head_major(total_k, Hkv, batch.D, q, true),  // dv (total_k, Hkv, D)
                          sink_parts(var, batch.B, H, q)};
  if (t.dq.numel() > 0 && t.dk.numel() > 0) run_backward<PackedLayout>(batch, scale, var, t);
  const auto dt = q_.scalar_type();
  return {result(t.dq, dt), result(t.dk, dt), result(t.dv, dt), sink_grad(t.dsinks, q)};
}

}  // namespace
}  // namespace fastgpt::cpu

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("cpp_attention_varlen_forward", &fastgpt::cpu::varlen_forward_cpu);
  m.impl("cpp_attention_varlen_backward", &fastgpt::cpu::varlen_backward_cpu);
}
