"""Time sliding-window attention on CPU: the cpp kernel's cost grows linearly in T.

    python bench/cpu/window.py [--lengths 1024,2048,4096,8192,16384] [--windows 256,512]
                               [--rounds 3] [--no-backward]

fp32, B=1, H=8, D=64, causal, torch.get_num_threads() threads. For each T: full causal attention
and a causal sliding window of W keys back (window=(W, 0)), forward and forward+backward, each
the median wall time of `rounds` calls after one warm-up. With a window the kernel skips the key
blocks wholly outside it, so ms per token stays flat as T grows (O(T W)); full causal grows with T
(O(T^2)). Prints only: no results file.
"""

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

import fastgpt
from fastgpt import bench

B, H, D = 1, 8, 64


def call(T: int, window: int | None, grad: bool) -> Callable[[], None]:
    """One cpp attention call on fixed (B, H, T, D) data: forward, or forward+backward."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, H, T, D, generator=gen) for _ in range(4))
    args = dict(causal=True, backend="cpp", window=None if window is None else (window, 0))

    def run() -> None:
        if not grad:
            with torch.no_grad():
                fastgpt.attention(q, k, v, **args)
            return
        xs = [t.detach().requires_grad_() for t in (q, k, v)]
        fastgpt.attention(*xs, **args).backward(do)

    return run


def median_ms(fn: Callable[[], None], rounds: int) -> float:
    """Median wall ms of `rounds` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--windows", default="256,512")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-backward", action="store_true")
    args = parser.parse_args(argv)
    lengths = [int(t) for t in args.lengths.split(",")]
    configs: list[int | None] = [None, *(int(w) for w in args.windows.split(","))]
    modes = [("forward", False)] + ([] if args.no_backward else [("fwd+bwd", True)])
    print(
        f"{bench.cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}\nfp32 B={B} H={H} D={D} causal, cpp backend",
        flush=True,
    )
    print(f"{'mode':8s} {'attention':12s} {'T':>6s} {'ms':>10s} {'us/token':>9s}", flush=True)
    for mode, grad in modes:
        for window in configs:
            name = "full causal" if window is None else f"window {window}"
            for T in lengths:
                ms = median_ms(call(T, window, grad), args.rounds)
                print(f"{mode:8s} {name:12s} {T:6d} {ms:10.2f} {ms * 1e3 / T:9.2f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
