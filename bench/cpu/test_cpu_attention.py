"""CPU attention benchmark (pytest-benchmark): fastgpt cpp vs torch SDPA vs the reference path.

    python bench/cpu/run.py       # runs this suite, writes bench/results/cpu-<date>.md
    pytest bench/cpu --benchmark-columns=median,min,max,rounds

fp32, causal, B=1, H=8, D=64, T in {256, 1024, 2048, 4096}, forward and forward+backward, with
torch.get_num_threads() threads. Each benchmark also checks that the provider's output matches
torch SDPA's, so a fast wrong kernel cannot pass. A separate test checks that the cpp backend's
forward+backward at T=8192 (B=1, H=2, D=64) raises peak memory by under 256 MiB.
"""

import pytest
import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import bench

B, H, D = 1, 8, 64
SEQLENS = (256, 1024, 2048, 4096)
ROUNDS = {256: 20, 1024: 8, 2048: 5, 4096: 3}  # keeps the slow reference path to seconds
HAVE_CPP = "cpp" in fastgpt.available_backends("cpu")


def _provider(name: str):
    if name == "cpp" and not HAVE_CPP:
        pytest.skip("the C++ extension (cpp backend) is not built here")
    return bench.cpu_attention(name)


def _inputs(t: int, grad: bool):
    gen = torch.Generator().manual_seed(t)
    return [
        torch.randn(B, H, t, D, generator=gen).requires_grad_(grad)  # (B, H, T, D)
        for _ in range(3)
    ]


def _label(benchmark, kind: str, name: str, t: int) -> None:
    benchmark.group = f"{kind} T={t}"
    benchmark.extra_info.update(provider=name, t=t, kind=kind, threads=torch.get_num_threads())


@pytest.mark.parametrize("t", SEQLENS)
@pytest.mark.parametrize("name", bench.CPU_PEERS)
def test_forward(benchmark, name, t):
    fn = _provider(name)
    q, k, v = _inputs(t, grad=False)
    _label(benchmark, "forward", name, t)
    with torch.no_grad():
        out = benchmark.pedantic(fn, args=(q, k, v, True), rounds=ROUNDS[t], warmup_rounds=1)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("t", SEQLENS)
@pytest.mark.parametrize("name", bench.CPU_PEERS)
def test_forward_backward(benchmark, name, t):
    fn = _provider(name)
    q, k, v = _inputs(t, grad=True)
    grad_out = torch.randn(B, H, t, D)  # (B, H, T, D)

    def setup():
        for x in (q, k, v):
            x.grad = None
        return (), {}

    def step():
        fn(q, k, v, True).backward(grad_out)

    _label(benchmark, "forward+backward", name, t)
    benchmark.pedantic(step, setup=setup, rounds=ROUNDS[t], warmup_rounds=1)
    got = [x.grad for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad_out)
    for mine, want in zip(got, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(mine, want, atol=1e-4, rtol=1e-3)


@pytest.mark.skipif(not HAVE_CPP, reason="the C++ extension (cpp backend) is not built here")
def test_cpp_forward_backward_peak_memory_t8192(record_property):
    # Inputs, output and gradients are 4 MiB each; the (T, T) score matrix alone would be 512 MiB.
    rise = bench.peak_rss_rise_mib("cpp", 1, 2, 8192, 64)
    record_property("peak_rise_mib", rise)
    assert rise < 256, f"cpp forward+backward at T=8192 raised peak memory by {rise:.0f} MiB"
