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
#include "flash_cpu.h"
#include "variants.h"

namespace fastgpt::cpu {
namespace {

// A packed (total, H, D) tensor (rows of D values) or an (H, total) one (lse, delta) as Rows:
// batch stride 0, the rows of sequence b start at its cu_seqlens value.
template <typename T>
Rows<T*> packed_rows(const at::Tensor& t) {
  if (t.dim() == 2) return {t.data_ptr<T>(), 0, t.stride(0), t.stride(1)};
  return {t.data_ptr<T>(), 0, t.stride(1), row_stride(t, 0)};
}

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

template <typename T>
Rows<const T*> in(const at::Tensor& t) {
  const Rows<T*> r = packed_rows<T>(t);
  return {r.p, r.sb, r.sh, r.st};
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

std::tuple<at::Tensor, at::Tensor> varlen_forward_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                                      const at::Tensor& v_,
                                                      const at::Tensor& cu_seqlens_q,
                                                      const at::Tensor& cu_seqlens_k,
                                                      int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                      bool causal, double scale,
                                                      at::OptionalIntArrayRef window,
                                                      double softcap,
                                                      const std::optional<at::Tensor>& sinks) {
  const auto [cu_q, cu_k] = checked_cu(q_, k_, v_, cu_seqlens_q, cu_seqlens_k);
  const auto ct = compute_type(q_);
  const Variants var = read_variants(window, softcap, sinks, q_.size(1), q_, ct);
  const auto q = packed_usable(q_, ct), k = packed_usable(k_, ct), v = packed_usable(v_, ct);
  const Batch batch = packed_batch(q, k, cu_q, cu_k, causal, var);
  const int64_t total_q = q.size(0);
  auto out = at::empty({total_q, batch.H, batch.D}, q.options());  // (total_q, H, D)
  auto lse = at::empty({batch.H, total_q}, q.options());           // (H, total_q)
  if (out.numel() > 0) {
    if (ct == at::kDouble) {
      const ForwardIO<double> io{in<double>(q),
                                 in<double>(k),
                                 in<double>(v),
                                 packed_rows<double>(out),
                                 packed_rows<double>(lse),
                                 var.softcap,
                                 sinks_ptr<double>(var)};
      forward_kernel<double>(batch, scale, io);
    } else {
      const ForwardIO<float> io{in<float>(q),
                                in<float>(k),
                                in<float>(v),
                                packed_rows<float>(out),
                                packed_rows<float>(lse),
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
  auto delta = at::empty({batch.H, q.size(0)}, q.options());  // (H, total_q)
  const Grads<T> g{in<T>(q),
                   in<T>(k),
                   in<T>(v),
                   in<T>(dout),
                   in<T>(out),
                   in<T>(lse),
                   packed_rows<T>(delta),
                   packed_rows<T>(dq),
                   packed_rows<T>(dk),
                   packed_rows<T>(dv),
                   static_cast<T>(var.softcap),
                   sinks_ptr<T>(var),
                   dsinks.defined() ? dsinks.data_ptr<T>() : nullptr};
  backward_kernel<T>(batch, scale, g);
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
  const auto ct = compute_type(q_);
  const Variants var = read_variants(window, softcap, sinks, q_.size(1), q_, ct);
  const auto q = head_major(q_, ct), k = head_major(k_, ct), v = head_major(v_, ct);
  const auto dout = head_major(grad_out_, ct), out = head_major(out_, ct);
  const auto lse = lse_.contiguous();
  const Batch batch = packed_batch(q, k, cu_q, cu_k, causal, var);
  // (B, H): each sequence's part of d sinks, summed below (deterministic, no shared writes)
  auto dsinks_bh = var.sinks.defined() ? at::zeros({batch.B, batch.H}, q.options()) : at::Tensor();
  // Accumulated into, so zeroed.
  auto dq = new_head_major(q.size(0), batch.H, batch.D, q, true);    // (total_q, H, D)
  auto dk = new_head_major(k.size(0), batch.Hkv, batch.D, q, true);  // (total_k, Hkv, D)
  auto dv = new_head_major(k.size(0), batch.Hkv, batch.D, q, true);  // (total_k, Hkv, D)
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
  return {result(dq, dt), result(dk, dt), result(dv, dt), dsinks};
}

}  // namespace
}  // namespace fastgpt::cpu

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("cpp_attention_varlen_forward", &fastgpt::cpu::varlen_forward_cpu);
  m.impl("cpp_attention_varlen_backward", &fastgpt::cpu::varlen_backward_cpu);
}
