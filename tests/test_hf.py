"""fastgpt inside Hugging Face transformers: tiny GPT-2 and Llama (GQA) models built with
from_config (nothing downloaded), run with attn_implementation="eager" and "fastgpt" on the same
weights. Logits and gradients are compared in float64, generate() tokens in float32.
"""

import sys

import pytest
import torch
from oracle import F64

import fastgpt

pytest.importorskip("transformers")
from hf_tiny import TOKENS, VOCAB, build  # noqa: E402

NAME = fastgpt.register_hf_attention()


def model_pair(arch: str, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same weights under "eager" and under fastgpt."""
    return build(arch, "eager", dtype), build(arch, NAME, dtype)


def token_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        2, VOCAB - 1, (batch, length), generator=torch.Generator().manual_seed(seed)
    )


# Llama's eager attention takes its softmax in float32 whatever the model's dtype, so it agrees
# with float64 attention only to float32 precision; GPT-2's eager and torch's sdpa stay in float64.
EAGER_TOLERANCE = {"gpt2": F64, "llama": dict(atol=1e-5, rtol=1.3e-6)}  # float32 defaults


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prefill_logits_and_gradients_match_eager(arch, hf_paths):
    ids = token_ids(2, 11)
    results = {}
    for implementation in ("eager", "sdpa", NAME):
        model = build(arch, implementation, torch.float64)
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None for g in grads)
        results[implementation] = [out.logits.detach(), *grads]
    for reference, tol in [("sdpa", F64), ("eager", EAGER_TOLERANCE[arch])]:
        pairs = zip(results[NAME], results[reference], strict=True)
        for i, (got, want) in enumerate(pairs):
            torch.testing.assert_close(
                got, want, **tol, msg=lambda m, i=i, r=reference: f"vs {r}, tensor {i}: {m}"
            )
    assert hf_paths() and all(p.startswith("fastgpt") for p in hf_paths()), hf_paths()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_tokens_match_eager(arch, hf_paths):
    """Greedy decoding: a causal prefill, then one-token steps against the KV cache."""
    eager, fast = model_pair(arch, torch.float32)
    ids = token_ids(2, 7, seed=1)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    want = eager.generate(ids, **kwargs)
    got = fast.generate(ids, **kwargs)
    assert got.shape == (2, 15)
    assert torch.equal(got, want), f"fastgpt {got.tolist()} != eager {want.tolist()}"
    taken = hf_paths()
    assert "fastgpt (causal=True)" in taken, taken  # prefill
    assert "fastgpt (causal=False)" in taken, taken  # one query against the whole cache
    assert all(p.startswith("fastgpt") for p in taken), taken


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_padding_mask_runs_varlen_and_matches_eager(arch, hf_paths):
    """Left padding needs a mask: fastgpt runs those calls on attention_varlen (test_hf_varlen.py
    covers padding and packing in depth).

    In float32: Llama's eager attention turns a float64 padding mask into NaN rows (its softmax
    runs in float32), so float64 has no eager baseline here.
    """
    ids = token_ids(2, 9, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # the first sequence is 3 tokens shorter, padded on the left
    ids[0, :3] = TOKENS["pad_token_id"]
    real = mask.bool()  # padded positions attend to nothing real; only real tokens are compared
    models = {impl: build(arch, impl, torch.float32) for impl in ("eager", "sdpa", NAME)}
    logits = {impl: m(ids, attention_mask=mask).logits[real] for impl, m in models.items()}
    torch.testing.assert_close(logits[NAME], logits["sdpa"])  # float32 tolerances
    torch.testing.assert_close(logits[NAME], logits["eager"])
    assert hf_paths() and all(p.startswith("fastgpt varlen") for p in hf_paths()), hf_paths()

    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    got, want = models[NAME].generate(ids, **kwargs), models["eager"].generate(ids, **kwargs)
    assert torch.equal(got, want), f"fastgpt {got.tolist()} != eager {want.tolist()}"


def test_set_attn_implementation_switches_a_loaded_model(hf_paths):
    model = build("gpt2", "eager", torch.float64)  # GPT-2's eager is exact in float64
    ids = token_ids(1, 6)
    want = model(ids).logits
    assert not hf_paths()
    model.set_attn_implementation(NAME)
    assert model.config._attn_implementation == NAME
    torch.testing.assert_close(model(ids).logits, want, **F64)
    assert hf_paths() and all(p.startswith("fastgpt") for p in hf_paths())


def test_register_returns_name_and_rejects_hub_style_names():
    assert fastgpt.register_hf_attention("fastgpt_other") == "fastgpt_other"
    from transformers import AttentionInterface

    assert "fastgpt_other" in AttentionInterface()
    for bad in ["org/kernel", "a:b", ""]:
        with pytest.raises(ValueError, match="plain name"):
            fastgpt.register_hf_attention(bad)


def test_register_without_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r"fastgpt\[hf\]"):
        fastgpt.register_hf_attention("fastgpt_missing")


def test_hf_model_runs_cpp_ops_in_profiler(monkeypatch):
    if "cpp" not in fastgpt.available_backends("cpu"):
        pytest.skip("the C++ extension is not built")
    monkeypatch.setenv("FASTGPT_BACKEND", "cpp")
    _, fast = model_pair("llama", torch.float32)
    ids = token_ids(1, 6)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fast(ids, labels=ids).loss.backward()
    ops = {e.name for e in prof.events()}
    assert "fastgpt::cpp_attention_forward" in ops, sorted(ops)
    assert "fastgpt::cpp_attention_backward" in ops, sorted(ops)
