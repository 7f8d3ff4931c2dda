"""Every Triton kernel with every autotune config compiles for sm_80 and sm_90, fits its shared
memory (A100: 166912 bytes per block, H100: 232448) and, for 16-bit inputs, neither spills
registers nor serializes wgmma (what ptxas -v says), on a machine without a GPU.

`triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))`
has the same shape in Triton 3.6 and 3.9: the signature names every parameter (constexprs as
"constexpr"), constexprs maps names to values, attrs maps (index,) to [["tt.divisibility", 16]].
The compile runs in a subprocess without TRITON_INTERPRET (conftest.py switches the interpreter on
for this process, which replaces @triton.jit functions).

One more test compiles the code paths the table does not take (non-causal, padded head dim,
negative scale, lengths Triton specialises to 1; varlen non-causal and padded) with one config
each. The table covers the varlen kernels (IS_VARLEN) at every 16-bit config, as the dense ones.

16-bit configs are what autotune tries on these GPUs, at every head-dim bucket (fp16 and bf16
compile to the same tiles, so bf16 stands for both here; compile_check --dtype fp16 checks fp16).
fp32 gets one config per kernel. compile_check caches each case's result (keyed by the kernel
sources, the case and the Triton / ptxas versions), so a warm run takes seconds; cold, the whole
file takes about 10 minutes on 2 cores.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from fastgpt.kernels import configs  # noqa: E402
from fastgpt.kernels.compile_check import (  # noqa: E402
    TUNED,
    VARIANTS,
    VARLEN_KINDS,
    cases,
    problems,
)


def compile_all(arch: int, dtype: str, *flags: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastgpt.kernels.compile_check", "--arch", str(arch)]
    proc = subprocess.run(
        [*cmd, "--dtype", dtype, *flags], env=env, capture_output=True, text=True, timeout=1500
    )
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert records, f"compile_check printed nothing:\n{proc.stderr[-3000:]}"
    return records


def check_records(records: list[dict], arch: int, dtype: str) -> None:
    expected = {(k, d, tuple(r)) for _, k, _, d, r, _ in cases(arch, (dtype,))}
    seen = {(r["kernel"], r["head_dim"], tuple(r["config"])) for r in records}
    assert seen == expected, f"cases missing from the run: {expected - seen}"
    assert_clean(records, arch, dtype, strict=dtype != "fp32")
    assert {r["kernel"] for r in records} >= set(TUNED)
    if dtype != "fp32":
        assert_tensor_cores(records, arch)


def assert_tensor_cores(records: list[dict], arch: int) -> None:
    """16-bit dots run on tensor cores: mma.sync on sm_80; wgmma on sm_90 wherever the tile allows
    it (the forward, dK/dV and dQ up to D=128; the 16-row decode tiles and the small D=256
    backward tiles are below wgmma's 64-row warpgroup tile and use mma.sync; the KV-cache tiles,
    16 to 64 rows, and the one-pass backward's from D=128, may take either)."""
    for r in records:
        if r["kernel"] not in TUNED:
            continue
        small_m = r["kernel"] in ("decode", "kvcache")
        # The one-pass backward's clean sm_90 tiles at D=128 are 16 x 32 (configs._ONEPASS).
        small_m |= r["kernel"] == "onepass" and r["head_dim"] >= 128
        if arch == 80 or small_m or (r["kernel"] != "fwd" and r["head_dim"] > 128):
            assert r["mma"] in (("mma.sync",) if arch == 80 else ("wgmma", "mma.sync")), r
        else:
            assert r["mma"] == "wgmma", r


def assert_clean(records: list[dict], arch: int, dtype: str, strict: bool) -> None:
    """No compile error, no shared-memory overflow; with `strict` (16-bit autotune configs) no
    spills and no serialized wgmma either."""
    found = [
        f"{r['kernel']} {r.get('override', '')} D={r['head_dim']} "
        f"(BLOCK_M, BLOCK_N, warps, stages)={r['config']}: " + "; ".join(bad)
        for r in records
        if (bad := problems(r, strict and r["kernel"] in TUNED))
    ]
    assert not found, f"sm_{arch} {dtype}:\n" + "\n".join(found)


@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
def test_every_16bit_config_compiles_and_fits(arch):
    check_records(compile_all(arch, "bf16"), arch, "bf16")


def test_other_code_paths_compile_for_sm90():
    # Non-causal, padded head dim, negative scale, lengths of 1 (Triton specialises ints == 1).
    records = compile_all(90, "fp16", "--variants")
    assert len(records) == sum(len(v) for v in VARIANTS.values())
    assert_clean(records, 90, "fp16", strict=False)


@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
def test_fp32_config_compiles_and_fits(arch):
    check_records(compile_all(arch, "fp32"), arch, "fp32")


def test_cases_cover_what_autotune_may_launch():
    # The compile run measures every 16-bit config autotune on sm_80 / sm_90 may pick, at every
    # head-dim bucket (registers and wgmma scheduling change with the head dim).
    for arch in (80, 90):
        capability = (arch // 10, arch % 10)
        limit = configs.SMEM_LIMIT[capability]
        measured = {(k, d, tuple(r)) for _, k, _, d, r, _ in cases(arch, ("bf16",))}
        for kind in TUNED:
            for block_d in (16, 32, 64, 128, 256):
                for row in configs.select_rows(kind, capability, block_d, 2, limit):
                    assert (kind, block_d, row) in measured, (arch, kind, block_d, row)


def test_cases_cover_the_varlen_kernels():
    # Every 16-bit config the varlen autotune may pick (the table less configs.VARLEN_SPILLS) is
    # measured with IS_VARLEN, on sm_90 on the descriptor path too (up to TMA_MAX_BLOCK_D).
    for arch in (80, 90):
        capability = (arch // 10, arch % 10)
        limit = configs.SMEM_LIMIT[capability]
        measured = {
            (k, d, tuple(r), (o or {}).get("USE_TMA", False))
            for _, k, _, d, r, o in cases(arch, ("bf16",))
            if (o or {}).get("IS_VARLEN")
        }
        for kind in VARLEN_KINDS:
            for block_d in (16, 32, 64, 128, 256):
                paths = [False] + [True] * (arch >= 90 and block_d <= configs.TMA_MAX_BLOCK_D[kind])
                for row in configs.select_rows(kind, capability, block_d, 2, limit, varlen=True):
                    for tma in paths:
                        assert (kind, block_d, row, tma) in measured, (arch, kind, block_d, row)


PTXAS_LOG = """\
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized \
due to non wgmma instructions defining accumulator registers of a wgmma between start and end of \
the pipeline stage in the function 'attn_fwd_kernel'
ptxas info    : Compiling entry function 'attn_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for attn_fwd_kernel
    1384 bytes stack frame, 3232 bytes spill stores, 3628 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1384 bytes cumulative stack size
"""


def test_ptxas_log_is_read_and_judged():
    from fastgpt.kernels.aot import parse_ptxas_log

    ptx = "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 ...; cp.async.bulk.tensor.2d"
    report = parse_ptxas_log(PTXAS_LOG, ptx)
    assert report["registers"] == 255 and report["spill_bytes"] == 3232 + 3628
    assert report["wgmma_serialized"] and report["ptxas_warnings"] == ["C7515"]
    assert report["mma"] == "wgmma" and report["tma"]
    record = {**report, "shared": 1000, "limit": 2000}
    assert problems(record, strict=False) == []
    assert len(problems(record, strict=True)) == 2
    clean = parse_ptxas_log("ptxas info    : Used 96 registers, used 1 barriers\n", "mma.sync")
    assert not clean["wgmma_serialized"] and clean["spill_bytes"] == 0
    assert clean["mma"] == "mma.sync" and not clean["tma"]
    assert problems({**clean, "shared": 1, "limit": 2}, strict=True) == []


def test_markdown_table_replaces_only_its_block(tmp_path):
    from fastgpt.kernels.compile_table import END, START, write_table

    record = {"kernel": "fwd", "arch": 90, "dtype": "bf16", "head_dim": 64}
    record |= {"config": [128, 64, 4, 4], "shared": 81920, "registers": 245, "spill_bytes": 0}
    record |= {"wgmma_serialized": False, "ptxas_warnings": [], "mma": "wgmma", "tma": False}
    record["loops"] = [{"dots": 2, "exp2": 2}]
    notes = tmp_path / "NOTES.md"
    notes.write_text("# Notes\n\nkept above\n")
    write_table(notes, [record])
    write_table(notes, [record, {**record, "head_dim": 128}])  # rewritten in place, not appended
    text = notes.read_text()
    assert text.startswith("# Notes\n\nkept above\n") and text.count(START) == 1
    rows = text.split(START)[1].split(END)[0].strip().splitlines()
    assert len(rows) == 2 + 2  # header, rule, two records
    assert rows[2].startswith("| fwd | sm_90 | bf16 | 64 | 128, 64, 4, 4 | 81920 | 245 | 0 | no |")
