// Operator schemas of the fastgpt C++ extension, declared once.
//
// The CPU implementations live in cpu/attention_cpu.cpp (dense) and cpu/varlen_cpu.cpp
// (packed sequences), both on the kernel of cpu/flash_cpu.h; the CUDA one in
// cuda/attention_cuda.cu; each attaches itself with TORCH_LIBRARY_IMPL.
// fastgpt/ops.py (dense) and fastgpt/varlen_ops.py (varlen) add the fake (meta)
// implementations and autograd.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastgpt, m) {
  // q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) -> out: (B, H, Tq, D), lse: (B, H, Tq).
  // Variants (flash-attn's): window [left, right] (-1 unbounded), softcap (0: off), sinks (H,).
  m.def(
      "cpp_attention_forward(Tensor q, Tensor k, Tensor v, bool causal, float scale,"
      " int[]? window=None, float softcap=0.0, Tensor? sinks=None) -> (Tensor out, Tensor lse)");
  // q: (B, Tq, H, D); caches (B, Tmax, Hkv, D) or paged (blocks, page, Hkv, D) -> (B, Tq, H, D)
  m.def(
      "cpp_attention_kvcache(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens_k,"
      " Tensor? block_table, bool causal, float scale, int[]? window=None, float softcap=0.0,"
      " Tensor? sinks=None) -> Tensor");
  // -> dq: (B, H, Tq, D), dk, dv: (B, Hkv, Tk, D), dsinks: (H,) fp32 (fp64 for fp64), (0,)
  // without sinks
  m.def(
      "cpp_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out,"
      " Tensor lse, bool causal, float scale, int[]? window=None, float softcap=0.0,"
      " Tensor? sinks=None) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dsinks)");
  // Packed sequences (cu_seqlens: int32 (B + 1,)): q: (total_q, H, D); k, v: (total_k, Hkv, D)
  // -> out: (total_q, H, D), lse: (H, total_q)
  m.def(
      "cpp_attention_varlen_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q,"
      " Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, float scale,"
      " int[]? window=None, float softcap=0.0, Tensor? sinks=None) -> (Tensor out, Tensor lse)");
  // -> dq: (total_q, H, D), dk, dv: (total_k, Hkv, D), dsinks: as the dense op's
  m.def(
      "cpp_attention_varlen_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out,"
      " Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q,"
      " int max_seqlen_k, bool causal, float scale, int[]? window=None, float softcap=0.0,"
      " Tensor? sinks=None) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dsinks)");
}

// `import fastgpt._C` needs a module init function; the module itself is empty
// because everything is reached through torch.ops.fastgpt.*.
static struct PyModuleDef fastgpt_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastgpt_c_module); }
