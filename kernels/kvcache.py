"""Host side of the Triton KV-cache decode: checks, splits, grid and launches.

    out = kvcache_attention(q, k_cache, v_cache, seqlens_k, block_table, causal, scale)

q: (B, Tq, H, D), Tq >= 1 small (decoding, speculative decoding). k_cache, v_cache: dense
(B, Tmax, Hkv, D), or paged (num_blocks, page_size, Hkv, D) with block_table (B, max_blocks) int32
(key j of sequence b is row j % page_size of page block_table[b, j // page_size]). seqlens_k (B,)
int32: the valid keys of each sequence, new keys already appended (0 allowed: the output is 0).
Causal is aligned bottom-right per sequence: query i sees keys j <= i + seqlens_k[b] - Tq.
Returns out (B, Tq, H, D) in q's dtype, contiguous. Forward only.

The lengths stay on the device (no host sync): splits are sized from the cache's capacity, or
from max_seqlen_k when the caller knows an upper bound of seqlens_k (flash-attn's varlen hint;
fastgpt.attention_with_kvcache passes the longest length its checks already read), and a split
past its sequence's end finishes at once with an empty partial (decode.py). So the values are
trusted, as everything reaching a kernel here: lengths within the cache (and within
max_seqlen_k) and the block ids a sequence uses valid are the calling API's checks
(check_kvcache_inputs covers shapes and dtypes).
Any page size works: a tile within one page reads one table entry, else one per key.
"""

import math

import torch
import triton
from torch import Tensor

from fastgpt.attention import last_dim_contiguous
from fastgpt.kvcache import check_max_seqlen_k

from .attention import variant_args
from .configs import INTERPRET, KVCACHE_CONFIGS, prune_kvcache
from .decode import decode_combine_kernel, kvcache_split_kernel
from .flash_fwd import LOG2E
from .launch import block_d, dot_precision, sm_count

_kvcache = triton.autotune(
    KVCACHE_CONFIGS,
    key=["HEAD_DIM", "CAUSAL", "PAGED", "PAGE_SIZE", "M_ROWS", "WINDOW", "SOFTCAP"],
    prune_configs_by={"early_config_prune": prune_kvcache},
)(kvcache_split_kernel)

KVCACHE_MAX_SPLITS = 64  # the merge holds all partials of a row in registers: (splits, D) fp32
# Split boundaries are multiples of every BLOCK_N, so a tile never straddles two splits, and in
# a page when page_size is a multiple of BLOCK_N.
_CHUNK_ALIGN = max(c.kwargs["BLOCK_N"] for c in KVCACHE_CONFIGS)
_MIN_CHUNK = 16 if INTERPRET else 512  # keys per split, at least


def kvcache_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor,
    block_table: Tensor | None,
    causal: bool,
    scale: float,
    **variants,
) -> Tensor:
    """Attention of q (B, Tq, H, D) over each sequence's cached keys. Returns (B, Tq, H, D).
    variants: window, softcap, sinks and the max_seqlen_k hint (kvcache_attention_with_lse)."""
    return kvcache_attention_with_lse(
        q, k_cache, v_cache, seqlens_k, block_table, causal, scale, **variants
    )[0]


def kvcache_attention_with_lse(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor,
    block_table: Tensor | None,
    causal: bool,
    scale: float,
    num_splits: int | None = None,
    *,
    max_seqlen_k: int | None = None,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """kvcache_attention, plus lse (B, H, Tq) fp32 (natural log, +inf for a row seeing no key).

    window, softcap, sinks: fastgpt.attention's variants on each sequence's own positions (query
    i sees keys j in [i + seqlen - Tq - left, i + seqlen - Tq + right]); lse includes the sink.

    num_splits: key-axis splits per sequence, default enough programs to fill the GPU about four
    times over (at most KVCACHE_MAX_SPLITS, at least _MIN_CHUNK keys each).
    max_seqlen_k: an upper bound of seqlens_k (trusted: keys past it are not read); the splits
    then cover max_seqlen_k keys instead of the cache's capacity, so a cache much longer than
    its sequences still gets every program working. None: the capacity.
    """
    check_kvcache_inputs(q, k_cache, v_cache, seqlens_k, block_table)
    check_max_seqlen_k(max_seqlen_k)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton kvcache kernel takes fp16, bf16 or fp32, got {q.dtype}.")
    q, k_cache, v_cache = (last_dim_contiguous(t) for t in (q, k_cache, v_cache))
    B, Tq, H, D = q.shape
    Hkv = k_cache.shape[2]
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 1
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    extra = variant_args(window, softcap, sinks, causal, scale, Tq + capacity + 1)
    sinks32 = extra.pop("Sinks")
    if extra.pop("SOFTCAP"):
        extra |= dict(SOFTCAP=True, cap_in=abs(scale) / softcap, cap_out=softcap / abs(scale))
    del extra["softcap"]
    out = torch.empty((B, Tq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Tq, H), dtype=torch.float32, device=q.device)
    span = capacity if max_seqlen_k is None else min(capacity, max_seqlen_k)  # keys to cover
    if out.numel() == 0 or span == 0:  # no query, or no key anywhere
        lse = lse.fill_(math.inf) if sinks is None else lse.copy_(sinks32.expand_as(lse))
        return out.zero_(), lse.permute(0, 2, 1)

    splits, chunk = _splits(B * Hkv, span, q.device, num_splits)
    acc = torch.empty((B, Tq, H, splits, D), dtype=torch.float32, device=q.device)
    m = torch.empty((B, Tq, H, splits), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    seqlens_k = seqlens_k.contiguous()
    table = block_table.contiguous() if paged else seqlens_k  # dense: never read
    group = H // Hkv

    def grid(meta):
        return (splits, Hkv * triton.cdiv(group * Tq, meta["BLOCK_M"]), B)

    _kvcache[grid](
        q, k_cache, v_cache, seqlens_k, table, acc, m, l,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
        table.shape[-1] if paged else 0,
        H, Hkv, group, Tq, abs(scale) * LOG2E.value, chunk, group * Tq,
        HEAD_DIM=D, BLOCK_D=block_d(D), CAUSAL=bool(causal) and Tq > 1, SCALE_NEG=scale < 0,
        PAGED=paged, PAGE_SIZE=page_size, DOT_PRECISION=dot_precision(q.dtype), **extra,
    )  # fmt: skip
    decode_combine_kernel[(H, B * Tq)](
        acc, m, l, out, lse, out.stride(1), out.stride(2),
        H, splits, abs(scale) * LOG2E.value, abs(scale),
        HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_S=triton.next_power_of_2(splits), Sinks=sinks32,
    )  # fmt: skip
    return out, lse.permute(0, 2, 1)


def _splits(programs: int, span: int, device: torch.device, num_splits: int | None):
    """(splits, chunk): chunk keys per split, a multiple of _CHUNK_ALIGN, splits * chunk >= span
    (the keys a sequence may hold); every split but the last of a sequence of span keys holds
    chunk keys."""
    if num_splits is None:
        num_splits = triton.cdiv(4 * sm_count(device), programs)
    num_splits = min(max(num_splits, 1), KVCACHE_MAX_SPLITS)
    chunk = max(triton.cdiv(span, num_splits), _MIN_CHUNK)
    chunk = triton.cdiv(chunk, _CHUNK_ALIGN) * _CHUNK_ALIGN
    return triton.cdiv(span, chunk), chunk


def check_kvcache_inputs(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens_k: Tensor, block_table: Tensor | None
) -> None:
    """Shapes, dtypes and devices of the KV-cache kernel's inputs (nothing that needs the lengths
    or block ids on the host). Raises ValueError / TypeError with one sentence."""
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"kvcache attention expects q (B, Tq, H, D) and k_cache, v_cache of one 4-d shape, "
            f"got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache "
            f"{tuple(v_cache.shape)}."
        )
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or not q.dtype.is_floating_point:
        raise TypeError(
            f"kvcache attention expects q, k_cache, v_cache of one floating dtype, got {q.dtype}, "
            f"{k_cache.dtype}, {v_cache.dtype}."
        )
    B, _, H, D = q.shape
    Hkv = k_cache.shape[2]
    if k_cache.shape[3] != D or not 1 <= D <= 256 or Hkv < 1 or H % Hkv:
        raise ValueError(
            f"kvcache attention expects caches with q's head dim (1..256) and a number of heads "
            f"dividing q's, got q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)}."
        )
    if seqlens_k.dtype != torch.int32 or tuple(seqlens_k.shape) != (B,):
        raise ValueError(
            f"kvcache attention expects seqlens_k of shape ({B},) int32, got "
            f"{tuple(seqlens_k.shape)} {seqlens_k.dtype}."
        )
    paged_ok = block_table is None or (
        block_table.dtype == torch.int32 and block_table.dim() == 2 and block_table.shape[0] == B
    )
    if not paged_ok or (block_table is None and k_cache.shape[0] != B):
        where = "k_cache" if paged_ok else "block_table"
        raise ValueError(
            f"kvcache attention expects a dense cache (B={B}, Tmax, Hkv, D) or a block_table "
            f"({B}, max_blocks) int32, got {where} {_describe(k_cache, block_table, paged_ok)}."
        )
    tensors = [q, k_cache, v_cache, seqlens_k] + ([block_table] if block_table is not None else [])
    if len({t.device for t in tensors}) > 1:
        raise ValueError(
            f"kvcache attention expects every tensor on one device, got "
            f"{[str(t.device) for t in tensors]}."
        )


def _describe(k_cache: Tensor, block_table: Tensor | None, paged_ok: bool) -> str:
    t = k_cache if paged_ok else block_table
    return f"{tuple(t.shape)} {t.dtype}"
