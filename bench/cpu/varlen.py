"""Time packed variable-length attention on CPU: cpp varlen against padded dense SDPA and cpp.

    python bench/cpu/varlen.py [--tokens 8192] [--min-len 128] [--max-len 2048] [--rounds 5]

Sequence lengths are drawn uniform in [min-len, max-len] (seeded) until the batch holds about
`tokens` tokens; fp32, H=8, D=64, causal, torch.get_num_threads() threads. Three providers:

    cpp varlen   fastgpt.attention_varlen(backend="cpp") on the packed (total, H, D) tensors
    sdpa padded  F.scaled_dot_product_attention(is_causal=True) on (B, H, max_len, D), zero padded
    cpp padded   fastgpt.attention(backend="cpp") on the same padded tensors

Only the attention call is timed (the padded tensors are built beforehand, which favours the
padded providers). Each round runs the three in a rotating order, so a burst of load from other
jobs hits all alike; the table gives each one's median wall time and the median over rounds of
the per-round ratio (padded time / varlen time). The varlen output and gradients are checked
against SDPA's on the real rows first. Prints only: no results file.
"""

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import bench
from fastgpt.varlen import cu_seqlens_from_lengths

H, D = 8, 64
PROVIDERS = ("cpp varlen", "sdpa padded", "cpp padded")


def draw_lengths(tokens: int, low: int, high: int, seed: int = 0) -> list[int]:
    """Lengths uniform in [low, high] until their sum reaches `tokens` (the last one trimmed)."""
    gen = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < tokens:
        n = int(torch.randint(low, high + 1, (1,), generator=gen))
        lengths.append(min(n, tokens - sum(lengths)))
    return lengths


def pad(packed: torch.Tensor, lengths: list[int], width: int) -> torch.Tensor:
    """(total, H, D) -> (B, H, width, D), zeros after each sequence's end."""
    out = packed.new_zeros(len(lengths), width, *packed.shape[1:])  # (B, width, H, D)
    for b, piece in enumerate(packed.split(lengths)):
        out[b, : len(piece)] = piece
    return out.transpose(1, 2).contiguous()  # (B, H, width, D)


def unpad(padded: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(B, H, width, D) -> (total, H, D): the real rows only."""
    return torch.cat([padded[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)])


def providers(lengths: list[int], grad: bool) -> dict[str, Callable[[], list[torch.Tensor]]]:
    """One call per provider on fixed data (forward, or forward+backward into fresh .grad),
    returning the packed output (forward) or packed dq, dk, dv (forward+backward)."""
    total, width = sum(lengths), max(lengths)
    gen = torch.Generator().manual_seed(1)
    packed = [torch.randn(total, H, D, generator=gen) for _ in range(4)]  # q, k, v, grad_out
    cu = cu_seqlens_from_lengths(lengths)
    padded = [pad(t, lengths, width) for t in packed]
    leaves = {"cpp varlen": packed[:3], "sdpa padded": padded[:3], "cpp padded": padded[:3]}
    attend = {
        "cpp varlen": lambda q, k, v: fastgpt.attention_varlen(
            q, k, v, cu, cu, width, width, causal=True, backend="cpp"
        ),
        "sdpa padded": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "cpp padded": lambda q, k, v: fastgpt.attention(q, k, v, causal=True, backend="cpp"),
    }

    def call(name: str) -> list[torch.Tensor]:
        xs = [t.detach().requires_grad_(grad) for t in leaves[name]]
        if not grad:
            with torch.no_grad():
                out = attend[name](*xs)
            return [out if name == "cpp varlen" else unpad(out, lengths)]
        grad_out = packed[3] if name == "cpp varlen" else padded[3]
        attend[name](*xs).backward(grad_out)
        return [x.grad if name == "cpp varlen" else unpad(x.grad, lengths) for x in xs]

    return {name: (lambda name=name: call(name)) for name in PROVIDERS}


def measure(calls: dict[str, Callable[[], list[torch.Tensor]]], rounds: int) -> dict:
    """Wall ms per call of each provider over `rounds` rotating rounds, after one checked call."""
    want = calls["sdpa padded"]()
    for name in ("cpp varlen", "cpp padded"):
        for got, ref in zip(calls[name](), want, strict=True):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-3)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(rounds):
        for name in PROVIDERS[i % 3 :] + PROVIDERS[: i % 3]:
            start = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def report(kind: str, times: dict[str, list[float]]) -> None:
    base = times["cpp varlen"]
    for name, ms in times.items():
        line = f"{kind:17s} {name:12s} median {statistics.median(ms):8.1f} ms"
        if name != "cpp varlen":
            ratios = [t / b for t, b in zip(ms, base, strict=True)]
            line += f"   {name} / cpp varlen: {statistics.median(ratios):.2f}x (median of rounds)"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--min-len", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    lengths = draw_lengths(args.tokens, args.min_len, args.max_len)
    padded = len(lengths) * max(lengths)
    print(
        f"{bench.cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}\n"
        f"fp32 H={H} D={D} causal; {len(lengths)} sequences, {sum(lengths)} tokens "
        f"(padded: {padded}, {padded / sum(lengths):.2f}x); lengths {lengths}",
        flush=True,
    )
    for kind, grad in (("forward", False), ("forward+backward", True)):
        report(kind, measure(providers(lengths, grad), args.rounds))
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
