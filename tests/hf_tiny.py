"""Tiny Hugging Face causal LMs for the tests: GPT-2 and Llama (GQA) built with from_config
(nothing downloaded), the same weights (seed 0) under any attn_implementation. Import it after
pytest.importorskip("transformers")."""

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

VOCAB = 64
PAD = VOCAB - 1  # also the end-of-sequence token
TOKENS = dict(bos_token_id=0, eos_token_id=PAD, pad_token_id=PAD)
CONFIGS = {
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, **TOKENS
    ),
    # 4 query heads sharing 2 key/value heads: Llama-style GQA.
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **TOKENS,
    ),  # fmt: skip
}


def build(arch: str, implementation: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny model (a key of CONFIGS) with the weights of seed 0 under `implementation`, in eval
    mode."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](), attn_implementation=implementation)
    assert model.config._attn_implementation == implementation
    return model.to(dtype).eval()
