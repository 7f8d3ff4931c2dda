"""torch.compile(fullgraph=True) over fastgpt: a module calling every attention entry point, and
fastgpt.GPT, for each backend available here, with dynamic sequence lengths.

fullgraph=True turns any graph break into an error; the sequence dim is marked dynamic and a
recompilation for a second length is an error too. Outputs and gradients must equal eager.
The per-backend tests compile with "aot_eager" (dynamo + AOT autograd through the fake kernels,
no code generation); one test runs the default inductor backend end to end. Compiling is slow
on CPU, so the cases are few and small.
"""

import pytest
import torch
from oracle import DEVICE_BACKENDS, random_qkv
from torch._dynamo.testing import CompileCounterWithBackend

import fastgpt
from fastgpt.model import GPT, GPTConfig

LENGTHS = (8, 13)  # the second run must reuse the graph traced for the first

pytestmark = pytest.mark.slow


class AllEntryPoints(torch.nn.Module):
    """fastgpt.attention, scaled_dot_product_attention and flash_attn_func on one q, k, v."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend

    def forward(self, q, k, v):  # q: (B, H, T, D); k, v: (B, Hkv, T, D)
        a = fastgpt.attention(q, k, v, causal=True, backend=self.backend)  # (B, H, T, D)
        b = fastgpt.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        c = fastgpt.flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, softmax_scale=0.2
        )  # (B, T, H, D)
        return a + 2 * b + 3 * c.transpose(1, 2)  # (B, H, T, D)


def compare_compiled(model, make_inputs, seq_dim, loss_of, compiler="aot_eager") -> None:
    """Run `model` eager and compiled at each length; outputs and gradients must match.

    The sequence dim (`seq_dim` of every input) is marked dynamic, and a recompilation for the
    second length is an error.
    """
    counter = CompileCounterWithBackend(compiler)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for length in LENGTHS:
        results = []
        for run in (model, compiled):
            inputs = make_inputs(length)
            for t in inputs:
                torch._dynamo.mark_dynamic(t, seq_dim)
            model.zero_grad(set_to_none=True)
            out = run(*inputs)
            loss_of(out).backward()
            outputs = [t.detach() for t in (out if isinstance(out, tuple) else (out,))]
            leaves = [t for t in inputs if t.is_floating_point()] + list(model.parameters())
            results.append([*outputs, *[t.grad for t in leaves]])
        for i, (got, want) in enumerate(zip(results[1], results[0], strict=True)):
            where = f"T={length}, tensor {i}"
            torch.testing.assert_close(got, want, msg=lambda m, w=where: f"{w}: {m}")
    assert counter.frame_count >= 1, "torch.compile never called the compiler"


@pytest.fixture(autouse=True)
def no_recompiles():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield


def tiny_gpt(backend: str | None, device: str = "cpu") -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, backend=backend
    )
    return GPT(config).to(device)


def tokens(length: int, device: str = "cpu"):
    gen = torch.Generator().manual_seed(length)
    idx = torch.randint(0, 64, (2, length + 1), generator=gen).to(device)
    return [idx[:, :-1], idx[:, 1:]]  # inputs, targets: (B, T)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_entry_points_compile_fullgraph(device, backend, monkeypatch):
    monkeypatch.setenv("FASTGPT_BACKEND", backend)  # the drop-ins pick their backend automatically
    inputs = lambda T: random_qkv(2, 4, 2, T, T, 16, seed=T, device=device, requires_grad=True)
    compare_compiled(AllEntryPoints(backend), inputs, 2, lambda out: out.square().sum())


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_gpt_compiles_fullgraph(device, backend):
    inputs = lambda length: tokens(length, device)
    compare_compiled(tiny_gpt(backend, device), inputs, 1, lambda out: out[1])


def test_gpt_compiles_with_inductor():
    """The default compiler end to end, on the backend fastgpt picks here."""
    compare_compiled(tiny_gpt(None), tokens, 1, lambda out: out[1], compiler="inductor")
