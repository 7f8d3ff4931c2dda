"""fastgpt.attention_with_kvcache: attention of new queries against a KV cache of per-sequence
length, dense or paged, with the new keys and values appended in place (flash-attn's
flash_attn_with_kvcache).

Layouts (flash-attn's, sequence before heads):

    q: (B, Tq, H, D)                          queries of B sequences, Tq >= 1 new positions each
    k_cache, v_cache: (B, Tmax, Hkv, D)       dense: one row of Tmax slots per sequence
                  or (num_blocks, page_size, Hkv, D) with block_table (B, max_blocks) int32:
                                              paged: position p of sequence b lives in block
                                              block_table[b, p // page_size], slot p % page_size
    cache_seqlens: (B,) int32, or an int      keys already cached per sequence
    k, v: (B, Tnew, Hkv, D) or None           new keys/values, written at positions
                                              cache_seqlens[b] .. cache_seqlens[b] + Tnew - 1

Then sequence b attends to its first seqlens_k[b] = cache_seqlens[b] + Tnew keys, causal aligned
bottom-right per sequence: query i sees key j <= i + seqlens_k[b] - Tq. For seqlens_k = (5, 2),
Tq = 2 (1 = visible; a query that sees no key outputs zeros):

    sequence 0:  1 1 1 1 0        sequence 1:  1 0
                 1 1 1 1 1                     1 1

Input rules are checked once, here; the kernel is picked by fastgpt.attention.select_backend and
taken from KVCACHE_KERNELS (a backend without a KV-cache kernel runs the reference, which gathers
each sequence's keys and calls fastgpt's reference attention: the test oracle).
"""

from collections.abc import Callable

import torch
from torch import Tensor

from fastgpt import kvcache_ops
from fastgpt.attention import (
    backend_or_reference,
    debug,
    require_tensors,
    select_backend,
    validate_variants,
    validate_views,
    variants_in_use,
)
from fastgpt.reference import reference_attention

# Page sizes the kernels take: positive multiples of this (16 rows is one Triton key tile).
PAGE_SIZE_MULTIPLE = 16

# fn(q, k_cache, v_cache, seqlens_k, block_table, causal, scale) -> out (B, Tq, H, D), q's dtype.
# seqlens_k counts the keys AFTER the new ones were appended; the inputs are already validated.
KVCacheKernel = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor | None, bool, float], Tensor]


def reference_kvcache_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor,
    block_table: Tensor | None,
    causal: bool,
    scale: float,
    **variants,
) -> Tensor:
    """The reference kernel: each sequence's keys gathered, then fastgpt's reference attention.

    q (B, Tq, H, D); caches dense (B, Tmax, Hkv, D) or paged (num_blocks, page_size, Hkv, D) with
    block_table (B, max_blocks); seqlens_k (B,) valid keys per sequence -> (B, Tq, H, D).
    variants: fastgpt.attention's window / softcap / sinks keywords.
    """
    out = torch.empty_like(q)  # (B, Tq, H, D)
    for b, length in enumerate(seqlens_k.tolist()):
        k, v = sequence_keys(k_cache, v_cache, b, length, block_table)  # (L, Hkv, D) each
        heads_first = (t.transpose(0, 1)[None] for t in (q[b], k, v))  # (1, heads, T, D) views
        out[b] = reference_attention(*heads_first, causal, scale, **variants)[0].transpose(0, 1)
    return out


# Backend name -> KV-cache kernel: the reference, and the compiled backends' ops
# (fastgpt/kvcache_ops.py). KVCACHE_DEVICES limits a kernel to some device types.
KVCACHE_KERNELS: dict[str, KVCacheKernel] = {
    "reference": reference_kvcache_attention,
    "triton": kvcache_ops.kvcache_op("triton"),
}
if kvcache_ops.cpp_has_kvcache():
    KVCACHE_KERNELS["cpp"] = kvcache_ops.kvcache_op("cpp")
KVCACHE_DEVICES = {"cpp": ("cpu",)}  # the C++ KV-cache kernel is CPU-only
# Backends whose KV-cache kernel takes the attention variants (window, softcap, sinks) as keywords.
KVCACHE_VARIANT_BACKENDS = ("reference", "triton", "cpp")
# Backends whose KV-cache kernel takes the max_seqlen_k hint (its splits sized from it).
KVCACHE_HINT_BACKENDS = ("triton",)


def sequence_keys(
    k_cache: Tensor, v_cache: Tensor, b: int, length: int, block_table: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The first `length` keys and values of sequence b, (length, Hkv, D) each (dense: views)."""
    if block_table is None:
        return k_cache[b, :length], v_cache[b, :length]
    page = k_cache.shape[1]
    blocks = block_table[b, : -(-length // page)].long()  # (ceil(length / page),)
    return k_cache[blocks].flatten(0, 1)[:length], v_cache[blocks].flatten(0, 1)[:length]


def select_kvcache_backend(device: torch.device, requested: str | None = None) -> tuple[str, str]:
    """(backend name, reason): select_backend's pick when it has a KV-cache kernel; for an
    automatic pick without one, the reference; for an explicit request, NotImplementedError."""

    def has_kernel(name: str) -> bool:
        return name in KVCACHE_KERNELS and device.type in KVCACHE_DEVICES.get(name, (device.type,))

    refusal = f"KV-cache attention kernel yet (today: {', '.join(KVCACHE_KERNELS)})"
    picked = select_backend(device, requested)
    return backend_or_reference(picked, requested, has_kernel, refusal, "KV-cache kernel")


def kvcache_variants(
    q: Tensor, window: object, softcap: object, sinks: object, causal: bool
) -> dict[str, object]:
    """The variant keywords a KV-cache call turns on ({} for a plain call), checked by
    fastgpt.attention's rules (ValueError / TypeError naming the problem). q: (B, Tq, H, D)."""
    validate_variants(q.shape[2], q.device, window, softcap, sinks)
    used = variants_in_use(window, softcap, sinks, causal)
    given = {"window": window, "softcap": softcap, "sinks": sinks}
    return {name: given[name] for name in used}


def check_page_size(page_size: int) -> None:
    """ValueError unless the kernels take pages of page_size rows."""
    if page_size <= 0 or page_size % PAGE_SIZE_MULTIPLE != 0:
        raise ValueError(
            f"A page size of {page_size} is not supported: the KV-cache kernels take page sizes "
            f"that are positive multiples of {PAGE_SIZE_MULTIPLE}."
        )


def check_max_seqlen_k(max_seqlen_k: object) -> None:
    """TypeError / ValueError unless max_seqlen_k is None or an int >= 0."""
    if max_seqlen_k is None:
        return
    if not isinstance(max_seqlen_k, int) or isinstance(max_seqlen_k, bool):
        raise TypeError(f"max_seqlen_k must be an int or None, got {type(max_seqlen_k).__name__}.")
    if max_seqlen_k < 0:
        raise ValueError(f"max_seqlen_k must be >= 0, got {max_seqlen_k}.")


def _layout_text(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> str:
    return f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"


def _check_tensors(q: Tensor, k_cache: Tensor, v_cache: Tensor, backend: str, scale) -> None:
    """fastgpt.attention's rules (dtypes, devices, head dims, GQA, scale) on the caches."""
    require_tensors("attention_with_kvcache", q=q, k_cache=k_cache, v_cache=v_cache)
    layout = _layout_text(q, k_cache, v_cache)
    if not q.dim() == k_cache.dim() == v_cache.dim() == 4:
        raise ValueError(
            "attention_with_kvcache expects 4-d q (B, Tq, H, D) and caches (B, Tmax, Hkv, D) or "
            f"(num_blocks, page_size, Hkv, D), got {layout}."
        )
    # The dense rules on (1, heads, T, D) views of one query row and the flattened cache.
    n = min(1, q.shape[0], k_cache.shape[0])
    views = (q[:n].transpose(1, 2), k_cache[:n].transpose(1, 2), v_cache[:n].transpose(1, 2))
    validate_views(views, backend, scale, lambda: f"KV-cache layout: {layout}")


def _check_block_table(q: Tensor, k_cache: Tensor, block_table: Tensor | None) -> None:
    """Dense: one cache row per sequence. Paged: an int32 (B, max_blocks) table, a page size the
    kernels take."""
    B, layout = q.shape[0], _layout_text(q, k_cache, k_cache)
    if block_table is None:
        if k_cache.shape[0] != B:
            raise ValueError(
                f"A dense KV cache needs one row per sequence: q has {B}, k_cache "
                f"{k_cache.shape[0]} ({layout}); pass block_table for a paged cache."
            )
        return
    if not isinstance(block_table, Tensor) or block_table.dtype != torch.int32:
        what = block_table.dtype if isinstance(block_table, Tensor) else type(block_table).__name__
        raise TypeError(f"block_table must be an int32 tensor, got {what}.")
    if block_table.device != q.device:
        raise ValueError(f"block_table must be on q's device {q.device}, got {block_table.device}.")
    if block_table.dim() != 2 or block_table.shape[0] != B:
        raise ValueError(
            f"block_table must be (B, max_blocks) = ({B}, ...), got {tuple(block_table.shape)}."
        )
    check_page_size(k_cache.shape[1])


def _check_new_kv(q: Tensor, k_cache: Tensor, k: Tensor | None, v: Tensor | None) -> int:
    """The new keys/values: both or neither, (B, Tnew, Hkv, D) in the cache's dtype. -> Tnew."""
    if k is None and v is None:
        return 0
    if k is None or v is None:
        raise ValueError("attention_with_kvcache takes both k and v to append, or neither.")
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}.")
    want = (q.shape[0], k.shape[1] if k.dim() == 4 else -1, *k_cache.shape[2:])
    if k.shape != v.shape or tuple(k.shape) != want:
        raise ValueError(
            f"The new k and v must be (B, Tnew, Hkv, D) = ({q.shape[0]}, Tnew, "
            f"{k_cache.shape[2]}, {k_cache.shape[3]}), got k {tuple(k.shape)}, v {tuple(v.shape)}."
        )
    if k.dtype != k_cache.dtype or v.dtype != k_cache.dtype or k.device != k_cache.device:
        raise TypeError(
            f"The new k and v must have the cache's dtype and device ({k_cache.dtype}, "
            f"{k_cache.device}), got {k.dtype}/{v.dtype} on {k.device}."
        )
    return k.shape[1]


def _seqlens_tensor(q: Tensor, cache_seqlens: int | Tensor) -> Tensor:
    """cache_seqlens as an int32 (B,) tensor on q's device."""
    B = q.shape[0]
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        return torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype != torch.int32:
        what = getattr(cache_seqlens, "dtype", type(cache_seqlens).__name__)
        raise TypeError(f"cache_seqlens must be an int or an int32 (B,) tensor, got {what}.")
    if cache_seqlens.device != q.device:
        raise ValueError(
            f"cache_seqlens must be on q's device {q.device}, got {cache_seqlens.device}."
        )
    if tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"cache_seqlens must be (B,) = ({B},), got {tuple(cache_seqlens.shape)}.")
    return cache_seqlens


def _check_lengths(k_cache: Tensor, seqlens: Tensor, t_new: int, block_table: Tensor | None) -> int:
    """Every sequence's keys fit its cache row (or its pages); every used block id exists.
    Reads the lengths (and the block table) on the host: a sync on CUDA. -> the longest
    sequence's keys after the append."""
    lengths = seqlens.tolist()
    if any(n < 0 for n in lengths):
        raise ValueError(f"cache_seqlens must be >= 0, got {lengths}.")
    longest = max(lengths, default=0) + t_new
    if block_table is None:
        if longest > k_cache.shape[1]:
            raise ValueError(
                f"Sequence lengths past the cache: cache_seqlens {lengths} plus {t_new} new keys "
                f"need {longest} slots, k_cache {tuple(k_cache.shape)} has {k_cache.shape[1]}."
            )
        return longest
    page, num_blocks = k_cache.shape[1], k_cache.shape[0]
    if longest > block_table.shape[1] * page:
        raise ValueError(
            f"block_table {tuple(block_table.shape)} is too short for the lengths: cache_seqlens "
            f"{lengths} plus {t_new} new keys need {-(-longest // page)} blocks of {page}."
        )
    needed = (seqlens.long() + t_new + page - 1) // page  # (B,) blocks each sequence reads
    cols = torch.arange(block_table.shape[1], device=block_table.device)
    used = cols[None, :] < needed[:, None]  # (B, max_blocks)
    bad = used & ((block_table < 0) | (block_table >= num_blocks))  # (B, max_blocks)
    if bool(bad.any()):  # one sync; the message names the first bad row
        b = int(bad.any(dim=1).nonzero()[0])
        raise ValueError(
            f"block_table row {b} names blocks {block_table[b, : int(needed[b])].tolist()} "
            f"outside the cache's {num_blocks} blocks (k_cache {tuple(k_cache.shape)})."
        )
    return longest


def validate_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None,
    v: Tensor | None,
    cache_seqlens: int | Tensor,
    block_table: Tensor | None,
    backend: str,
    scale: object,
    max_seqlen_k: int | None = None,
) -> tuple[Tensor, int | None]:
    """Raise TypeError/ValueError with one sentence naming the problem and the shapes; return
    cache_seqlens as an int32 (B,) tensor and the max_seqlen_k hint for the kernel: the caller's,
    else the longest length after the append. The values (lengths, block ids) are read outside
    torch.compile only: there the hint is the caller's (None: the kernel covers the capacity)."""
    _check_tensors(q, k_cache, v_cache, backend, scale)
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must have the same shape, got "
            f"{_layout_text(q, k_cache, v_cache)}."
        )
    if any(t.stride(-1) != 1 and t.shape[-1] != 1 for t in (k_cache, v_cache)):
        raise ValueError(
            "k_cache and v_cache need a contiguous last dim (they are written in place, so they "
            f"cannot be copied), got strides {k_cache.stride()} and {v_cache.stride()}."
        )
    _check_block_table(q, k_cache, block_table)
    t_new = _check_new_kv(q, k_cache, k, v)
    seqlens = _seqlens_tensor(q, cache_seqlens)
    check_max_seqlen_k(max_seqlen_k)
    if torch.compiler.is_compiling():
        return seqlens, max_seqlen_k
    longest = _check_lengths(k_cache, seqlens, t_new, block_table)
    if max_seqlen_k is not None and max_seqlen_k < longest:
        raise ValueError(
            f"max_seqlen_k={max_seqlen_k} is below the longest sequence: cache_seqlens plus "
            f"{t_new} new keys reach {longest} keys."
        )
    return seqlens, longest if max_seqlen_k is None else max_seqlen_k


def append_to_cache(
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor,
    v: Tensor,
    cache_seqlens: Tensor,
    block_table: Tensor | None = None,
) -> None:
    """Write k, v (B, Tnew, Hkv, D) into the caches in place at positions cache_seqlens[b] + t
    (paged: through block_table). Nothing else in the caches changes. Inputs are trusted."""
    B, t_new = k.shape[:2]
    pos = cache_seqlens.long()[:, None] + torch.arange(t_new, device=k.device)  # (B, Tnew)
    if block_table is None:
        rows = torch.arange(B, device=k.device)[:, None].expand(B, t_new)  # (B, Tnew)
    else:
        page = k_cache.shape[1]
        rows = block_table.long().gather(1, pos // page)  # (B, Tnew) block ids
        pos = pos % page  # (B, Tnew) slots within the blocks
    k_cache[rows, pos] = k
    v_cache[rows, pos] = v


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    *,
    cache_seqlens: int | Tensor,
    block_table: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    backend: str | None = None,
    max_seqlen_k: int | None = None,
) -> Tensor:
    """Attention of new queries against a KV cache, after appending new keys/values in place.

    Args:
        q: (B, Tq, H, D) queries, Tq >= 1 (1 for decoding, more for prefill chunks or
            speculative decoding); the last dim contiguous.
        k_cache, v_cache: (B, Tmax, Hkv, D) dense caches, or (num_blocks, page_size, Hkv, D)
            pages with block_table; page_size a multiple of PAGE_SIZE_MULTIPLE (16); H % Hkv == 0.
        k, v: (B, Tnew, Hkv, D) new keys/values or None; written into the caches in place at
            positions cache_seqlens[b] .. cache_seqlens[b] + Tnew - 1 of each sequence (through
            block_table when paged) before attending. Nothing else in the caches changes.
        cache_seqlens: (B,) int32 tensor or an int: keys cached per sequence before the new ones.
        block_table: (B, max_blocks) int32 block ids of each sequence's pages, in order; only the
            first ceil((cache_seqlens[b] + Tnew) / page_size) of a row are read.
        causal: bottom-right per sequence: query i sees keys j <= i + cache_seqlens[b] + Tnew - Tq
            (a query that sees no key outputs zeros); False: every one of the sequence's keys.
        scale: multiplies q.k; defaults to 1 / sqrt(D).
        window, softcap, sinks: fastgpt.attention's variants, with the window placed on each
            sequence's own positions (query i sits at cache_seqlens[b] + Tnew - Tq + i). The
            reference and the Triton kernel run them (KVCACHE_VARIANT_BACKENDS): an automatic
            pick moves there, an explicit other backend raises NotImplementedError.
        backend: as fastgpt.attention's; a backend without a KV-cache kernel (KVCACHE_KERNELS)
            runs the reference when picked automatically and raises NotImplementedError when asked
            for by name.
        max_seqlen_k: an upper bound of cache_seqlens[b] + Tnew (flash-attn's varlen hint). The
            Triton kernel sizes its key splits from it instead of the cache's capacity. By
            default the longest length, which the checks read anyway (a host sync on CUDA); under
            torch.compile the checks do not run, so pass it there for caches much longer than
            their sequences. Checked against the lengths outside torch.compile (ValueError when
            below the longest); trusted inside.

    Returns:
        (B, Tq, H, D) in q's dtype. Forward only: no autograd graph is recorded.
    """
    require_tensors("attention_with_kvcache", q=q)
    name, why = select_kvcache_backend(q.device, backend)
    variants = kvcache_variants(q, window, softcap, sinks, causal)
    if variants and name not in KVCACHE_VARIANT_BACKENDS:
        used = ", ".join(variants_in_use(window, softcap, sinks, causal))
        if backend not in (None, "auto"):
            raise NotImplementedError(
                f"The {name} backend's KV-cache kernel does not implement {used} yet (backends "
                f"that do: {', '.join(KVCACHE_VARIANT_BACKENDS)}); pass backend=None."
            )
        name, why = "reference", f"{name} ({why}) has no {used} KV-cache kernel yet"
    seqlens, hint = validate_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens, block_table, name, scale, max_seqlen_k
    )
    if name in KVCACHE_HINT_BACKENDS and hint is not None:
        variants["max_seqlen_k"] = hint
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    paged = "dense" if block_table is None else f"paged {k_cache.shape[1]}"
    debug(
        f"attention_with_kvcache q{tuple(q.shape)} k_cache{tuple(k_cache.shape)} ({paged}) "
        f"{q.dtype} causal={causal} -> {name} ({why})"
    )
    with torch.no_grad():
        if k is not None and v is not None:
            append_to_cache(k_cache, v_cache, k, v, seqlens, block_table)
            seqlens = seqlens + k.shape[1]  # (B,) int32: keys per sequence after the append
        q = q if q.stride(-1) == 1 else q.contiguous()
        kernel = KVCACHE_KERNELS[name]
        return kernel(q, k_cache, v_cache, seqlens, block_table, causal, scale, **variants)
