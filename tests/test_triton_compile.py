"""Every Triton kernel with every autotune config compiles for sm_80 and sm_90 and fits its shared
memory (A100: 166912 bytes per block, H100: 232448), on a machine without a GPU.

`triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))`
has the same shape in Triton 3.6 and 3.9: the signature names every parameter (constexprs as
"constexpr"), constexprs maps names to values, attrs maps (index,) to [["tt.divisibility", 16]].
The compile runs in a subprocess without TRITON_INTERPRET (conftest.py switches the interpreter on
for this process, which replaces @triton.jit functions).

One more test compiles the code paths the table does not take (non-causal, padded head dim,
negative scale, lengths Triton specialises to 1) with one config each.

16-bit configs are what autotune tries on these GPUs (fp16 and bf16 need the same shared memory,
so bf16 stands for both). fp32 gets one config per kernel; its full-precision dots take minutes to
compile on a small CPU, so that check runs only with FASTGPT_COMPILE_FP32=1.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from fastgpt.kernels import configs  # noqa: E402
from fastgpt.kernels.compile_check import TUNED, VARIANTS, cases  # noqa: E402


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
    expected = {(k, d, tuple(r)) for k, t, d, r in cases(arch, (dtype,))}
    seen = {(r["kernel"], r["block_d"], tuple(r["row"])) for r in records}
    assert seen == expected, f"cases missing from the run: {expected - seen}"
    assert_all_fit(records, arch, dtype)
    assert {r["kernel"] for r in records} >= set(TUNED)


def assert_all_fit(records: list[dict], arch: int, dtype: str) -> None:
    problems = [
        f"{r['kernel']} {r.get('override', '')} D={r['block_d']} "
        f"(BLOCK_M, BLOCK_N, warps, stages)={r['row']}: "
        + (r["error"] if "error" in r else f"{r['shared']} bytes > {r['limit']}")
        for r in records
        if "error" in r or r["shared"] > r["limit"]
    ]
    assert not problems, f"sm_{arch} {dtype}:\n" + "\n".join(problems)


@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
def test_every_16bit_config_compiles_and_fits(arch):
    check_records(compile_all(arch, "bf16"), arch, "bf16")


def test_other_code_paths_compile_for_sm90():
    # Non-causal, padded head dim, negative scale, lengths of 1 (Triton specialises ints == 1).
    records = compile_all(90, "fp16", "--variants")
    assert len(records) == sum(len(v) for v in VARIANTS.values())
    assert_all_fit(records, 90, "fp16")


@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
def test_fp32_config_compiles_and_fits(arch):
    check_records(compile_all(arch, "fp32"), arch, "fp32")


def test_cases_cover_what_autotune_may_launch():
    # The compile run measures each row group at its largest head dim (shared memory grows with
    # it) and autotune on sm_80 / sm_90 picks 16-bit configs from that same group at any head dim.
    for arch in (80, 90):
        capability = (arch // 10, arch % 10)
        limit = configs.SMEM_LIMIT[capability]
        measured = {(k, tuple(r)) for k, _, _, r in cases(arch, ("bf16",))}
        for kind in TUNED:
            for block_d in (16, 32, 64, 128, 256):
                for row in configs.select_rows(kind, capability, block_d, 2, limit):
                    assert (kind, row) in measured, (arch, kind, block_d, row)
