"""torch.library fake implementation of the C++ KV-cache op, so torch.compile can trace it.

    fastgpt::cpp_attention_kvcache(q, k_cache, v_cache, seqlens_k, block_table, causal, scale)
        -> out

q, out: (B, Tq, H, D); k_cache, v_cache: (B, Tmax, Hkv, D), or paged (num_blocks, page_size, Hkv,
D) with block_table (B, max_blocks) int32; seqlens_k (B,) int32. The op is defined by the
extension (csrc/attention.cpp, csrc/cpu/kvcache_cpu.cpp); it is forward only (no autograd).
"""

import torch
from torch import Tensor

from fastgpt import _extension


def _kvcache_fake(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor,
    block_table: Tensor | None,
    causal: bool,
    scale: float,
) -> Tensor:
    torch._check(q.dim() == 4 and k_cache.dim() == 4, lambda: "q and the caches must be 4-d")
    return q.new_empty(q.shape)  # (B, Tq, H, D), contiguous, q's dtype


if _extension.cpp_available():
    torch.library.register_fake("fastgpt::cpp_attention_kvcache")(_kvcache_fake)
