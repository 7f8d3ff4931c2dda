"""CPU decode: one new query per sequence against a KV cache of ragged lengths, fastgpt's KV-cache
attention vs torch SDPA over a padded cache: bench/results/cpu-decode-<date>.md (+ .json).

    python bench/cpu/decode.py [--out bench/results] [--batches 1,4,16] [--max-len 4096]
                               [--rounds 30] [--threads N]

fp32, H=8 query heads on Hkv=2 kv heads (GQA), D=64, Tq=1. For each batch size B the cache
lengths are drawn once (seeded) between max-len / 8 and max-len, so the sequences are ragged.
Providers, each timed on the same cache contents:

    reference      fastgpt.attention_with_kvcache(backend="reference"), dense (B, Tmax, Hkv, D)
    cpp            the same with backend="cpp", when the C++ KV-cache kernel is registered
    cpp-paged64    cpp on a paged cache (pages of 64 positions, shuffled block table)
    sdpa-padded    F.scaled_dot_product_attention on the cache in its own (B, Hkv, Tmax, D)
                   layout, every row padded to the longest length and masked (attn_mask)

They run in interleaved rounds (the order rotating each round), so load from other jobs hits all
alike; the table gives each one's median ms per call, decoded tokens/s (B / time) and GB/s of the
useful K and V bytes (sum of the lengths x Hkv x D x 2 x 4 bytes; the same numerator for every
provider, so the padded one pays for its padding). Every output is checked against the
reference's first. The CPU is named from lscpu; the load average before and after says how busy
the machine was (results measured under load are not committed).
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import bench
from fastgpt.kvcache import KVCACHE_KERNELS

H, HKV, D = 8, 2, 64
PAGE = 64


def providers() -> list[str]:
    """The providers that run here: the cpp ones only once the C++ KV-cache kernel is registered."""
    cpp = "cpp" in KVCACHE_KERNELS and "cpp" in fastgpt.available_backends("cpu")
    return ["reference", *(["cpp", "cpp-paged64"] if cpp else []), "sdpa-padded"]


def draw_lengths(batch: int, max_len: int) -> list[int]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(max(1, max_len // 8), max_len + 1, (batch,), generator=g).tolist()


def paged(cache: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense cache (B, Tmax, Hkv, D) as shuffled pages of PAGE positions and a block table."""
    B, tmax = cache.shape[:2]
    width = -(-tmax // PAGE)
    padded = F.pad(cache, (0, 0, 0, 0, 0, width * PAGE - tmax))  # (B, width PAGE, Hkv, D)
    order = torch.randperm(B * width, generator=torch.Generator().manual_seed(0))
    pages = torch.empty(B * width, PAGE, *cache.shape[2:])
    pages[order] = padded.reshape(B * width, PAGE, *cache.shape[2:])
    return pages, order.view(B, width).to(torch.int32)


def calls(batch: int, lengths: list[int]) -> dict[str, Callable[[], torch.Tensor]]:
    """One decode call per provider, on the same q and cache contents -> (B, 1, H, D)."""
    gen = torch.Generator().manual_seed(1)
    tmax = max(lengths)
    q = torch.randn(batch, 1, H, D, generator=gen)  # (B, 1, H, D)
    k, v = (torch.randn(batch, tmax, HKV, D, generator=gen) for _ in range(2))  # (B, Tmax, Hkv, D)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    k_pages, table = paged(k, lengths)
    v_pages, _ = paged(v, lengths)
    k_sdpa, v_sdpa = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    mask = torch.arange(tmax)[None, None, None, :] < seqlens[:, None, None, None]  # (B,1,1,Tmax)
    q_sdpa = q.transpose(1, 2)  # (B, H, 1, D)

    def fastgpt_call(backend, kc, vc, block_table=None):
        return lambda: fastgpt.attention_with_kvcache(
            q, kc, vc, cache_seqlens=seqlens, block_table=block_table, backend=backend
        )

    def sdpa():
        out = F.scaled_dot_product_attention(
            q_sdpa, k_sdpa, v_sdpa, attn_mask=mask, enable_gqa=True
        )  # (B, H, 1, D)
        return out.transpose(1, 2)

    table_calls = {
        "reference": fastgpt_call("reference", k, v),
        "cpp": fastgpt_call("cpp", k, v),
        "cpp-paged64": fastgpt_call("cpp", k_pages, v_pages, table),
        "sdpa-padded": sdpa,
    }
    return {name: table_calls[name] for name in providers()}


def timed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    return (time.perf_counter() - start) * 1e3


def measure(batch: int, max_len: int, rounds: int) -> list[dict]:
    """Records of one batch size: every provider's times over interleaved rounds."""
    lengths = draw_lengths(batch, max_len)
    steps = calls(batch, lengths)
    want = steps["reference"]()
    for name, fn in steps.items():  # a fast wrong kernel must not pass
        with torch.no_grad():
            got = fn()
        if not torch.allclose(got, want, atol=1e-4, rtol=1e-3):
            raise AssertionError(f"{name}'s output differs from the reference's (B={batch}).")
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            times[name].append(timed_ms(steps[name]))
    useful = sum(lengths) * HKV * D * 2 * 4  # K and V bytes of the valid positions, fp32
    records = []
    for name, ms in times.items():
        median = statistics.median(ms)
        records.append(
            dict(
                provider=name, batch=batch, lengths=lengths, times_ms=ms, median_ms=median,
                tokens_per_s=batch / median * 1e3, gbps=useful / median / 1e6,
            )
        )  # fmt: skip
    cells = ", ".join(f"{r['provider']} {r['median_ms']:.3f} ms" for r in records)
    print(f"B={batch} lengths {min(lengths)}..{max(lengths)}: {cells}", flush=True)
    return records


def summary(raw: dict) -> str:
    """The markdown report: machine, load, one row per (batch, provider)."""
    rows = [["B", "lengths", "provider", "ms", "tokens/s", "GB/s", "vs sdpa-padded"]]
    by_batch: dict[int, dict[str, dict]] = {}
    for r in raw["records"]:
        by_batch.setdefault(r["batch"], {})[r["provider"]] = r
    for batch, recs in by_batch.items():
        sdpa = recs["sdpa-padded"]["median_ms"]
        for name, r in recs.items():
            lens = f"{min(r['lengths'])}..{max(r['lengths'])}"
            rows.append([
                str(batch), lens, name, f"{r['median_ms']:.3f}", f"{r['tokens_per_s']:.0f}",
                f"{r['gbps']:.2f}", f"{sdpa / r['median_ms']:.2f}x",
            ])  # fmt: skip
    before, after = (", ".join(f"{x:.2f}" for x in raw[k]) for k in ("load_before", "load_after"))
    return "\n".join([
        f"# CPU decode benchmark, {raw['date']}",
        "",
        f"Machine: {raw['cpu']}, torch {raw['torch']}, {raw['threads']} threads, commit "
        f"{raw['commit']}. Load average (1, 5, 15 min): {before} before, {after} after.",
        "",
        f"fp32, H={H}, Hkv={HKV}, D={D}, one query per sequence, ragged cache lengths; median ms "
        f"of {raw['rounds']} interleaved rounds; GB/s of the valid K and V bytes.",
        "",
        bench.markdown_table(rows),
        "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--batches", default="1,4,16", help="batch sizes, e.g. 1,4,16")
    ap.add_argument("--max-len", type=int, default=4096, help="longest cache length")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds per batch size")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own count)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    load_before = list(os.getloadavg())
    records = []
    for batch in (int(b) for b in args.batches.split(",")):
        records += measure(batch, args.max_len, args.rounds)
    raw = {
        "records": records, "date": date, "cpu": bench.cpu_name(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "commit": bench.git_commit(), "rounds": args.rounds,
        "load_before": load_before, "load_after": list(os.getloadavg()),
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"cpu-decode-{date}.json").write_text(json.dumps(raw, indent=1) + "\n")
    text = summary(raw)
    (args.out / f"cpu-decode-{date}.md").write_text(text)
    print(f"\n{text}\nwritten: {args.out / f'cpu-decode-{date}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
