"""Run the CPU benchmark suite once and write its summary: bench/results/cpu-<date>.md (+ .json).

    python bench/cpu/run.py [--out bench/results] [--note "machine shared with other jobs"]

Runs bench/cpu/test_cpu_attention.py under pytest-benchmark, then tabulates median times per
provider, the speed-ups of fastgpt's cpp backend over torch SDPA and the reference path, and the
peak-memory rise of forward+backward at T=8192 (B=1, H=2, D=64) for each provider, beside the
targets of the C++ extension issue. The CPU is named from lscpu; the load average before and
after says how busy the machine was.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fastgpt import bench

HERE = Path(__file__).resolve().parent
NAMES = bench.CPU_PEERS  # ("cpp", "sdpa", "reference")


def lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"Model name": bench.cpu_name(), "CPU(s)": str(os.cpu_count())}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def medians(raw: dict) -> dict[tuple[str, int, str], float]:
    """(kind, T, provider) -> median milliseconds."""
    out = {}
    for b in raw["benchmarks"]:
        info = b["extra_info"]
        out[(info["kind"], info["t"], info["provider"])] = 1e3 * b["stats"]["median"]
    return out


def summary(raw: dict, peaks: dict[str, float | str], cpu: dict[str, str], note: str) -> str:
    ms = medians(raw)
    kinds = ("forward", "forward+backward")
    seqlens = sorted({t for (_, t, _) in ms})
    rows = [["pass", "T", *(f"{n} ms" for n in NAMES), "cpp vs sdpa", "cpp vs reference"]]
    for kind in kinds:
        for t in seqlens:
            got = {n: ms.get((kind, t, n)) for n in NAMES}
            ratio = lambda peer: (
                f"{got[peer] / got['cpp']:.2f}x" if got["cpp"] and got[peer] else "-"  # noqa: B023
            )
            cells = [f"{got[n]:.2f}" if got[n] else "-" for n in NAMES]
            rows.append([kind, str(t), *cells, ratio("sdpa"), ratio("reference")])
    peak_rows = [["provider", "peak rise, MiB"]]
    peak_rows += [[n, f"{v:.0f}" if isinstance(v, float) else v] for n, v in peaks.items()]
    model = cpu.get("Model name", "?").strip()
    flags = cpu.get("Flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    detail = ", ".join(
        f"{key.lower()} {cpu[key].strip()}"
        for key in ("CPU family", "Model", "Hypervisor vendor")
        if key in cpu
    )
    threads = torch.get_num_threads()
    before, after = (", ".join(f"{x:.2f}" for x in raw[k]) for k in ("load_before", "load_after"))
    lines = [
        f"# CPU attention benchmark, {raw['date']}",
        "",
        f"Machine: {model} ({detail}; {isa}), {cpu.get('CPU(s)', '?').strip()} CPUs "
        f"({cpu.get('Thread(s) per core', '?').strip()} thread(s) per core), "
        f"torch {torch.__version__}, {threads} threads, commit {raw['commit']}.",
        f"Load average (1, 5, 15 min): {before} before the run, {after} after it.",
        "",
        "fp32, causal, B=1, H=8, D=64; median of pytest-benchmark rounds (ms); speed-up = peer "
        "time / cpp time.",
    ]
    if note:
        lines += ["", f"Note: {note}"]
    lines += [
        "",
        bench.markdown_table(rows),
        "",
        "Peak resident-memory rise of one forward+backward, T=8192, B=1, H=2, D=64 (fresh "
        "process; target for cpp: under 256 MiB):",
        "",
        bench.markdown_table(peak_rows),
        "",
        *verdicts(ms, peaks),
        "",
    ]
    return "\n".join(lines)


def verdicts(ms: dict, peaks: dict) -> list[str]:
    """The C++ extension issue's CPU targets, each with the measured numbers and met / not met."""

    def speedups(peer: str, at: set[int]) -> list[float]:
        return [
            ms[kind, t, peer] / ms[kind, t, "cpp"]
            for (kind, t, name) in ms
            if name == "cpp" and t in at and (kind, t, peer) in ms
        ]

    out = ["Targets (issue 3), measured in this run:", ""]
    vs_sdpa = speedups("sdpa", {t for (_, t, _) in ms if t >= 1024})
    vs_ref = speedups("reference", {2048})
    peak = peaks.get("cpp")
    checks = [
        ("cpp >= 1.0x torch SDPA, forward and forward+backward, T >= 1024", vs_sdpa, 1.0),
        ("cpp >= 4x the reference at T = 2048", vs_ref, 4.0),
    ]
    for text, values, bound in checks:
        if not values:
            out.append(f"- {text}: not measured")
            continue
        verdict = "met" if min(values) >= bound else "not met"
        out.append(f"- {text}: {verdict} (lowest {min(values):.2f}x, highest {max(values):.2f}x)")
    if isinstance(peak, float):
        verdict = "met" if peak < 256 else "not met"
        out.append(f"- cpp forward+backward at T = 8192 under 256 MiB: {verdict} ({peak:.0f} MiB)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--note", default="", help="a sentence for the report (e.g. machine load)")
    ap.add_argument("-k", dest="select", default=None, help="pytest -k expression (a subset)")
    args = ap.parse_args(argv)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    args.out.mkdir(parents=True, exist_ok=True)
    raw_path = args.out / f"cpu-{date}.json"
    load_before = list(os.getloadavg())
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE),
           f"--benchmark-json={raw_path}", "--benchmark-columns=median,min,max,rounds",
           "--benchmark-sort=name"] + (["-k", args.select] if args.select else [])  # fmt: skip
    code = subprocess.run(cmd, check=False).returncode
    peaks: dict[str, float | str] = {}
    for name in NAMES:
        try:
            peaks[name] = bench.peak_rss_rise_mib(name, 1, 2, 8192, 64)
        except RuntimeError as exc:
            peaks[name] = f"failed: {str(exc)[-80:]}"
    raw = json.loads(raw_path.read_text())
    raw.update(
        date=date,
        load_before=load_before,
        load_after=list(os.getloadavg()),
        commit=bench.git_commit(),
        peak_rise_mib=peaks,
    )
    raw_path.write_text(json.dumps(raw, indent=1) + "\n")
    text = summary(raw, peaks, lscpu(), args.note)
    md = args.out / f"cpu-{date}.md"
    md.write_text(text)
    print(f"\n{text}\nwritten: {md}, {raw_path} (pytest exit code {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
