"""fastgpt's benchmarks, installed as fastgpt.bench: attention kernels and decode beside peers.

    fastgpt bench --help                # the attention benchmark (also python -m fastgpt.bench)
    python bench/train.py --help        # training throughput and MFU per attention (a script)
    python bench/cpu/run.py --help      # the CPU kernel suite (a script)

Layout (this folder is the package; the scripts, results/ and notes sit beside it):
    cli.py        the command line and the run's results dict (main, parse_args)
    suite.py      the run loops: kernel shapes and decode lengths, speed-ups
    varlen.py     the packed-sequences case: attention_varlen vs padded SDPA / cpp, document masks
    kvcache.py    the ragged KV-cache decode case: attention_with_kvcache vs padded SDPA, flex
    providers.py  what is timed: fastgpt's backends and their peers, (q, k, v, causal) -> out
    timing.py     timing, memory, one measurement, CPU peak memory
    machine.py    machine description, git commit, results folder and files, datasheet peaks
    report.py     markdown tables and PNG plots

The names below are what the scripts and tests share; anything else is importable from its module.
"""

from fastgpt.bench.cli import main, parse_args
from fastgpt.bench.machine import (
    cpu_name,
    default_results_dir,
    git_commit,
    jsonable,
    machine_info,
    peak_bf16_tflops,
    results_path,
    slug,
    write_json,
)
from fastgpt.bench.report import format_number, markdown_table, summary
from fastgpt.bench.timing import (
    CPU_PEERS,
    MODES,
    attention_flops,
    cpu_attention,
    error_text,
    matmul_tflops,
    peak_rss_rise_mib,
    sync,
)

__all__ = [
    "CPU_PEERS",
    "MODES",
    "attention_flops",
    "cpu_attention",
    "cpu_name",
    "default_results_dir",
    "error_text",
    "format_number",
    "git_commit",
    "jsonable",
    "machine_info",
    "main",
    "markdown_table",
    "matmul_tflops",
    "parse_args",
    "peak_bf16_tflops",
    "peak_rss_rise_mib",
    "results_path",
    "slug",
    "summary",
    "sync",
    "write_json",
]
