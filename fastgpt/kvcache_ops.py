"""torch.library ops of the compiled KV-cache kernels, so torch.compile traces them as one node.

    fastgpt::triton_attention_kvcache(q, k_cache, v_cache, seqlens_k, block_table, causal, scale,
                                      window, softcap, sinks, max_seqlen_k)
    fastgpt::cpp_attention_kvcache(...)   (the same but max_seqlen_k; defined by the extension)
        -> out

max_seqlen_k (Triton only): an upper bound of seqlens_k the splits are sized from (None: the
cache's capacity); the lengths never leave the device.

q, out: (B, Tq, H, D); k_cache, v_cache: (B, Tmax, Hkv, D), or paged (num_blocks, page_size, Hkv,
D) with block_table (B, max_blocks) int32; seqlens_k (B,) int32 keys per sequence (new keys already
appended). Forward only (no autograd). The cpp op is defined by the extension (csrc/attention.cpp,
csrc/cpu/kvcache_cpu.cpp, CPU tensors only); the Triton one below, importing Triton only when run.
"""

import torch
from torch import Tensor

from fastgpt import _extension
from fastgpt.ops import kernel_variants


@torch.library.custom_op("fastgpt::triton_attention_kvcache", mutates_args=())
def triton_attention_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor,
    block_table: Tensor | None,
    causal: bool,
    scale: float,
    window: list[int] | None = None,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    max_seqlen_k: int | None = None,
) -> Tensor:
    from fastgpt.kernels.kvcache import kvcache_attention

    variants = kernel_variants(window, softcap, sinks)
    return kvcache_attention(
        q, k_cache, v_cache, seqlens_k, block_table, causal, scale, max_seqlen_k=max_seqlen_k,
        **variants,
    )  # fmt: skip


def cpp_has_kvcache() -> bool:
    """True when the C++ extension loads and defines fastgpt::cpp_attention_kvcache."""
    return _extension.cpp_available() and hasattr(torch.ops.fastgpt, "cpp_attention_kvcache")


def _kvcache_fake(q: Tensor, k_cache: Tensor, *rest, **named_rest) -> Tensor:
    # rest: v_cache, seqlens_k, block_table, causal, scale, then both ops' trailing window,
    # softcap, sinks (and max_seqlen_k), positional or by name.
    torch._check(q.dim() == 4 and k_cache.dim() == 4, lambda: "q and the caches must be 4-d")
    return q.new_empty(q.shape)  # (B, Tq, H, D), contiguous, q's dtype


torch.library.register_fake("fastgpt::triton_attention_kvcache")(_kvcache_fake)
if cpp_has_kvcache():
    torch.library.register_fake("fastgpt::cpp_attention_kvcache")(_kvcache_fake)


def kvcache_op(backend: str):
    """The KV-cache op of a compiled backend ("triton" or "cpp")."""
    return getattr(torch.ops.fastgpt, f"{backend}_attention_kvcache")
