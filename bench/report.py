"""Reports: short markdown tables and PNG plots of a results dict."""

from pathlib import Path

from fastgpt.bench.timing import MODES


def format_number(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def markdown_table(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def kernel_table(results: dict, dtype: str, d: int, causal: bool, mode: str) -> str | None:
    want = (dtype, d, causal, mode)
    recs = [r for r in results["kernel"] if (r["dtype"], r["d"], r["causal"], r["mode"]) == want]
    names = list(dict.fromkeys(r["provider"] for r in recs if r["ms"] is not None))
    if not names:
        return None
    seqlens = sorted({r["tq"] for r in recs})
    cell = {(r["provider"], r["tq"]): r for r in recs}
    ms = {key: r["ms"] for key, r in cell.items() if r["ms"] is not None}
    # Speed-up columns: each fastgpt provider against torch SDPA's flash backend, the target.
    ours = [n for n in names if n.startswith("fastgpt-")] if "sdpa-flash" in names else []
    rows = [["T", *names, *(f"{n.removeprefix('fastgpt-')} / sdpa-flash" for n in ours)]]
    for t in seqlens:
        row = [str(t)]
        for n in names:
            r = cell.get((n, t))
            row.append(format_number(r["tflops"]) if r and r["ms"] is not None else "-")
        for n in ours:
            ok = (n, t) in ms and ("sdpa-flash", t) in ms
            row.append(f"{ms['sdpa-flash', t] / ms[n, t]:.2f}x" if ok else "-")
        rows.append(row)
    title = f"{dtype}, D={d}, {'causal' if causal else 'non-causal'}, {mode}: TFLOP/s"
    return f"{title}\n\n{markdown_table(rows)}"


def memory_table(results: dict, dtype: str, d: int, causal: bool, mode: str) -> str | None:
    """Peak memory one call allocates (CUDA only), per provider and T."""
    want = (dtype, d, causal, mode)
    recs = [
        r
        for r in results["kernel"]
        if (r["dtype"], r["d"], r["causal"], r["mode"]) == want and r["peak_mib"] is not None
    ]
    if not recs:
        return None
    names = list(dict.fromkeys(r["provider"] for r in recs))
    cell = {(r["provider"], r["tq"]): r["peak_mib"] for r in recs}
    rows = [["T", *names]]
    for t in sorted({r["tq"] for r in recs}):
        rows.append([str(t), *(f"{cell[n, t]:.0f}" if (n, t) in cell else "-" for n in names)])
    title = f"{dtype}, D={d}, {'causal' if causal else 'non-causal'}, {mode}: peak MiB above inputs"
    return f"{title}\n\n{markdown_table(rows)}"


def decode_table(results: dict) -> str | None:
    recs = results["decode"]
    names = list(dict.fromkeys(r["provider"] for r in recs if r["ms"] is not None))
    if not names:
        return None
    cell = {(r["provider"], r["tk"]): r for r in recs}
    rows = [["Tk", *names]]
    for tk in sorted({r["tk"] for r in recs}):
        row = [str(tk)]
        for n in names:
            r = cell.get((n, tk))
            ok = r and r["ms"] is not None
            row.append(
                f"{format_number(r['gbps'])} ({100 * r['copy_fraction']:.0f}%)" if ok else "-"
            )
        rows.append(row)
    title = f"decode (Tq=1): GB/s (% of copy bandwidth {results['copy_gbps']:.0f} GB/s)"
    return f"{title}\n\n{markdown_table(rows)}"


def varlen_table(results: dict) -> str | None:
    """The varlen case: ms and useful TFLOP/s per provider and mode, speed-up over sdpa-padded."""
    recs = results.get("varlen", [])
    cell = {(r["provider"], r["mode"]): r for r in recs if r["ms"] is not None}
    if not cell:
        return None
    names = list(dict.fromkeys(r["provider"] for r in recs))
    modes = list(dict.fromkeys(r["mode"] for r in recs))
    rows = [
        ["provider", *(f"{m} {unit}" for m in modes for unit in ("ms", "TFLOP/s", "vs padded"))]
    ]
    for n in names:
        row = [n]
        for m in modes:
            r, base = cell.get((n, m)), cell.get(("sdpa-padded", m))
            row += [format_number(r["ms"]), format_number(r["tflops"])] if r else ["-", "-"]
            row.append(f"{base['ms'] / r['ms']:.2f}x" if r and base else "-")
        rows.append(row)
    r = recs[0]
    title = (
        f"varlen: {r['sequences']} causal sequences of {r['lo']}..{r['hi']} tokens ({r['tokens']} "
        f"tokens, {r['padded_tokens']} padded), {r['dtype']}, H={r['heads']}, D={r['d']}; useful "
        "TFLOP/s"
    )
    return f"{title}\n\n{markdown_table(rows)}"


def kvcache_table(results: dict) -> str | None:
    """The ragged KV-cache case: per batch size, each provider's tokens/s and GB/s (% of copy)."""
    recs = results.get("kvcache", [])
    cell = {(r["provider"], r["batch"]): r for r in recs if r["ms"] is not None}
    if not cell:
        return None
    names = list(dict.fromkeys(name for name, _ in cell))
    copy = results["copy_gbps"]
    rows = [["B", "keys", *names]]
    for batch in sorted({b for _, b in cell}):
        r0 = next(r for r in recs if r["batch"] == batch)
        row = [str(batch), f"{r0['total_keys']} (max {r0['max_len']})"]
        for n in names:
            r = cell.get((n, batch))
            pct = f" ({100 * r['gbps'] / copy:.0f}%)" if r and copy else ""
            row.append(
                f"{format_number(r['tokens_per_s'])} tok/s, {format_number(r['gbps'])} GB/s{pct}"
                if r
                else "-"
            )
        rows.append(row)
    r = recs[0]
    title = (
        f"KV-cache decode (Tq=1), ragged cache lengths {r['lo']}..{r['hi']}, {r['dtype']}, "
        f"H={r['heads']}, Hkv={r['kv_heads']}, D={r['d']}: tokens/s, GB/s of the valid K/V + q/out "
        f"(% of copy bandwidth {copy:.0f} GB/s)"
    )
    return f"{title}\n\n{markdown_table(rows)}"


def accuracy_warnings(results: dict, limit: float = 2e-2) -> list[str]:
    """Forward outputs further than `limit` (relative) from the fp32 reference."""

    def where(r: dict) -> str:
        if "total_keys" in r:  # the KV-cache case
            return f"{r['provider']} kvcache {r['dtype']} B={r['batch']}"
        if "tq" not in r:  # the varlen case
            return f"{r['provider']} varlen {r['dtype']} D={r['d']}"
        return f"{r['provider']} {r['dtype']} D={r['d']} T={r['tq']} causal={r['causal']}"

    return [
        f"WARNING: {where(r)}: relative error {r['rel_err']:.2e} against the reference"
        for r in [*results["kernel"], *results["decode"], *results.get("varlen", [])]
        + results.get("kvcache", [])
        if r.get("rel_err") is not None and not r["rel_err"] < limit  # NaN is caught too
    ]


def summary(results: dict, full: bool) -> str:
    """Markdown tables: every configuration when full, else the headline ones."""
    a = results["args"]
    m = results["machine"]
    parts = [f"{m['name']}, torch {m['torch']}, triton {m['triton']}, commit {m['git_commit']}"]
    parts += accuracy_warnings(results)
    modes = a["modes"] if full else [m for m in ("fwd", "fwd_bwd") if m in a["modes"]]
    for dtype_name in a["dtypes"] if full else a["dtypes"][:1]:
        for causal in (True, False) if full else (True,):
            for d in a["head_dims"]:
                tables = [kernel_table(results, dtype_name, d, causal, m) for m in modes]
                if full and "fwd_bwd" in modes:
                    tables.append(memory_table(results, dtype_name, d, causal, "fwd_bwd"))
                parts += filter(None, tables)
    parts.append(decode_table(results) or "")
    parts.append(varlen_table(results) or "")
    parts.append(kvcache_table(results) or "")
    return "\n\n".join(p for p in parts if p)


def plot(results: dict, path: Path) -> list[Path]:
    """TFLOP/s vs T per provider (one panel per dtype, D, causal, mode) and decode GB/s vs Tk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    recs = [r for r in results["kernel"] if r["ms"] is not None]
    groups = sorted({(r["dtype"], r["d"]) for r in recs})
    cols = sorted(
        {(r["causal"], r["mode"]) for r in recs}, key=lambda c: (not c[0], MODES.index(c[1]))
    )
    names = list(dict.fromkeys(r["provider"] for r in recs))
    if groups and cols:
        size = (4 * len(cols), 3.2 * len(groups))
        fig, axes = plt.subplots(len(groups), len(cols), figsize=size, squeeze=False)
        panels = [(i, j, g, c) for i, g in enumerate(groups) for j, c in enumerate(cols)]
        for i, j, (dtype_name, d), (causal, mode) in panels:
            ax = axes[i][j]
            for name in names:
                want = (name, dtype_name, d, causal, mode)
                pts = sorted(
                    (r["tq"], r["tflops"])
                    for r in recs
                    if (r["provider"], r["dtype"], r["d"], r["causal"], r["mode"]) == want
                )
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{dtype_name} D={d} {'causal' if causal else 'full'} {mode}", fontsize=9)
            ax.set_xlabel("T")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(results["machine"]["name"], fontsize=10)
        fig.tight_layout()
        written.append(path.with_name(path.stem + "-kernels.png"))
        fig.savefig(written[-1], dpi=80)
        plt.close(fig)
    dec = [r for r in results["decode"] if r["ms"] is not None]
    if dec:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in dict.fromkeys(r["provider"] for r in dec):
            pts = sorted((r["tk"], r["gbps"]) for r in dec if r["provider"] == name)
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.axhline(results["copy_gbps"], color="k", ls="--", lw=1, label="copy bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set(xlabel="keys (Tk)", ylabel="GB/s", title=f"decode, {results['machine']['name']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(path.with_name(path.stem + "-decode.png"))
        fig.savefig(written[-1], dpi=80)
        plt.close(fig)
    written += plot_kvcache(results, path)
    return written


def plot_kvcache(results: dict, path: Path) -> list[Path]:
    """The KV-cache case: GB/s vs batch size per provider, the copy bandwidth dashed."""
    import matplotlib.pyplot as plt

    recs = [r for r in results.get("kvcache", []) if r["ms"] is not None]
    if not recs:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["provider"] for r in recs):
        pts = sorted((r["batch"], r["gbps"]) for r in recs if r["provider"] == name)
        ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    if results["copy_gbps"]:
        ax.axhline(results["copy_gbps"], color="k", ls="--", lw=1, label="copy bandwidth")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    r = recs[0]
    title = f"ragged KV-cache decode ({r['lo']}..{r['hi']} keys), {results['machine']['name']}"
    ax.set(xlabel="batch (sequences)", ylabel="GB/s (valid K/V + q/out)", title=title)
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = path.with_name(path.stem + "-kvcache.png")
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return [out]
