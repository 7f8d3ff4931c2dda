"""Ragged KV-cache decode: one new query per sequence against caches of ragged lengths.

For each batch size B (1..64 on a GPU) the cache lengths are drawn once, uniformly in [lo, hi]
(1k..32k on a GPU; seed B, so every run and provider sees the same batch), and one decode step
(Tq = 1, GQA: H query heads on Hkv kv heads) is timed per provider, each in its own layout built
before timing from the same keys:

    fastgpt-triton        fastgpt.attention_with_kvcache(backend="triton") on a dense cache
                          (B, Tmax, Hkv, D), Tmax = the longest length rounded up to a page; the
                          API's checks included (they read the lengths on the host: a sync)
    fastgpt-triton-paged  the same on pages of 256 positions with a shuffled block table
    fastgpt-triton-op     the Triton op alone (torch.ops.fastgpt.triton_attention_kvcache) with
                          max_seqlen_k: the kernel without the API's checks
    fastgpt-cpp[-paged]   the C++ kernel through the API (CPU only)
    sdpa-padded           F.scaled_dot_product_attention over the padded cache (B, Hkv, Tmax, D)
                          with a boolean length mask (B, 1, 1, Tmax); the GQA group is folded into
                          the query rows (B, Hkv, H / Hkv, D), so K/V are read once, not expanded
    flex                  FlexAttention (torch.compile on CUDA, eager on CPU) on the same padded
                          cache, enable_gqa, a BlockMask of the lengths (built before timing)
    flash-attn[-paged]    flash_attn_with_kvcache, dense and paged 256, when installed (CUDA)

Per record: ms per step, tokens/s (B / time), GB/s of the bytes a step must move (the valid K/V,
2 * sum(lengths) * Hkv * D * elem, plus q and out; the same numerator for every provider, so a
padded one pays for its padding) and that rate as a fraction of the run's measured copy bandwidth.
Every output is compared with fastgpt's fp32 reference on each sequence's valid keys (rel_err).
"""

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgpt.bench.machine import write_json
from fastgpt.bench.timing import (
    DTYPES,
    error_text,
    peak_mib,
    recording_failure,
    relative_error,
    time_ms,
)

PAGE = 256  # positions per page of the paged providers (flash-attn's paged minimum)


def ragged_lengths(batch: int, lo: int, hi: int) -> list[int]:
    """batch lengths uniform in [lo, hi], seeded by the batch size (the same in every run)."""
    gen = torch.Generator().manual_seed(batch)
    return torch.randint(lo, hi + 1, (batch,), generator=gen).tolist()


@dataclass
class Ragged:
    """One decode step's inputs: q (B, 1, H, D), dense caches (B, Tmax, Hkv, D) holding each
    sequence's keys in its first lengths[b] rows (the rest random padding), seqlens (B,) int32."""

    q: Tensor
    k: Tensor
    v: Tensor
    lengths: list[int]

    @functools.cached_property
    def seqlens(self) -> Tensor:
        return torch.tensor(self.lengths, dtype=torch.int32, device=self.q.device)

    @functools.cached_property
    def heads_first(self) -> tuple[Tensor, Tensor]:
        """k, v as (B, Hkv, Tmax, D), contiguous: SDPA's and FlexAttention's layout."""
        return self.k.transpose(1, 2).contiguous(), self.v.transpose(1, 2).contiguous()

    @functools.cached_property
    def paged(self) -> tuple[Tensor, Tensor, Tensor]:
        """(k_pages, v_pages (num_pages, PAGE, Hkv, D), block_table (B, Tmax / PAGE) int32): only
        the pages a sequence uses, in a shuffled order; unused table entries name page 0."""
        B, tmax = self.k.shape[:2]
        width = tmax // PAGE
        need = torch.tensor([-(-n // PAGE) for n in self.lengths])  # (B,) pages per sequence
        used = torch.arange(width)[None, :] < need[:, None]  # (B, width)
        order = torch.randperm(int(need.sum()), generator=torch.Generator().manual_seed(0))
        table = torch.zeros(B, width, dtype=torch.int32)
        table[used] = order.to(torch.int32)
        rows = table[used].long().to(self.k.device)
        mask = used.to(self.k.device)
        pages = []
        for cache in (self.k, self.v):
            src = cache.view(B, width, PAGE, *cache.shape[2:])[mask]  # (pages, PAGE, Hkv, D)
            pages.append(torch.empty_like(src).index_copy_(0, rows, src))
        return pages[0], pages[1], table.to(self.k.device)

    def step_bytes(self) -> int:
        """Bytes one step must move: the valid K and V, q read and out written."""
        B, _, H, D = self.q.shape
        elem = self.q.element_size()
        return (2 * sum(self.lengths) * self.k.shape[2] * D + 2 * B * H * D) * elem


def make_ragged(
    batch: int, lengths: list[int], heads: int, kv_heads: int, d: int, dtype, device
) -> Ragged:
    """Random q and caches (Tmax = the longest length rounded up to PAGE) for one batch."""
    tmax = -(-max(lengths) // PAGE) * PAGE
    gen = torch.Generator(device=device).manual_seed(batch)
    q = torch.randn(batch, 1, heads, d, device=device, dtype=dtype, generator=gen)
    k, v = (
        torch.randn(batch, tmax, kv_heads, d, device=device, dtype=dtype, generator=gen)
        for _ in range(2)
    )  # (B, Tmax, Hkv, D) each
    return Ragged(q, k, v, lengths)


# A provider: the step's inputs -> a call returning out (B, 1, H, D).
Setup = Callable[[Ragged], Callable[[], Tensor]]


def _api(backend: str, paged: bool) -> Setup:
    def setup(r: Ragged):
        import fastgpt

        k, v, table = r.paged if paged else (r.k, r.v, None)
        seqlens = r.seqlens
        return lambda: fastgpt.attention_with_kvcache(
            r.q, k, v, cache_seqlens=seqlens, block_table=table, backend=backend
        )

    return setup


def _triton_op(r: Ragged):
    import fastgpt.kvcache_ops  # noqa: F401  (registers the op)

    op, seqlens, longest = torch.ops.fastgpt.triton_attention_kvcache, r.seqlens, max(r.lengths)
    scale = r.q.shape[-1] ** -0.5
    return lambda: op(r.q, r.k, r.v, seqlens, None, True, scale, max_seqlen_k=longest)


def _sdpa_padded(r: Ragged):
    B, _, H, D = r.q.shape
    k, v = r.heads_first  # (B, Hkv, Tmax, D)
    hkv, tmax = k.shape[1], k.shape[2]
    q = r.q.view(B, hkv, H // hkv, D)  # query head h = kv head h // G, row h % G
    valid = torch.arange(tmax, device=k.device)[None, :] < r.seqlens[:, None]  # (B, Tmax)
    mask = valid[:, None, None, :]  # (B, 1, 1, Tmax)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).view(B, 1, H, D)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    config = torch._dynamo.config  # one compile per batch size at most, never the eager fallback
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, limit):
            setattr(config, limit, max(64, getattr(config, limit)))
    return torch.compile(flex_attention)


def _flex(r: Ragged):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, _, H, D = r.q.shape
    k, v = r.heads_first  # (B, Hkv, Tmax, D)
    seqlens = r.seqlens

    def valid(b, h, q_idx, kv_idx):
        return kv_idx < seqlens[b]

    mask = create_block_mask(valid, B, None, 1, k.shape[2], device=k.device)
    q = r.q.transpose(1, 2)  # (B, H, 1, D)
    if r.q.device.type == "cuda":
        compiled = _compiled_flex()
        return lambda: compiled(q, k, v, block_mask=mask, enable_gqa=True).transpose(1, 2)

    def eager():
        with warnings.catch_warnings():  # eager flex says it is unfused: that is what we time
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(q, k, v, block_mask=mask, enable_gqa=True).transpose(1, 2)

    return eager


def _flash_attn(paged: bool) -> Setup:
    def setup(r: Ragged):
        from flash_attn import flash_attn_with_kvcache

        k, v, table = r.paged if paged else (r.k, r.v, None)
        seqlens = r.seqlens
        return lambda: flash_attn_with_kvcache(
            r.q, k, v, cache_seqlens=seqlens, block_table=table, causal=True
        )

    return setup


def kvcache_providers(device: torch.device, interpreted: bool = False) -> dict[str, Setup]:
    """Every provider of the case that can run here, fastgpt's first. On CPU, Triton runs
    interpreted: a check of its numbers, not a peer to time, so only with interpreted=True."""
    import importlib.util

    import fastgpt
    from fastgpt.kvcache import KVCACHE_DEVICES, KVCACHE_KERNELS

    backends = fastgpt.available_backends(device)
    found: dict[str, Setup] = {}
    ours = ("triton",) if device.type == "cuda" else ("cpp", "triton") if interpreted else ("cpp",)
    for name in ours:
        runs = name in backends and name in KVCACHE_KERNELS
        if runs and device.type in KVCACHE_DEVICES.get(name, (device.type,)):
            found[f"fastgpt-{name}"] = _api(name, paged=False)
            found[f"fastgpt-{name}-paged"] = _api(name, paged=True)
    if "fastgpt-triton" in found:
        found["fastgpt-triton-op"] = _triton_op
    found["sdpa-padded"] = _sdpa_padded
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is not None:
        found["flex"] = _flex
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        found["flash-attn"] = _flash_attn(paged=False)
        found["flash-attn-paged"] = _flash_attn(paged=True)
    return found


def reference_out(r: Ragged) -> Tensor:
    """fastgpt's reference in fp32 on each sequence's valid keys: (B, 1, H, D) fp32."""
    from fastgpt.reference import reference_attention

    outs = []
    for b, n in enumerate(r.lengths):
        q = r.q[b].transpose(0, 1)[None].float()  # (1, H, 1, D)
        k, v = (t[b, :n].transpose(0, 1)[None].float() for t in (r.k, r.v))  # (1, Hkv, n, D)
        outs.append(reference_attention(q, k, v, causal=False)[0].transpose(0, 1))  # (1, H, D)
    return torch.stack(outs)  # (B, 1, H, D)


def measure_kvcache(name: str, setup: Setup, r: Ragged, device, timing, check: Tensor) -> dict:
    """Time one provider on one batch; the record carries the error instead when it cannot run."""
    record = {"provider": name, "ms": None, "peak_mib": None, "error": None}
    with recording_failure(record, device):
        fn = setup(r)
        with torch.no_grad():
            out = fn().float()  # (B, 1, H, D); also the first (compiling) call
            record["rel_err"] = relative_error(out, check)
            record["peak_mib"] = peak_mib(fn, device)  # also the untimed warm-up
            record["ms"] = time_ms(fn, device, *timing)
    return record


def _rates(record: dict, r: Ragged, copy_gbps: float | None) -> None:
    """tokens/s, GB/s and the fraction of copy bandwidth of a timed record, in place."""
    seconds = record["ms"] * 1e-3
    record["tokens_per_s"] = len(r.lengths) / seconds
    record["gbps"] = r.step_bytes() / seconds / 1e9
    record["copy_fraction"] = record["gbps"] / copy_gbps if copy_gbps else None


def run_kvcache(run) -> None:
    """The ragged KV-cache decode case: every provider on every batch size, into results.

    Starts no new batch size past the run's --budget-s or this case's own --kvcache-budget-s
    (counted from the case's start); the results file is rewritten after every batch size."""
    args, device, results = run.args, run.device, run.results
    heads, kv_heads = args.kvcache_heads
    lo, hi = args.kvcache_lengths
    dtype_name = args.dtypes[0]
    providers = kvcache_providers(device)
    if args.kvcache_providers is not None:
        providers = {n: s for n, s in providers.items() if n in args.kvcache_providers}
    started = run.seconds()
    for batch in args.kvcache_batches:
        label = f"kvcache B={batch}"
        if run.seconds() - started > args.kvcache_budget_s:
            results["skipped"].append(label)
            continue
        if run.over_budget(label):
            continue
        lengths = ragged_lengths(batch, lo, hi)
        results["kvcache_lengths"][str(batch)] = lengths
        try:
            step = make_ragged(
                batch, lengths, heads, kv_heads, args.kvcache_head_dim, DTYPES[dtype_name], device
            )
            check = reference_out(step)
        except torch.OutOfMemoryError as exc:  # a smaller GPU: say so, go on with the next B
            results["skipped"].append(f"{label} ({error_text(exc)})")
            step = check = None
            continue
        shape = dict(batch=batch, heads=heads, kv_heads=kv_heads, d=args.kvcache_head_dim)
        shape |= dict(dtype=dtype_name, lo=lo, hi=hi, max_len=max(lengths))
        shape |= dict(total_keys=sum(lengths), step_bytes=step.step_bytes(), page=PAGE)
        for name, setup in providers.items():
            r = measure_kvcache(name, setup, step, device, (args.warmup_ms, args.rep_ms), check)
            if r["ms"] is not None:
                _rates(r, step, results["copy_gbps"])
            results["kvcache"].append({**r, **shape})
        del step, check
        write_json(run.path, results)
        print(f"  {label}: done ({run.seconds():.0f} s)", flush=True)
