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
each. The table covers the varlen kernels (IS_VARLEN) at every 16-bit config, as the dense ones,
and the attention variants at every config their autotune may pick (configs.VARIANT_SPILLS left
out): window + softcap + sinks at every head dim, the varlen twin and window alone (sm_90) at the
largest head dim of each row group (compile_check.table_variant_cases).

16-bit configs are what autotune tries on these GPUs: bf16 at every head-dim bucket, fp16 at the
largest head dim of each row group, dense (it compiled to bf16's registers in every case compared),
both strict (no spill, no serialized wgmma). fp32 gets one config per kernel. compile_check
caches each case's result (keyed by the kernel sources, the case and the Triton / ptxas
versions), so a warm run takes seconds; cold times are in bench/NOTES_triton.md.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from fastgpt.kernels import configs  # noqa: E402
from fastgpt.kernels.compile_check import (  # noqa: E402
    TABLE_VARIANTS,
    TMA,
    TUNED,
    VARIANTS,
    VARLEN,
    VARLEN_KINDS,
    WINDOW,
    cases,
    problems,
)

HEAD_DIMS = (16, 32, 64, 128, 256)


def compile_all(arch: int, dtype: str, *flags: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastgpt.kernels.compile_check", "--arch", str(arch)]
    proc = subprocess.run(
        [*cmd, "--dtype", dtype, *flags], env=env, capture_output=True, text=True, timeout=1500
    )
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert records, f"compile_check printed nothing:\n{proc.stderr[-3000:]}"
    return records


def case_id(kind: str, block_d: int, row, override: dict | None) -> tuple:
    return kind, block_d, tuple(row), json.dumps(override or {}, sort_keys=True)


def check_records(records: list[dict], arch: int, dtype: str, peak: bool = False) -> None:
    expected = {case_id(k, d, r, o) for _, k, _, d, r, o in cases(arch, (dtype,), peak)}
    seen = {case_id(r["kernel"], r["head_dim"], r["config"], r.get("override")) for r in records}
    assert seen == expected, f"cases missing from the run: {expected - seen}"
    assert_clean(records, arch, dtype, strict=dtype != "fp32")
    assert {r["kernel"] for r in records} >= set(TUNED)
    if dtype != "fp32":
        assert_tensor_cores(records, arch)


def assert_tensor_cores(records: list[dict], arch: int) -> None:
    """16-bit dots run on tensor cores: mma.sync on sm_80; wgmma on sm_90 wherever the tile allows
    it (the forward, dK/dV, dQ and the one-pass backward up to D=128; the 16-row decode tiles, the
    small D=256 backward tiles and any tile whose accumulator has fewer than 64 rows (dK/dV and
    the one-pass backward: BLOCK_N, else BLOCK_M) are below wgmma's 64-row warpgroup tile and use
    mma.sync; the KV-cache tiles, 16 to 64 rows, may take either)."""
    for r in records:
        if r["kernel"] not in TUNED:
            continue
        acc_rows = r["config"][1 if r["kernel"] in ("dkdv", "onepass") else 0]
        small_m = r["kernel"] in ("decode", "kvcache") or acc_rows < 64
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
    # Plain, varlen and the attention variants at every config autotune may pick for them.
    check_records(compile_all(arch, "bf16"), arch, "bf16")


@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
def test_fp16_configs_compile_and_fit_at_the_peak_head_dims(arch):
    # fp16 as strictly as bf16, plain and with the variants, at the largest head dim of each row
    # group (fp16 compiled to bf16's registers, spills and shared memory in every case compared:
    # bench/NOTES_triton.md); the varlen twins and smaller dims are checked in bf16 only.
    check_records(compile_all(arch, "fp16", "--peak-dims"), arch, "fp16", peak=True)


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


def test_cases_cover_the_variant_autotune():
    # Every 16-bit config the autotune of a call with window / softcap / sinks may pick (the table
    # less configs.VARIANT_SPILLS plus VARIANT_ROWS; varlen less VARLEN_SPILLS and
    # VARLEN_VARIANT_SPILLS too) is measured with window + softcap (+ sinks in the forward) at
    # every head dim on every load path; at the largest head dim of each row group also as the
    # varlen twin and, on sm_90, with window alone.
    for kind, combo in TABLE_VARIANTS.items():
        assert combo["WINDOW"] and combo["SOFTCAP"] and (kind != "fwd" or combo["SINKS"])
    assert set(TABLE_VARIANTS) == set(VARLEN_KINDS) | {"kvcache"}
    for arch in (80, 90):
        capability = (arch // 10, arch % 10)
        limit = configs.SMEM_LIMIT[capability]
        measured = {case_id(k, d, r, o) for _, k, _, d, r, o in cases(arch, ("bf16",))}
        for kind, combo in TABLE_VARIANTS.items():
            tma_max = configs.TMA_MAX_BLOCK_D.get(kind, 0)
            groups = configs.TABLES[kind][configs.family(capability)]
            for block_d in HEAD_DIMS:
                peak = any(block_d == max(dims) for dims in groups)
                for path in [{}] + [TMA] * (arch >= 90 and block_d <= tma_max):
                    select = (kind, capability, block_d, 2, limit)
                    varlen = configs.select_rows(*select, True, True, bool(path))
                    for row in configs.select_rows(*select, False, True, bool(path)):
                        want = [{**path, **combo}]
                        want += [{**path, **WINDOW}] * (arch >= 90 and peak)
                        if peak and kind in VARLEN_KINDS and row in varlen:
                            want.append({**path, **combo, **VARLEN})
                        for override in want:
                            assert case_id(kind, block_d, row, override) in measured, (arch, row)


def test_variant_pruning_keeps_a_row_in_every_group():
    for capability, limit in configs.SMEM_LIMIT.items():
        for kind in configs.TABLES:
            for block_d in HEAD_DIMS:
                for varlen, tma in ((v, t) for v in (False, True) for t in (False, True)):
                    rows = configs.select_rows(
                        kind, capability, block_d, 2, limit, varlen, True, tma
                    )
                    assert rows, (capability, kind, block_d, varlen, tma)


def group_key(kind: str, family: str, block_d: int, tma: bool) -> tuple:
    """The variant lists' key: the largest head dim of block_d's row group stands for it."""
    peak = max(next(dims for dims in configs.TABLES[kind][family] if block_d in dims))
    return kind, family, peak, tma


def spills(key: tuple, varlen: bool, tma: bool) -> list:
    """The rows a call with a variant must not get (key: kind, family, BLOCK_D)."""
    found = [*configs.VARIANT_SPILLS.get(group_key(*key, tma), [])]
    if varlen:
        found += configs.VARLEN_VARIANT_SPILLS.get(group_key(*key, tma), [])
        found += configs.VARLEN_SPILLS.get(key, [])
    return found


def rows_of(kept) -> list[tuple[int, int, int, int]]:
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)], ids=["sm80", "sm90"])
def test_autotune_drops_the_variant_spills_at_run_time(monkeypatch, capability):
    # What early_config_prune returns for a call with a variant (window, softcap or sinks): the
    # rows select_rows keeps with variants=True, none of VARIANT_SPILLS; a plain call keeps the
    # whole group. The backward passes take no sinks (their code is then the plain one).
    import torch

    limit = configs.SMEM_LIMIT[capability]
    family = configs.family(capability)
    monkeypatch.setattr(configs, "_device_limits", lambda t: (capability, limit))
    q, sinks = torch.empty(1, dtype=torch.float16), torch.zeros(1)
    calls = [({}, False), ({"WINDOW": False, "SOFTCAP": False, "Sinks": None}, False)]
    calls += [({"WINDOW": True}, True), ({"SOFTCAP": True}, True), ({"Sinks": sinks}, True)]
    prunes = {
        "fwd": (configs.prune_fwd, configs.FWD_CONFIGS),
        "dkdv": (configs.prune_dkdv, configs.DKDV_CONFIGS),
        "dq": (configs.prune_dq, configs.DQ_CONFIGS),
    }
    for kind, (prune, all_configs) in prunes.items():
        for block_d in HEAD_DIMS:
            key = (kind, family, block_d)
            for call, on in calls:
                for varlen in (False, True):
                    for tma in (False, True):
                        args = {"BLOCK_D": block_d, "HEAD_DIM": 1, "IS_VARLEN": varlen, **call}
                        args["USE_TMA"] = tma
                        got = rows_of(prune(all_configs, {"Q": q}, **args))
                        select = (kind, capability, block_d, 2, limit)
                        assert got == configs.select_rows(*select, varlen, on, tma), (kind, args)
                        if on:
                            bad = spills(key, varlen, tma)
                            assert got and not set(got) & set(bad), (kind, args)
                            assert set(configs.VARIANT_ROWS.get(group_key(*key, tma), [])) <= set(
                                got
                            )
                        elif not varlen:
                            assert got == configs.select_rows(*select), (kind, args)
    for block_d in HEAD_DIMS:  # the KV-cache kernel: one BLOCK_M of its variant rows
        args = {"BLOCK_D": block_d, "HEAD_DIM": 1, "M_ROWS": 16, "WINDOW": True}
        got = rows_of(configs.prune_kvcache(configs.KVCACHE_CONFIGS, {"Q": q}, **args))
        want = configs.select_rows("kvcache", capability, block_d, 2, limit, variants=True)
        assert got and set(got) <= set(want), block_d


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
