"""Training benchmark: tokens/s and MFU of the GPT with each attention backend, in one run.

    python bench/train.py                  # GPU: "gpt2" preset, bf16 autocast
    python bench/train.py --device cpu     # CPU: "small" preset, fp32
    python bench/train.py --tiny           # smoke run (tests/test_bench.py)

The same model (same initial weights) trains on the same random token batches once per attention:
fastgpt's backends ("triton", "cpp", "reference") through GPTConfig.backend, and torch SDPA
("sdpa") given to the model as GPT(config, attention_fn=...). Only the attention differs.

FLOPs per token are counted as nanoGPT does, 6 N + 12 L H Q T (N parameters without the position
embedding, L layers, H heads, Q head dim, T context), and MFU is against the GPU's dense bf16 peak
(datasheet; a measured bf16 matrix product where the GPU is not listed) or, on CPU, against a
measured fp32 matrix product. Results go to <out>/<machine>-<date>-train.json (--out, by default
the source checkout's bench/results).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import bench
from fastgpt.bench.timing import recording_failure
from fastgpt.model import GPT, preset_config

ATTENTIONS = ("triton", "cpp", "reference", "sdpa")
PROFILES = {
    "gpu": dict(preset="gpt2", vocab=50304, batch=16, seq_len=1024, warmup=3, steps=10),
    "cpu": dict(preset="small", vocab=65, batch=8, seq_len=256, warmup=2, steps=5),
    "tiny": dict(preset="tiny", vocab=64, batch=2, seq_len=6, warmup=1, steps=2),
}


def sdpa_attention(q, k, v, *, causal=True, scale=None, backend=None):
    """torch SDPA with fastgpt.attention's signature (training: Tq == Tk, so is_causal agrees)."""
    extra = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **extra)


def train_steps(attention: str, args, batches: torch.Tensor, device: torch.device) -> dict:
    """Train a fresh model (seeded) on `batches`; time the steps after the warm-up ones."""
    backend = None if attention == "sdpa" else attention
    overrides = dict(vocab_size=args.vocab, block_size=args.seq_len, dropout=0.0, backend=backend)
    attention_fn = sdpa_attention if attention == "sdpa" else None
    torch.manual_seed(0)  # same initial weights for every attention
    model = GPT(preset_config(args.preset, **overrides), attention_fn).to(device)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, **fused)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i, batch in enumerate(batches):  # batch: (B, T + 1) token ids
        if i == args.warmup:
            bench.sync(device)
            start = time.perf_counter()
        with autocast:
            _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    last_loss = loss.item()  # also waits for the device
    elapsed = time.perf_counter() - start
    steps = len(batches) - args.warmup
    tokens_per_s = steps * args.batch * args.seq_len / elapsed
    cuda = device.type == "cuda"
    return {
        "ms_per_step": 1e3 * elapsed / steps,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": model.flops_per_token(args.seq_len),
        "loss": last_loss,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    }


def peak_tflops(device: torch.device) -> tuple[float, str]:
    """(TFLOP/s, where it came from) to compute MFU against."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        listed = bench.peak_bf16_tflops(name)
        if listed is not None:
            return listed, f"datasheet dense bf16 peak of {name}"
        return bench.matmul_tflops(device, torch.bfloat16, 8192, 25, 100), "measured bf16 matmul"
    return bench.matmul_tflops(device, torch.float32, 1024, 10, 200), "measured fp32 matmul 1024^3"


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="bench/train.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run at tiny sizes")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--preset", default=None, help="model preset (gpt2 on GPU, small on CPU)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size of the random data")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=None, help="timed steps")
    ap.add_argument("--attention", default=None, help=f"comma list of {','.join(ATTENTIONS)}")
    ap.add_argument("--budget-s", type=float, default=math.inf, help="start no new run after")
    ap.add_argument(
        "--out", type=Path, default=None, help="results folder (default: as fastgpt bench --help)"
    )
    ap.add_argument("--from-json", type=Path, default=None, help="print a results file's table")
    args = ap.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    args.device = torch.device(args.device)
    profile = "tiny" if args.tiny else "cpu" if args.device.type == "cpu" else "gpu"
    out = bench.default_results_dir() / "tiny" if args.tiny else bench.default_results_dir()
    for key, value in {**PROFILES[profile], "out": out}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.seq_len < 1:
        ap.error("--steps, --batch and --seq-len must be at least 1 and --warmup at least 0")
    have = fastgpt.available_backends(args.device)
    wanted = args.attention.split(",") if args.attention else [*have, "sdpa"]
    for name in wanted:
        if name not in ATTENTIONS:
            ap.error(f"unknown attention {name!r}; expected one of {', '.join(ATTENTIONS)}")
    args.attention = wanted
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        print(table(json.loads(args.from_json.read_text())))
        return 0
    device = args.device
    path = bench.results_path(args.out, device, "-train-tiny" if args.tiny else "-train")
    peak, peak_source = peak_tflops(device)
    gen = torch.Generator().manual_seed(0)
    shape = (args.warmup + args.steps, args.batch, args.seq_len + 1)
    batches = torch.randint(0, args.vocab, shape, generator=gen).to(device)  # same data for all
    results = {
        "schema": 1,
        "machine": bench.machine_info(device),
        "args": {k: bench.jsonable(v) for k, v in vars(args).items()},
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "flops_per_token": None,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "runs": [],
        "skipped": [],
    }
    print(f"training benchmark on {results['machine']['name']}: {args.preset}, -> {path}")
    started = time.perf_counter()
    for attention in args.attention:
        if time.perf_counter() - started > args.budget_s:
            results["skipped"].append(attention)
            continue
        record = {"attention": attention, "error": None}
        with recording_failure(record, device):  # a backend may fail (e.g. out of memory)
            record.update(train_steps(attention, args, batches, device))
            record["mfu"] = record["flops_per_token"] * record["tokens_per_s"] / (peak * 1e12)
            results["flops_per_token"] = record["flops_per_token"]
        results["runs"].append(record)
        print(
            f"  {attention}: {record.get('tokens_per_s', 0):.0f} tokens/s {record['error'] or ''}"
        )
        bench.write_json(path, results)
    bench.write_json(path, results)
    print(table(results))
    return 0


def table(results: dict) -> str:
    sdpa = next((r for r in results["runs"] if r["attention"] == "sdpa" and not r["error"]), None)
    rows = [["attention", "tokens/s", "MFU", "ms/step", "peak GiB", "loss", "vs sdpa"]]
    for r in results["runs"]:
        if r["error"]:
            rows.append([r["attention"], r["error"], "", "", "", "", ""])
            continue
        rows.append([
            r["attention"],
            f"{r['tokens_per_s']:.0f}",
            f"{100 * r['mfu']:.1f}%",
            f"{r['ms_per_step']:.1f}",
            f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-",
            f"{r['loss']:.3f}",
            f"{r['tokens_per_s'] / sdpa['tokens_per_s']:.2f}x" if sdpa else "-",
        ])  # fmt: skip
    a, peak = results["args"], bench.format_number(results["peak_tflops"])
    title = (
        f"training, {a['preset']} preset, batch {a['batch']} x {a['seq_len']} tokens, "
        f"{results['precision']}, MFU vs {results['peak_source']} ({peak} TFLOP/s), "
        f"{results['machine']['name']}"
    )
    return f"{title}\n\n{bench.markdown_table(rows)}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
