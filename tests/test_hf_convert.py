"""GPT.from_hf / GPT.to_hf: a tiny random GPT-2 (GPT2Config, from_config, nothing downloaded) saved
with save_pretrained, loaded into fastgpt's GPT and back; logits compared in float64."""

import json

import pytest
import torch
from oracle import CPU_BACKENDS, F64

from fastgpt.model import GPT, GPTConfig

pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402


def tiny_gpt2(**config) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    sizes = dict(vocab_size=61, n_positions=24, n_embd=32, n_layer=2, n_head=4)
    cfg = GPT2Config(**{**sizes, **config}, bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(cfg).double().eval()


def tokens(n: int = 19) -> torch.Tensor:
    return torch.randint(0, 61, (2, n), generator=torch.Generator().manual_seed(1))  # (B, T)


def hf_logits(hf: GPT2LMHeadModel, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(idx).logits  # (B, T, V)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_from_a_save_pretrained_folder_gives_transformers_logits(tmp_path, backend):
    hf = tiny_gpt2()
    hf.save_pretrained(tmp_path)
    model = GPT.from_hf(tmp_path, backend=backend).eval()
    assert model.config.activation == "gelu_tanh" and model.config.block_size == 24
    assert model.wte.weight.dtype == torch.float64 and model.config.backend == backend
    with torch.no_grad():
        got, _ = model(tokens())
    torch.testing.assert_close(got, hf_logits(hf, tokens()), **F64)


def test_from_a_model_object_and_other_activations():
    for act, ours in [("gelu_new", "gelu_tanh"), ("gelu", "gelu"), ("relu", "relu")]:
        hf = tiny_gpt2(activation_function=act, layer_norm_epsilon=1e-3)
        model = GPT.from_hf(hf, backend="reference").eval()
        assert model.config.activation == ours and model.config.layer_norm_eps == 1e-3
        with torch.no_grad():
            got, _ = model(tokens())
        torch.testing.assert_close(got, hf_logits(hf, tokens()), **F64)


@pytest.mark.parametrize("bias", [True, False])
def test_to_hf_gives_the_same_logits_and_round_trips(tmp_path, bias):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_embd=32, bias=bias)
    model = GPT(config).double().eval()
    torch.nn.init.normal_(model.blocks[0].ln_1.weight)  # nothing left at its default
    hf = model.to_hf().eval()
    assert isinstance(hf, GPT2LMHeadModel) and hf.lm_head.weight is hf.transformer.wte.weight
    with torch.no_grad():
        want, _ = model(tokens())
    torch.testing.assert_close(hf_logits(hf, tokens()), want, **F64)
    hf.save_pretrained(tmp_path)
    back = GPT.from_hf(tmp_path, bias=True, backend="reference").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens())[0], want, **F64)


def test_fine_tuning_a_loaded_model_trains(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    model = GPT.from_hf(tmp_path, backend="reference").float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = tokens(13)
    losses = []
    for _ in range(5):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model.lm_head.weight is model.wte.weight  # still tied after loading


def test_unsupported_checkpoints_are_one_line_errors(tmp_path):
    cases = {
        "untied": (dict(tie_word_embeddings=False), "ties its head"),
        "inner": (dict(n_inner=40), "4 x n_embd wide, got n_inner=40"),
        "act": (dict(activation_function="silu"), "'silu' has no fastgpt equivalent"),
        "layer scale": (dict(scale_attn_by_inverse_layer_idx=True), "1/sqrt"),
    }
    for name, (config, message) in cases.items():
        with pytest.raises(ValueError, match=message) as info:
            GPT.from_hf(tiny_gpt2(**config))
        assert "\n" not in str(info.value), name
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        GPT.from_hf(tmp_path)
    hf = tiny_gpt2()
    hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        GPT.from_hf(tmp_path)
    config = hf.config.to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="Not a GPT-2 config: model_type 'llama'"):
        GPT.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(ValueError, match=r"lack h\.2\.ln_1\.weight"):
        GPT.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    with pytest.raises(ValueError, match="do not fit the config"):
        GPT.from_hf(tmp_path)
    gqa = GPT(GPTConfig(vocab_size=61, block_size=8, n_layer=1, n_head=4, n_kv_head=2, n_embd=32))
    with pytest.raises(ValueError, match="no grouped kv heads"):
        gqa.to_hf()
    untied = GPT(
        GPTConfig(vocab_size=61, block_size=8, n_layer=1, n_head=2, n_embd=32, tie_head=False)
    )
    with pytest.raises(ValueError, match="has its own head"):
        untied.to_hf()
    with pytest.raises(ValueError, match="tie_head=False has no GPT-2 weights"):
        GPT.from_hf(tiny_gpt2(), tie_head=False)
