"""Smoke tests of the benchmarks: every code path runs on CPU at tiny sizes and writes a
well-formed results file (so the benchmarks never rot). Timings themselves are not checked."""

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

import fastgpt
from fastgpt import bench
from fastgpt.bench import kvcache as bench_kvcache
from fastgpt.bench import machine
from fastgpt.bench import varlen as bench_varlen

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load_script(name: str):
    """Import bench/<name>.py (a script folder, not a package)."""
    path = ROOT / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name.replace('/', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Without a GPU, Triton runs interpreted (tests/conftest.py): seconds a call. It and eager
# FlexAttention get their own, smaller smoke runs below.
INTERPRETED = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--tiny", "--out", str(out), "--seqlens", "16,33", "--decode-lens", "40"]
    argv += ["--skip-providers", "flex,fastgpt-triton" if INTERPRETED else "flex"]
    assert bench.main(argv) == 0
    (path,) = out.glob("*.json")
    return path, json.loads(path.read_text())


def test_results_file_names_the_machine_and_versions(tiny_run):
    path, results = tiny_run
    machine = results["machine"]
    assert path.name.startswith(bench.slug(bench.cpu_name()))
    assert path.name.endswith("-tiny.json")  # tiny runs never pass for real results
    assert machine["device"] == "cpu" and machine["name"]
    assert machine["torch"] == torch.__version__
    for key in ("triton", "git_commit", "date", "fastgpt_backends", "threads"):
        assert key in machine
    assert results["complete"] and results["skipped"] == []
    assert results["copy_gbps"] > 0


def test_every_provider_mode_and_shape_has_one_record(tiny_run):
    _, results = tiny_run
    seen = {}
    for r in results["kernel"]:
        key = (r["provider"], r["mode"], r["tq"], r["causal"])
        assert key not in seen, key
        seen[key] = r
    expected = {
        (p, m, t, c)
        for p in results["providers"]
        for m in bench.MODES
        for t in (16, 33)
        for c in (True, False)
    }
    assert set(seen) == expected


def test_records_hold_a_time_or_a_reason(tiny_run):
    _, results = tiny_run
    for r in results["kernel"] + results["decode"]:
        if r["error"] is None:
            assert r["ms"] > 0 and math.isfinite(r["ms"]), r
        else:
            assert r["ms"] is None and isinstance(r["error"], str) and r["error"], r
    timed = {r["provider"] for r in results["kernel"] if r["ms"] is not None}
    assert {"reference", "sdpa-flash"} <= timed
    if "cpp" in results["machine"]["fastgpt_backends"]:
        assert "fastgpt-cpp" in timed


def test_throughput_follows_from_flops_and_time(tiny_run):
    _, results = tiny_run
    for r in results["kernel"]:
        if r["ms"] is not None:
            flops = bench.attention_flops(r["batch"], r["heads"], r["tq"], r["tk"], r["d"],
                                          r["causal"], r["mode"])  # fmt: skip
            assert r["tflops"] == pytest.approx(flops / (r["ms"] * 1e-3) / 1e12)
    for r in results["decode"]:
        if r["ms"] is not None:
            assert r["tq"] == 1 and r["copy_fraction"] == pytest.approx(
                r["gbps"] / results["copy_gbps"]
            )


def test_forward_outputs_were_checked_against_the_reference(tiny_run):
    # fp32 everywhere in the tiny run: every provider that ran agrees with the reference.
    _, results = tiny_run
    checked = [r for r in results["kernel"] if "rel_err" in r]
    assert {r["provider"] for r in checked} >= {"reference", "sdpa-flash"}
    for r in checked:
        assert r["rel_err"] < 1e-5, r


def test_speedups_are_ratios_of_the_recorded_times(tiny_run):
    _, results = tiny_run
    ms = {
        (r["provider"], r["dtype"], r["d"], r["tq"], r["causal"], r["mode"]): r["ms"]
        for r in results["kernel"]
    }
    ours = {n for n in results["providers"] if n.startswith("fastgpt-")}
    assert all(s["fastgpt"] in ours and s["peer"] not in ours for s in results["speedups"])
    if ours:
        assert results["speedups"]
    for s in results["speedups"]:
        config = (s["dtype"], s["d"], s["tq"], s["causal"], s["mode"])
        assert s["speedup"] == pytest.approx(ms[(s["peer"], *config)] / ms[(s["fastgpt"], *config)])


def test_plots_are_written_and_redrawn(tiny_run, tmp_path):
    path, results = tiny_run
    pngs = [path.with_name(path.stem + s) for s in ("-kernels.png", "-decode.png")]
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC
    copy = tmp_path / path.name
    copy.write_text(json.dumps(results))
    assert bench.main(["--from-json", str(copy)]) == 0
    assert (tmp_path / (path.stem + "-kernels.png")).read_bytes()[:8] == PNG_MAGIC


def test_summary_table_has_a_row_per_sequence_length(tiny_run):
    _, results = tiny_run
    text = bench.summary(results, full=True)
    assert "| T |" in text and "| 16 |" in text and "| 33 |" in text and "| Tk |" in text


def test_varlen_case_has_a_record_per_provider_and_mode(tiny_run):
    """The packed-sequences case of the tiny run: varlen beside padded SDPA (and padded cpp)."""
    _, results = tiny_run
    lengths = results["varlen_lengths"]
    assert sum(lengths) == 64 and all(3 <= n <= 20 for n in lengths[:-1]) and lengths[-1] > 0
    records = {(r["provider"], r["mode"]): r for r in results["varlen"]}
    assert len(records) == len(results["varlen"])  # one record each
    names = {name for name, _ in records}
    assert {"varlen-reference", "sdpa-padded"} <= names
    if "cpp" in results["machine"]["fastgpt_backends"]:
        assert "cpp-padded" in names
    assert set(records) == {(n, m) for n in names for m in ("fwd", "fwd_bwd")}
    for r in records.values():
        assert r["ms"] > 0 and r["error"] is None, r
        flops = bench_varlen.useful_flops(lengths, r["heads"], r["d"], r["mode"])
        assert r["tflops"] == pytest.approx(flops / (r["ms"] * 1e-3) / 1e12)
        assert r["sequences"] == len(lengths) and r["padded_tokens"] == len(lengths) * max(lengths)
        if r["mode"] == "fwd":
            assert r["rel_err"] < 1e-5, r  # fp32 against the fp32 reference, real tokens only
    assert "varlen: " in bench.summary(results, full=False)


def test_kvcache_case_has_a_record_per_provider_and_batch(tiny_run):
    """The ragged KV-cache case of the tiny run (CPU: cpp dense and paged, padded SDPA, eager
    FlexAttention): a record per provider and batch, each rate following from its time."""
    path, results = tiny_run
    H, Hkv, D, elem = 4, 2, 16, 4  # the tiny profile, fp32
    assert set(results["kvcache_lengths"]) == {"1", "3"}
    records = {(r["provider"], r["batch"]): r for r in results["kvcache"]}
    assert len(records) == len(results["kvcache"])  # one record each
    names = {name for name, _ in records}
    assert {"sdpa-padded", "flex"} <= names
    if "cpp" in results["machine"]["fastgpt_backends"]:
        assert {"fastgpt-cpp", "fastgpt-cpp-paged"} <= names
    assert set(records) == {(n, b) for n in names for b in (1, 3)}
    for (_, batch), r in records.items():
        lengths = results["kvcache_lengths"][str(batch)]
        assert lengths == bench_kvcache.ragged_lengths(batch, 3, 40)  # seeded by B
        assert len(lengths) == batch and all(3 <= n <= 40 for n in lengths)
        assert r["total_keys"] == sum(lengths) and r["max_len"] == max(lengths)
        assert r["step_bytes"] == (2 * sum(lengths) * Hkv * D + 2 * batch * H * D) * elem
        assert r["error"] is None and r["ms"] > 0, r
        seconds = r["ms"] * 1e-3
        assert r["tokens_per_s"] == pytest.approx(batch / seconds)
        assert r["gbps"] == pytest.approx(r["step_bytes"] / seconds / 1e9)
        assert r["copy_fraction"] == pytest.approx(r["gbps"] / results["copy_gbps"])
        assert r["rel_err"] < 1e-5, r  # fp32 against the fp32 reference on the valid keys
    assert "KV-cache decode (Tq=1)" in bench.summary(results, full=False)
    assert path.with_name(path.stem + "-kvcache.png").read_bytes()[:8] == PNG_MAGIC


def test_kvcache_case_keeps_to_its_own_budget(tmp_path):
    argv = ["--tiny", "--out", str(tmp_path), "--no-kernel", "--no-decode", "--no-varlen"]
    assert bench.main([*argv, "--kvcache-budget-s", "0", "--no-plot"]) == 0
    (path,) = tmp_path.glob("*.json")
    results = json.loads(path.read_text())
    assert results["kvcache"] == [] and not results["complete"]
    assert results["skipped"] == ["kvcache B=1", "kvcache B=3"]


@pytest.mark.skipif(
    "triton" not in fastgpt.available_backends("cpu"), reason="Triton cannot run on CPU here"
)
def test_kvcache_triton_providers_under_the_interpreter():
    """The GPU providers of fastgpt's own (API dense and paged, the bare op with max_seqlen_k)
    on a tiny ragged batch: each agrees with the reference (interpreted Triton, not timed)."""
    device = torch.device("cpu")
    providers = bench_kvcache.kvcache_providers(device, interpreted=True)
    names = ["fastgpt-triton", "fastgpt-triton-paged", "fastgpt-triton-op"]
    assert set(names) <= set(providers)
    assert not set(names) & set(bench_kvcache.kvcache_providers(device))  # never timed on CPU
    step = bench_kvcache.make_ragged(2, [37, 260], 4, 2, 16, torch.float32, device)
    check = bench_kvcache.reference_out(step)
    for name in names:
        out = providers[name](step)()  # (B, 1, H, D)
        assert out.shape == (2, 1, 4, 16)
        err = float((out.float() - check).norm() / check.norm())
        assert err < 1e-5, (name, err)


def test_kvcache_paged_layout_holds_the_dense_keys():
    from fastgpt.kvcache import sequence_keys

    lengths = [300, 5, 513]  # two, one and three pages of 256
    step = bench_kvcache.make_ragged(3, lengths, 4, 2, 8, torch.float32, torch.device("cpu"))
    k_pages, v_pages, table = step.paged
    assert step.k.shape[1] == 768 and table.shape == (3, 3) and k_pages.shape[0] == 2 + 1 + 3
    used = table[0, :2].tolist() + table[1, :1].tolist() + table[2].tolist()
    assert sorted(used) == list(range(6))  # every page once
    for b, n in enumerate(lengths):
        k, v = sequence_keys(k_pages, v_pages, b, n, table)  # (n, Hkv, D)
        assert torch.equal(k, step.k[b, :n]) and torch.equal(v, step.v[b, :n])


def test_length_mix_is_uniform_and_fills_the_batch():
    lengths = bench_varlen.length_mix(16384, 128, 4096)
    assert sum(lengths) == 16384 and all(128 <= n <= 4096 for n in lengths[:-1])
    assert lengths == bench_varlen.length_mix(16384, 128, 4096)  # seeded
    assert bench_varlen.useful_flops([4, 2], 1, 8, "fwd") == 4 * 8 * (16 + 4) / 2


@pytest.mark.parametrize("provider", ["fastgpt-triton", "flex"])
def test_slow_provider_smoke(provider, tmp_path):
    # One shape each: interpreted Triton takes seconds a call, eager FlexAttention traces anew
    # for every shape. (FlexAttention has no CPU backward: that record must carry the reason.)
    if provider == "fastgpt-triton" and "triton" not in fastgpt.available_backends("cpu"):
        pytest.skip("Triton cannot run on CPU here")
    argv = ["--tiny", "--out", str(tmp_path), "--seqlens", "16", "--causal", "true"]
    argv += ["--modes", "fwd,fwd_bwd", "--no-decode", "--providers", f"{provider},reference"]
    assert bench.main(argv) == 0
    (path,) = tmp_path.glob("*.json")
    records = {(r["provider"], r["mode"]): r for r in json.loads(path.read_text())["kernel"]}
    assert set(records) == {(p, m) for p in (provider, "reference") for m in ("fwd", "fwd_bwd")}
    assert records[(provider, "fwd")]["ms"] > 0
    assert records[(provider, "fwd")]["rel_err"] < 1e-5
    if provider == "fastgpt-triton":
        assert records[(provider, "fwd_bwd")]["ms"] > 0
    else:
        assert records[(provider, "fwd_bwd")]["ms"] or records[(provider, "fwd_bwd")]["error"]


def test_flop_count_matches_flash_attn():
    assert bench.attention_flops(2, 3, 5, 5, 7, causal=False, mode="fwd") == 4 * 2 * 3 * 5 * 5 * 7
    full = bench.attention_flops(1, 1, 8, 8, 4, causal=False, mode="fwd")
    assert bench.attention_flops(1, 1, 8, 8, 4, causal=True, mode="fwd") == full / 2
    assert bench.attention_flops(1, 1, 8, 8, 4, causal=False, mode="bwd") == 2.5 * full
    assert bench.attention_flops(1, 1, 8, 8, 4, causal=False, mode="fwd_bwd") == 3.5 * full


def test_unknown_provider_is_refused(tmp_path, capsys):
    assert bench.main(["--tiny", "--out", str(tmp_path), "--providers", "nonesuch"]) == 2
    assert "nonesuch" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


def test_bad_arguments_name_the_problem(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "--dtypes", "fp8"])
    assert "fp8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "--head-dims", "24"])  # hidden 32 is not a multiple of 24
    assert "24" in capsys.readouterr().err


def test_cpu_attention_providers_agree():
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))  # (B, H, T, D)
    want = bench.cpu_attention("reference")(q, k, v, True)
    torch.testing.assert_close(bench.cpu_attention("sdpa")(q, k, v, True), want)
    with pytest.raises(ValueError, match="nonesuch"):
        bench.cpu_attention("nonesuch")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_memory_sees_the_reference_score_matrix():
    # reference materialises (B, H, T, T) fp32 scores: 1 * 2 * 1024^2 * 4 bytes = 8 MiB a copy.
    rise = bench.peak_rss_rise_mib("reference", 1, 2, 1024, 16)
    assert 8 <= rise < 1024


def test_training_benchmark_runs_tiny(tmp_path):
    train = _load_script("train")
    cpp = ["cpp"] if "cpp" in fastgpt.available_backends("cpu") else []
    attention = ["reference", "sdpa", *cpp]
    assert train.main(["--tiny", "--out", str(tmp_path), "--attention", ",".join(attention)]) == 0
    (path,) = tmp_path.glob("*-train-tiny.json")
    results = json.loads(path.read_text())
    runs = {r["attention"]: r for r in results["runs"]}
    assert "sdpa" in runs and "reference" in runs
    for r in runs.values():
        if r["error"] is None:
            assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and math.isfinite(r["loss"])
    assert results["flops_per_token"] > 0 and results["peak_tflops"] > 0


def test_cpu_suite_summary_tabulates_and_judges_the_targets():
    run = _load_script("cpu/run")
    times = {("forward", 1024): (10.0, 12.0, 50.0), ("forward", 2048): (30.0, 33.0, 150.0)}
    raw = {
        "benchmarks": [
            {"extra_info": {"kind": kind, "t": t, "provider": name}, "stats": {"median": ms / 1e3}}
            for (kind, t), row in times.items()
            for name, ms in zip(("cpp", "sdpa", "reference"), row, strict=True)
        ],
        "date": "2000-01-01",
        "load_before": [1.0, 1.0, 1.0],
        "load_after": [2.0, 2.0, 2.0],
        "commit": "abc",
    }
    peaks = {"cpp": 40.0, "sdpa": 50.0, "reference": 2000.0}
    text = run.summary(raw, peaks, {"Model name": "Some CPU", "CPU(s)": "2"}, "a note")
    assert "Some CPU" in text and "a note" in text
    assert "| forward | 1024 | 10.00 | 12.00 | 50.00 | 1.20x | 5.00x |" in text
    assert "T >= 1024: met (lowest 1.10x, highest 1.20x)" in text
    assert "reference at T = 2048: met (lowest 5.00x" in text
    assert "under 256 MiB: met (40 MiB)" in text


def test_the_package_is_the_checkouts_bench_folder():
    assert Path(bench.__file__).resolve().parent == ROOT / "bench"
    assert machine.source_checkout() == ROOT


def test_results_folder_does_not_follow_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench.default_results_dir() == ROOT / "bench" / "results"
    assert bench.parse_args(["--tiny"]).out == ROOT / "bench" / "results" / "tiny"
    assert bench.parse_args(["--tiny", "--out", "x"]).out == Path("x")
    monkeypatch.setattr(machine, "source_checkout", lambda: None)  # an installed copy
    assert bench.default_results_dir() == tmp_path / "bench-results"


def test_git_commit_comes_from_the_environment_the_checkout_or_unknown(monkeypatch):
    monkeypatch.setenv("FASTGPT_GIT_COMMIT", "abc123")
    assert bench.git_commit() == "abc123"
    monkeypatch.delenv("FASTGPT_GIT_COMMIT")
    commit = bench.git_commit()
    assert commit == "unknown" or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit), commit
    monkeypatch.setattr(machine, "source_checkout", lambda: None)  # an installed copy
    assert bench.git_commit() == "unknown"


def test_results_values_are_made_jsonable():
    assert bench.jsonable(Path("a/b")) == "a/b"
    assert bench.jsonable(torch.device("cpu")) == "cpu"
    assert bench.jsonable(math.inf) is None and bench.jsonable(3) == 3


def test_cpu_decode_benchmark_smoke(tmp_path, monkeypatch):
    """bench/cpu/decode.py at tiny sizes, with a stand-in "cpp" KV-cache kernel (the reference)
    so the cpp rows run too: every provider and batch gets a record, the report is written."""
    from fastgpt import kvcache

    decode = _load_script("cpu/decode")
    if "cpp" in fastgpt.available_backends("cpu"):
        monkeypatch.setitem(kvcache.KVCACHE_KERNELS, "cpp", kvcache.reference_kvcache_attention)
    argv = ["--out", str(tmp_path), "--batches", "1,3", "--max-len", "70", "--rounds", "2"]
    assert decode.main(argv) == 0
    (path,) = tmp_path.glob("cpu-decode-*.json")
    raw = json.loads(path.read_text())
    names = decode.providers()
    assert {(r["batch"], r["provider"]) for r in raw["records"]} == {
        (b, n) for b in (1, 3) for n in names
    }
    assert all(len(r["times_ms"]) == 2 and r["gbps"] > 0 for r in raw["records"])
    assert all(len(r["lengths"]) == r["batch"] for r in raw["records"])
    assert "| 3 |" in path.with_suffix(".md").read_text()


@pytest.mark.skipif("cpp" not in fastgpt.available_backends("cpu"), reason="no C++ extension")
def test_cpu_window_benchmark_smoke(capsys):
    """bench/cpu/window.py at tiny sizes: a line per mode, attention and length, and per token."""
    window = _load_script("cpu/window")
    argv = ["--lengths", "64,128", "--windows", "16", "--rounds", "1"]
    assert window.main(argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    timed = [r for r in rows if r and r[0] in ("forward", "fwd+bwd")]
    assert len(timed) == 2 * 2 * 2  # (forward, fwd+bwd) x (full causal, window 16) x (64, 128)
    assert all(float(r[-2]) > 0 and float(r[-1]) > 0 for r in timed)
