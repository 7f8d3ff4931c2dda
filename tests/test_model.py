"""fastgpt.nn.CausalSelfAttention and fastgpt.GPT: vs plain PyTorch, KV cache, init, presets."""

import math

import pytest
import torch
import torch.nn.functional as F
from oracle import CPU_BACKENDS

import fastgpt
import fastgpt.nn as fnn
from fastgpt.model import GPT, preset_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def plain_attention(module: fnn.CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The module's computation in plain PyTorch: repeated kv heads, masked softmax."""
    B, T, C = x.shape
    H, Hkv, D = module.n_head, module.n_kv_head, module.head_dim
    q, k, v = module.c_attn(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
    q = q.reshape(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    k = k.reshape(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)  # (B, H, T, D)
    v = v.reshape(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)  # (B, H, T, D)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)  # (B, H, T, T)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    y = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v  # (B, H, T, D)
    return module.c_proj(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n_head,n_kv_head", [(4, None), (4, 2), (4, 1)])  # MHA, GQA, MQA
def test_attention_module_matches_plain_pytorch(backend, n_head, n_kv_head):
    torch.manual_seed(0)
    module = fnn.CausalSelfAttention(32, n_head, n_kv_head, backend=backend).double()
    x = torch.randn(2, 13, 32, dtype=torch.float64, requires_grad=True)  # odd length on purpose
    y = module(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *module.parameters()])
    y_ref = plain_attention(module, x)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, *module.parameters()])
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-10)


def test_attention_module_passes_views_and_backend(monkeypatch):
    """q, k, v reach fastgpt.attention as views of the fused projection's output, not copies."""
    seen = {}

    def spy(q, k, v, *, causal, backend):
        seen.update(q=q, k=k, v=v, causal=causal, backend=backend)
        return fastgpt.reference_attention(q, k, v, causal, None)

    monkeypatch.setattr(fnn, "attention", spy)
    module = fnn.CausalSelfAttention(24, 6, 2, backend="reference")
    module(torch.randn(3, 5, 24))
    q, k, v = seen["q"], seen["k"], seen["v"]
    assert seen["causal"] is True and seen["backend"] == "reference"
    assert q.shape == (3, 6, 5, 4) and k.shape == v.shape == (3, 2, 5, 4)
    storage = q.untyped_storage().data_ptr()
    for t in (q, k, v):
        assert t._base is not None and t.untyped_storage().data_ptr() == storage
        assert t.stride(-1) == 1 and not t.is_contiguous()


def test_attention_fn_replaces_fastgpt_attention_in_every_block():
    """GPT(config, attention_fn) reaches every block; torch SDPA there gives the same logits."""
    calls = []

    def sdpa(q, k, v, *, causal, backend):
        calls.append(backend)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    idx = torch.randint(0, 37, (2, 9))
    want, _ = small_gpt(backend="reference").double()(idx)
    torch.manual_seed(0)
    config = small_gpt(backend="reference").config
    torch.manual_seed(0)
    got, _ = GPT(config, attention_fn=sdpa).eval().double()(idx)
    assert calls == ["reference", "reference"]  # one call per block, the backend passed on
    torch.testing.assert_close(got, want)
    assert fnn.CausalSelfAttention(24, 6).attention_fn is None  # default: fastgpt.attention


def test_kv_cache_refuses_a_changed_batch():
    module = fnn.CausalSelfAttention(16, 4, 2, backend="reference")
    cache = fnn.KVCache(8)
    module(torch.randn(2, 3, 16), cache)
    with pytest.raises(
        ValueError, match=r"KV cache holds \(B, Hkv, D\) = \(2, 2, 4\).*\(3, 2, 1, 4\)"
    ):
        module(torch.randn(3, 1, 16), cache)


def test_attention_module_rejects_bad_heads():
    with pytest.raises(ValueError, match=r"n_embd \(30\) must be a positive multiple of n_head"):
        fnn.CausalSelfAttention(30, 4)
    with pytest.raises(ValueError, match=r"n_head \(4\) must be a positive multiple of n_kv_head"):
        fnn.CausalSelfAttention(32, 4, 3)


def small_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    config = dict(vocab_size=37, block_size=12, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    return GPT(fastgpt.GPTConfig(**{**config, **overrides})).eval()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kv_cache_logits_match_full_forward(backend):
    model = small_gpt(backend=backend).double()
    idx = torch.randint(0, 37, (2, 12))
    full, _ = model(idx)  # (2, 12, V)
    caches = model.new_kv_caches()
    pieces = [model(idx[:, :5], kv_caches=caches)[0]]  # prefill 5, then one at a time
    pieces += [model(idx[:, t : t + 1], kv_caches=caches)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="context is 12 tokens"):
        model(idx[:, :1], kv_caches=caches)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_greedy_with_cache_equals_without(backend, dtype):
    model = small_gpt(backend=backend).to(dtype)
    prompt = torch.randint(0, 37, (3, 4))
    # 20 new tokens: past block_size (12), where the context window starts to slide.
    with_cache = model.generate(prompt, 20, temperature=0)
    without = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert with_cache.shape == (3, 24)
    assert torch.equal(with_cache, without)


def test_sampling_is_seeded_and_respects_top_k():
    model = small_gpt()
    prompt = torch.zeros(1, 1, dtype=torch.long)

    def run(seed, top_k=None):
        gen = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 15, temperature=1.0, top_k=top_k, generator=gen)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    greedy = model.generate(prompt, 15, temperature=0)
    assert torch.equal(run(3, top_k=1), greedy)  # top-1 sampling is greedy decoding


def test_generate_tokens_yields_generate_one_token_at_a_time():
    model = small_gpt()
    prompt = torch.zeros(2, 3, dtype=torch.long)
    tokens = list(model.generate_tokens(prompt, 16, temperature=0))  # past block_size (12)
    assert len(tokens) == 16 and all(t.shape == (2, 1) for t in tokens)
    assert torch.equal(torch.cat([prompt, *tokens], 1), model.generate(prompt, 16, temperature=0))
    with pytest.raises(ValueError, match="temperature must be >= 0 and finite, got nan"):
        model.generate(prompt, 2, temperature=float("nan"))


def test_initial_loss_near_log_vocab():
    """GPT-2 init (scaled residual projections): step-0 loss within 10% of ln(vocab_size)."""
    model = small_gpt(vocab_size=500)
    idx = torch.randint(0, 500, (8, 13))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    assert abs(loss.item() - math.log(500)) < 0.1 * math.log(500)


def test_init_and_tied_head():
    model = small_gpt(n_layer=4, n_embd=64, n_head=4, n_kv_head=None)
    assert model.lm_head.weight is model.wte.weight
    proj = model.blocks[0].attn.c_proj.weight.std().item()
    fc = model.blocks[0].mlp.c_fc.weight.std().item()
    assert abs(proj - 0.02 / math.sqrt(8)) < 0.002  # residual projection: 0.02 / sqrt(2 n_layer)
    assert abs(fc - 0.02) < 0.002


def test_relu_activation_and_bias_off():
    model = small_gpt(activation="relu", bias=False)
    assert isinstance(model.blocks[0].mlp.act, torch.nn.ReLU)
    assert all(not n.endswith(".bias") for n, _ in model.named_parameters())
    logits, loss = model(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    assert logits.shape == (1, 3, 37) and torch.isfinite(loss)


def test_presets():
    tiny = preset_config("tiny", vocab_size=35)
    assert (tiny.block_size, tiny.n_embd, tiny.n_head, tiny.n_layer) == (6, 32, 2, 2)
    # The notebook's: ReLU MLP and an output head of its own (35 x 32 more parameters).
    assert tiny.activation == "relu" and not tiny.tie_head
    untied, tied = GPT(tiny), GPT(preset_config("tiny", vocab_size=35, tie_head=True))
    assert untied.lm_head.weight is not untied.wte.weight and tied.lm_head.weight is tied.wte.weight
    assert untied.num_params() - tied.num_params() == 35 * 32
    with torch.device("meta"):  # no memory for 124M parameters
        gpt2 = GPT(preset_config("gpt2", vocab_size=50257))
    assert round(gpt2.num_params(non_embedding=False) / 1e6) == 124
    with pytest.raises(ValueError, match="Unknown preset 'huge'"):
        preset_config("huge")
    with pytest.raises(ValueError, match="must be one of gelu, gelu_tanh, relu, got 'tanh'"):
        preset_config("tiny", vocab_size=5, activation="tanh")


def test_prompt_longer_than_context_is_an_error():
    model = small_gpt()
    with pytest.raises(ValueError, match=r"Cannot run 13 positions .* context is 12 tokens"):
        model(torch.zeros(1, 13, dtype=torch.long))


def test_cross_entropy_is_mean_over_tokens():
    model = small_gpt()
    idx = torch.randint(0, 37, (2, 7))
    logits, loss = model(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 37), idx[:, 1:].flatten()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gpt_traces_without_graph_breaks(backend):
    """torch.compile(fullgraph=True) sees the whole model, attention included (dynamo only)."""
    torch._dynamo.reset()
    model = small_gpt(backend=backend)
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=True)
    for T in (5, 9):  # a second length: dynamic shapes, no recompile error
        idx = torch.randint(0, 37, (2, T))
        logits, loss = compiled(idx, idx)
        ref_logits, ref_loss = model(idx, idx)
        torch.testing.assert_close(logits, ref_logits)
        torch.testing.assert_close(loss, ref_loss)
