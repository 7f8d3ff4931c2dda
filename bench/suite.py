"""The benchmark's run loops: kernel shapes and decode lengths, each provider measured on each.

Every shape's records are appended to the results dict and the results file rewritten, so a run
cut short keeps what it measured; a run past its budget lists what it skipped.
"""

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastgpt.bench.machine import write_json
from fastgpt.bench.providers import Provider
from fastgpt.bench.timing import DTYPES, attention_flops, measure


def speedups(records: list[dict], providers: dict[str, bool]) -> list[dict]:
    """Speed-up of each fastgpt provider over each other provider, per configuration and mode."""
    by_config: dict[tuple, dict[str, float]] = {}
    for r in records:
        if r["ms"] is not None:
            key = (r["dtype"], r["d"], r["tq"], r["causal"], r["mode"])
            by_config.setdefault(key, {})[r["provider"]] = r["ms"]
    rows = []
    for (dtype, d, t, causal, mode), times in by_config.items():
        for ours in (n for n in times if providers.get(n)):
            for peer in (n for n in times if n != ours and not providers.get(n)):
                config = dict(dtype=dtype, d=d, tq=t, causal=causal, mode=mode)
                rows.append(
                    dict(fastgpt=ours, peer=peer, **config, speedup=times[peer] / times[ours])
                )
    return rows


def _kernel_configs(args: argparse.Namespace) -> list[tuple[str, int, bool]]:
    """(dtype, head dim, causal) groups, most important first (the run may stop on budget)."""
    causal = {"both": (True, False), "true": (True,), "false": (False,)}[args.causal]
    return [(dt, d, c) for dt in args.dtypes for c in causal for d in args.head_dims]


@dataclass
class Run:
    """One benchmark run: its options, providers, device, results dict and results file."""

    args: argparse.Namespace
    provs: dict[str, Provider]
    device: torch.device
    results: dict
    path: Path
    started: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def over_budget(self, label: str) -> bool:
        """True (and label listed as skipped) once the run has used its --budget-s."""
        if self.seconds() > self.args.budget_s:
            self.results["skipped"].append(label)
            return True
        return False


def run_kernels(run: Run) -> None:
    """Prefill/training shapes: every (dtype, D, causal, T), provider and mode into results."""
    args, device, results = run.args, run.device, run.results
    timing = (args.warmup_ms, args.rep_ms)
    for dtype_name, d, causal in _kernel_configs(args):
        h = args.hidden // d
        for t in args.seqlens:
            label = f"{dtype_name} D={d} causal={causal} T={t}"
            if run.over_budget(label):
                continue
            b = max(1, args.tokens // t)
            shape = dict(batch=b, heads=h, kv_heads=h, tq=t, tk=t, d=d)
            for p in run.provs.values():
                for mode in args.modes:
                    check = mode == "fwd" and t == args.seqlens[0]
                    dtype = DTYPES[dtype_name]
                    r = measure(p, shape, dtype, causal, mode, device, *timing, check=check)
                    if r["ms"] is not None:
                        flops = attention_flops(b, h, t, t, d, causal, mode)
                        r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
                    results["kernel"].append({**r, "dtype": dtype_name, "causal": causal, **shape})
            print(f"  {label}: done ({run.seconds():.0f} s)", flush=True)
            write_json(run.path, results)


def run_decode(run: Run) -> None:
    """Decode: one query against KV caches of args.decode_lens keys, in GB/s, into results."""
    args, results = run.args, run.results
    dtype = DTYPES[args.dtypes[0]]
    d = args.decode_head_dim
    h = args.hidden // d
    hkv = args.decode_kv_heads or h
    elem = torch.finfo(dtype).bits // 8
    timing = (args.warmup_ms, args.rep_ms)
    for tk in args.decode_lens:
        if run.over_budget(f"decode Tk={tk}"):
            continue
        shape = dict(batch=args.decode_batch, heads=h, kv_heads=hkv, tq=1, tk=tk, d=d)
        nbytes = (2 * args.decode_batch * hkv * tk * d + 2 * args.decode_batch * h * d) * elem
        for p in run.provs.values():
            check = tk == args.decode_lens[0]
            r = measure(p, shape, dtype, True, "fwd", run.device, *timing, check=check)
            if r["ms"] is not None:
                r["gbps"] = nbytes / (r["ms"] * 1e-3) / 1e9
                r["copy_fraction"] = r["gbps"] / results["copy_gbps"]
            results["decode"].append({**r, "dtype": args.dtypes[0], "causal": True, **shape})
        write_json(run.path, results)
    print(f"  decode: done ({run.seconds():.0f} s)", flush=True)
