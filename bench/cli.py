"""Attention benchmark: fastgpt's kernels beside their peers, timed in the same run.

    fastgpt bench                       # GPU: flash-attn's configuration, bf16 and fp16
    fastgpt bench --tiny                # CPU smoke run at tiny sizes (the CI path)
    fastgpt bench --device cpu --dtypes fp32 --seqlens 256,1024 --head-dims 64 --tokens 1024

Providers: fastgpt-triton, fastgpt-cpp, reference (fastgpt's backends, through fastgpt.attention),
torch SDPA per backend (sdpa-flash, sdpa-efficient, sdpa-cudnn), FlexAttention with a causal block
mask (flex) and flash-attn's flash_attn_func when installed (flash-attn). A provider that cannot run
a configuration (missing backend, unsupported dtype, out of memory) gets an error record instead of
a time, so every run says what it could not measure.

Timing: on CUDA the median of triton.testing.do_bench (CUDA events, L2 flushed between runs) after
an untimed warm-up call; on CPU the median of time.perf_counter over repeated calls. FLOPs are
counted as flash-attn does: 4 * B * H * Tq * Tk * D for the forward, halved when causal, x2.5 for
the backward, x3.5 for forward + backward. Decode (Tq = 1 against a KV cache) is reported in GB/s
(q, k, v read once, out written once) beside the device's measured copy bandwidth. The varlen case
(fastgpt.bench.varlen) packs sequences of mixed lengths: fastgpt.attention_varlen beside padded
dense SDPA (and padded cpp on CPU, FlexAttention's document mask on CUDA). The KV-cache case
(fastgpt.bench.kvcache) decodes one token per sequence for batches of 1..64 sequences of ragged
cache lengths (1k..32k, bf16, H=32, Hkv=8, D=128 on a GPU): attention_with_kvcache (Triton dense,
paged 256 and the bare op; cpp on CPU) beside SDPA over the padded cache, FlexAttention with a
length BlockMask and flash-attn's flash_attn_with_kvcache, in ms, tokens/s, GB/s and % of copy.

Results: <out>/<machine>-<date>.json (machine, versions, git commit, every number; rewritten after
each configuration, so an interrupted run keeps what it measured) and PNG plots beside it; <out>
is --out, by default the source checkout's bench/results (./bench-results for an installed copy).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from fastgpt.bench.kvcache import run_kvcache
from fastgpt.bench.machine import (
    default_results_dir,
    jsonable,
    machine_info,
    results_path,
    write_json,
)
from fastgpt.bench.providers import available_providers
from fastgpt.bench.report import plot, summary
from fastgpt.bench.suite import Run, run_decode, run_kernels, speedups
from fastgpt.bench.timing import DTYPES, MIB, MODES, copy_bandwidth_gbps
from fastgpt.bench.varlen import run_varlen


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


# Defaults per run: "gpu" is flash-attn's benchmark configuration (hidden 2048, 16k tokens a
# batch); "cpu" a size a laptop finishes in minutes; "tiny" the smoke test's.
PROFILES = {
    "gpu": dict(
        dtypes=["bf16", "fp16"],
        head_dims=[128, 64],
        hidden=2048,
        tokens=16384,
        seqlens=[512 << i for i in range(6)],  # 512 .. 16k
        decode_lens=[1024 << i for i in range(8)],  # 1k .. 128k
        decode_head_dim=128,
        varlen_lengths=[128, 4096],  # uniform 128..4096, 16k tokens a batch
        varlen_tokens=16384,
        kvcache_batches=[1 << i for i in range(7)],  # 1 .. 64
        kvcache_lengths=[1024, 32768],
        kvcache_heads=[32, 8],  # GQA 4; at B = 64 the dense bf16 caches hold ~8 GiB
        kvcache_head_dim=128,
        warmup_ms=25,
        rep_ms=100,
    ),
    "cpu": dict(
        dtypes=["fp32"],
        head_dims=[64],
        hidden=512,
        tokens=1024,
        seqlens=[128, 256, 512],
        decode_lens=[16384, 65536],  # KV of 32 and 128 MiB: beyond the caches
        decode_head_dim=64,
        varlen_lengths=[64, 1024],
        varlen_tokens=4096,
        kvcache_batches=[1, 4, 16],
        kvcache_lengths=[512, 8192],
        kvcache_heads=[8, 2],
        kvcache_head_dim=64,
        warmup_ms=25,
        rep_ms=100,
    ),
    "tiny": dict(
        dtypes=["fp32"],
        head_dims=[16],
        hidden=32,
        tokens=64,
        seqlens=[16, 32],
        decode_lens=[64, 128],
        decode_head_dim=16,
        varlen_lengths=[3, 20],
        varlen_tokens=64,
        kvcache_batches=[1, 3],
        kvcache_lengths=[3, 40],
        kvcache_heads=[4, 2],
        kvcache_head_dim=16,
        warmup_ms=1,
        rep_ms=5,
    ),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="fastgpt bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run at tiny sizes")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--dtypes", type=_names, default=None, help="comma list of bf16,fp16,fp32")
    ap.add_argument("--head-dims", type=_ints, default=None, help="default 128,64")
    ap.add_argument("--hidden", type=int, default=None, help="heads = hidden / D (default 2048)")
    ap.add_argument("--tokens", type=int, default=None, help="batch = tokens / T (default 16384)")
    ap.add_argument("--seqlens", type=_ints, default=None, help="default 512,...,16384")
    ap.add_argument("--modes", type=_names, default=list(MODES), help="fwd,bwd,fwd_bwd")
    ap.add_argument("--causal", choices=("both", "true", "false"), default="both")
    ap.add_argument("--providers", type=_names, default=None, help="default: all that import")
    ap.add_argument("--skip-providers", type=_names, default=[], help="leave these out")
    ap.add_argument("--decode-lens", type=_ints, default=None, help="KV lengths, default 1k..128k")
    ap.add_argument("--decode-head-dim", type=int, default=None, help="default 128")
    ap.add_argument("--decode-kv-heads", type=int, default=None, help="default: = heads (MHA)")
    ap.add_argument("--decode-batch", type=int, default=1)
    ap.add_argument("--no-kernel", action="store_true", help="skip the prefill/training shapes")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode benchmark")
    ap.add_argument("--no-varlen", action="store_true", help="skip the packed-sequences case")
    ap.add_argument(
        "--varlen-lengths", type=_ints, default=None, help="LO,HI: lengths drawn uniformly"
    )
    ap.add_argument("--varlen-tokens", type=int, default=None, help="tokens a varlen batch")
    ap.add_argument(
        "--varlen-providers", type=_names, default=None, help="default: all that run here"
    )
    ap.add_argument("--no-kvcache", action="store_true", help="skip the ragged KV-cache case")
    ap.add_argument("--kvcache-batches", type=_ints, default=None, help="default 1,2,...,64")
    ap.add_argument(
        "--kvcache-lengths", type=_ints, default=None, help="LO,HI: cache lengths drawn uniformly"
    )
    ap.add_argument("--kvcache-heads", type=_ints, default=None, help="H,HKV (default 32,8)")
    ap.add_argument("--kvcache-head-dim", type=int, default=None, help="default 128")
    ap.add_argument(
        "--kvcache-providers", type=_names, default=None, help="default: all that run here"
    )
    ap.add_argument(
        "--kvcache-budget-s",
        type=float,
        default=float("inf"),
        help="the KV-cache case starts no new batch size after this long (its own share)",
    )
    ap.add_argument("--warmup-ms", type=float, default=None, help="do_bench warm-up (default 25)")
    ap.add_argument("--rep-ms", type=float, default=None, help="do_bench repetition (default 100)")
    ap.add_argument(
        "--budget-s", type=float, default=float("inf"), help="start no new shape after this long"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default: bench/results of the source checkout, else "
        "./bench-results; tiny runs in its tiny/)",
    )
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--full-table", action="store_true", help="print every configuration")
    ap.add_argument(
        "--from-json", type=Path, default=None, help="redraw the plots and tables of a results file"
    )
    args = ap.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    args.device = torch.device(args.device)
    profile = "tiny" if args.tiny else "cpu" if args.device.type == "cpu" else "gpu"
    out = default_results_dir() / "tiny" if args.tiny else default_results_dir()
    defaults = {**PROFILES[profile], "out": out}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in args.dtypes:
        if name not in DTYPES:
            ap.error(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    for mode in args.modes:
        if mode not in MODES:
            ap.error(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if len(args.varlen_lengths) != 2 or not 0 < args.varlen_lengths[0] <= args.varlen_lengths[1]:
        ap.error(f"--varlen-lengths needs LO,HI with 0 < LO <= HI, got {args.varlen_lengths}")
    lo_hi, heads = args.kvcache_lengths, args.kvcache_heads
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
        ap.error(f"--kvcache-lengths needs LO,HI with 0 < LO <= HI, got {lo_hi}")
    if len(heads) != 2 or min(heads) <= 0 or heads[0] % heads[1]:
        ap.error(f"--kvcache-heads needs H,HKV with HKV dividing H, got {heads}")
    for d in args.head_dims + [args.decode_head_dim]:
        if d <= 0 or args.hidden % d:
            ap.error(f"hidden size {args.hidden} is not a multiple of head dim {d}")
    return args


def _providers(args: argparse.Namespace) -> dict | None:
    """The providers this run measures; None (and a line on stderr) for unknown names."""
    provs = available_providers(args.device)
    if args.providers is not None:
        unknown = [n for n in args.providers if n not in provs]
        if unknown:
            have = ", ".join(provs)
            print(f"not available here: {', '.join(unknown)} (have {have})", file=sys.stderr)
            return None
        provs = {n: provs[n] for n in args.providers}
    return {n: p for n, p in provs.items() if n not in args.skip_providers}


def _new_results(args: argparse.Namespace, provs: dict) -> dict:
    """The results dict a run fills: machine, arguments, providers, empty record lists."""
    return {
        "schema": 1,
        "machine": machine_info(args.device),
        "args": {k: jsonable(v) for k, v in vars(args).items()},
        "providers": list(provs),
        "flops": "4*B*H*Tq*Tk*D, x0.5 causal, x2.5 bwd, x3.5 fwd_bwd (flash-attn)",
        "copy_gbps": None,
        "kernel": [],
        "decode": [],
        "varlen": [],
        "kvcache": [],
        "kvcache_lengths": {},
        "speedups": [],
        "skipped": [],
        "complete": False,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        pngs = [] if args.no_plot else plot(results, args.from_json)
        print("\n".join(["", *map(str, pngs), "", summary(results, args.full_table)]))
        return 0
    device, provs = args.device, _providers(args)
    if provs is None:
        return 2
    path = results_path(args.out, device, "-tiny" if args.tiny else "")
    run = Run(args, provs, device, _new_results(args, provs), path)
    results = run.results
    print(
        f"fastgpt bench on {results['machine']['name']}: {', '.join(provs)} -> {path}", flush=True
    )
    copy_bytes = 2**30 if device.type == "cuda" else 64 * MIB
    results["copy_gbps"] = copy_bandwidth_gbps(device, copy_bytes, args.warmup_ms, args.rep_ms)
    print(f"  copy bandwidth: {results['copy_gbps']:.0f} GB/s", flush=True)
    # Decode first: it is quick, and the run may stop on budget before the last kernel shapes.
    if not args.no_decode:
        run_decode(run)
    if not args.no_kvcache:
        run_kvcache(run)
    if not args.no_varlen:
        run_varlen(run)
    if not args.no_kernel:
        run_kernels(run)
    results["speedups"] = speedups(results["kernel"], {n: p.fastgpt for n, p in provs.items()})
    results["complete"] = not results["skipped"]
    results["seconds"] = round(run.seconds(), 1)
    write_json(path, results)
    print(summary(results, full=True) if args.full_table else "")
    pngs = [] if args.no_plot else plot(results, path)
    print("\n".join(["", *map(str, [path, *pngs]), ""]))
    if results["skipped"]:
        print(f"skipped on budget: {', '.join(results['skipped'])}")
    print(summary(results, full=False))
    return 0
