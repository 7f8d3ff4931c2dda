"""CPU decode step over a KV cache: fastgpt's cpp kernel against torch SDPA on a padded cache.

    python bench/cpu/kvcache_decode.py [--batch 8] [--min-len 1024] [--max-len 8192] [--threads 1]

One decode step (Tq = 1) for B sequences of lengths drawn uniformly in [min_len, max_len]:
- cpp: fastgpt::cpp_attention_kvcache on a dense (B, Tmax, Hkv, D) cache with per-sequence lengths,
  and on a paged cache (pages of 256 rows, shuffled block table);
- sdpa: F.scaled_dot_product_attention over the cache padded to the longest sequence, heads first
  (B, Hkv, Tmax, D), a boolean key-padding mask, enable_gqa=True; and "sdpa, kv expanded", the
  same with K/V already repeated to H heads (the expansion not timed: SDPA's best case).
Prints, per provider, the median wall time and the minimum process CPU time (both threads summed)
over interleaved repetitions, decode tokens/s (B per step) and the K/V bytes each step must read.
"""

import argparse
import time

import torch
import torch.nn.functional as F

import fastgpt  # noqa: F401  (loads the extension)
import fastgpt.kvcache_ops  # noqa: F401


def make_inputs(args: argparse.Namespace) -> dict:
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
    lens = torch.randint(args.min_len, args.max_len + 1, (B,), generator=g, dtype=torch.int32)
    Tmax = int(lens.max())
    q = torch.randn(B, 1, H, D, generator=g)  # (B, 1, H, D)
    k = torch.randn(B, Tmax, Hkv, D, generator=g)  # (B, Tmax, Hkv, D)
    v = torch.randn(B, Tmax, Hkv, D, generator=g)
    page = 256
    per_seq = -(-Tmax // page)
    order = torch.randperm(B * per_seq, generator=g)
    table = order.view(B, per_seq).to(torch.int32)  # (B, max_blocks)
    k_pages = torch.empty(B * per_seq, page, Hkv, D)
    v_pages = torch.empty_like(k_pages)
    padded = torch.zeros(B, per_seq * page, Hkv, D)
    for src, dst in ((k, k_pages), (v, v_pages)):
        padded[:, :Tmax] = src
        dst[table.flatten().long()] = padded.view(B * per_seq, page, Hkv, D)
    mask = torch.arange(Tmax)[None, :] < lens[:, None].long()  # (B, Tmax)
    k_hf, v_hf = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # (B, Hkv, T, D)
    return dict(
        lens=lens, q=q, k=k, v=v, table=table, k_pages=k_pages, v_pages=v_pages,
        q_hf=q.transpose(1, 2).contiguous(), k_hf=k_hf, v_hf=v_hf, mask=mask[:, None, None, :],
        k_rep=k_hf.repeat_interleave(H // Hkv, 1), v_rep=v_hf.repeat_interleave(H // Hkv, 1),
    )  # fmt: skip


def providers(x: dict, scale: float) -> dict:
    op = torch.ops.fastgpt.cpp_attention_kvcache
    return {
        "cpp dense": lambda: op(x["q"], x["k"], x["v"], x["lens"], None, True, scale),
        "cpp paged 256": lambda: op(
            x["q"], x["k_pages"], x["v_pages"], x["lens"], x["table"], True, scale
        ),
        "sdpa padded, gqa": lambda: F.scaled_dot_product_attention(
            x["q_hf"], x["k_hf"], x["v_hf"], attn_mask=x["mask"], scale=scale, enable_gqa=True
        ).transpose(1, 2),
        "sdpa padded, kv expanded": lambda: F.scaled_dot_product_attention(
            x["q_hf"], x["k_rep"], x["v_rep"], attn_mask=x["mask"], scale=scale
        ).transpose(1, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=1024)
    parser.add_argument("--max-len", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x = make_inputs(args)
    scale = args.head_dim**-0.5
    runs = providers(x, scale)
    ref = runs["sdpa padded, kv expanded"]()
    for name, fn in runs.items():  # warm up, and the same answer everywhere
        err = (fn() - ref).abs().max().item()
        assert err < 1e-4, f"{name} differs from sdpa by {err:.3g}"
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for _ in range(args.reps):  # interleaved: load swings hit every provider alike
        for name, fn in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    lens = x["lens"].long()
    valid = int(lens.sum()) * args.kv_heads * args.head_dim * 4 * 2  # K and V bytes, fp32
    padded = lens.numel() * int(lens.max()) * args.kv_heads * args.head_dim * 4 * 2
    print(f"B={args.batch} H={args.heads} Hkv={args.kv_heads} D={args.head_dim} fp32, lengths "
          f"{lens.tolist()}, {torch.get_num_threads()} threads; K/V bytes valid "
          f"{valid / 2**20:.0f} MiB, padded {padded / 2**20:.0f} MiB")  # fmt: skip
    base = sorted(wall["cpp dense"])[len(wall["cpp dense"]) // 2]
    for name in runs:
        med = sorted(wall[name])[len(wall[name]) // 2]
        print(
            f"{name:26s} wall {med * 1e3:7.2f} ms  cpu {min(cpu[name]) * 1e3:7.2f} ms  "
            f"{args.batch / med:8.0f} tokens/s  {valid / med / 1e9:5.2f} GB/s of valid K/V  "
            f"cpp dense speedup {med / base:4.2f}x"
        )


if __name__ == "__main__":
    main()
