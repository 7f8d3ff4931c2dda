"""fastgpt's GPT <-> Hugging Face GPT-2: the same weights, the same logits (GPT.from_hf, GPT.to_hf).

    model = GPT.from_hf("path/to/gpt2")      # a local folder: config.json + model.safetensors
    model = GPT.from_hf(hf_model)            # or a transformers GPT2LMHeadModel
    hf_model = model.to_hf()                 # a GPT2LMHeadModel; .save_pretrained(folder)

Nothing is downloaded: a folder is read with json and safetensors (transformers is needed only to
build a GPT2LMHeadModel in to_hf). GPT-2 and fastgpt's GPT are one architecture: learned
positions, pre-LayerNorm blocks, a fused q|k|v projection split head-major, a 4x MLP (GELU, tanh
approximation), a head tied to the token embedding. GPT-2's Conv1D layers store weights as
(in, out): they are transposed into nn.Linear's (out, in) and back.
"""

import json
from pathlib import Path

import torch
from torch import Tensor

from fastgpt.model import GPT, GPTConfig

# transformers' activation_function names <-> GPTConfig.activation.
HF_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}
TO_HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
# GPT-2 parameter names (per block, after "h.{i}.") that are Conv1D weights, stored (in, out).
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BLOCK_PARAMS = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def config_from_hf(hf: dict, **overrides) -> GPTConfig:
    """GPTConfig of a GPT-2 config.json dict (or GPT2Config.to_dict()); overrides win."""
    _check(
        hf.get("model_type") == "gpt2", f"Not a GPT-2 config: model_type {hf.get('model_type')!r}."
    )
    missing = [
        k for k in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd") if k not in hf
    ]
    _check(not missing, f"The GPT-2 config lacks {', '.join(missing)}.")
    act = hf.get("activation_function", "gelu_new")
    _check(act in HF_ACTIVATIONS, f"GPT-2 activation_function {act!r} has no fastgpt equivalent.")
    n_embd, n_inner = hf["n_embd"], hf.get("n_inner")
    _check(
        n_inner in (None, 4 * n_embd), f"fastgpt's MLP is 4 x n_embd wide, got n_inner={n_inner}."
    )
    _check(
        hf.get("tie_word_embeddings", True), "fastgpt's GPT ties its head to wte; this is untied."
    )
    _check(
        hf.get("scale_attn_weights", True) and not hf.get("scale_attn_by_inverse_layer_idx", False),
        "fastgpt scales attention by 1/sqrt(head dim) only; this GPT-2 config scales otherwise.",
    )
    fields = dict(
        vocab_size=hf["vocab_size"],
        block_size=hf["n_positions"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=n_embd,
        dropout=0.0,  # GPT-2's dropouts are for training; set dropout= to fine-tune with one
        bias=True,
        activation=HF_ACTIVATIONS[act],
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )
    config = GPTConfig(**{**fields, **overrides})
    _check(
        config.tie_head, "GPT-2 ties its head to wte; tie_head=False has no GPT-2 weights to load."
    )
    return config


def _read_folder(folder: Path) -> tuple[dict, dict[str, Tensor]]:
    """(config dict, state dict) of a save_pretrained folder: config.json + model.safetensors."""
    from safetensors.torch import load_file

    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: GPT.from_hf reads a folder written by save_pretrained "
                "(config.json and model.safetensors)."
            )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}.") from None
    return config, load_file(str(weights_path))


def _fastgpt_name(gpt2_name: str) -> str:
    """GPT-2's "h.3.attn.c_attn.weight" is fastgpt's "blocks.3.attn.c_attn.weight"; others agree."""
    return "blocks." + gpt2_name.removeprefix("h.") if gpt2_name.startswith("h.") else gpt2_name


def _gpt2_names(config: GPTConfig) -> list[str]:
    """GPT-2's parameter names (without "transformer.") for a model of config's size."""
    names = ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"]
    for i in range(config.n_layer):
        names += [f"h.{i}.{p}.{kind}" for p in BLOCK_PARAMS for kind in ("weight", "bias")]
    return names


def _is_conv1d(gpt2_name: str) -> bool:
    return gpt2_name.split(".", 2)[-1] in CONV1D


def gpt2_state_to_fastgpt(state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """GPT-2 parameter names and layouts -> fastgpt's GPT state dict (head tied: no lm_head)."""
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    missing = [n for n in _gpt2_names(config) if n not in state]
    _check(not missing, f"The GPT-2 weights lack {', '.join(missing[:4])} (of {len(missing)}).")
    return {
        _fastgpt_name(n): state[n].t() if _is_conv1d(n) else state[n] for n in _gpt2_names(config)
    }


def fastgpt_state_to_gpt2(model: GPT) -> dict[str, Tensor]:
    """fastgpt's GPT weights under GPT-2's names and layouts ("transformer." prefix, no head).

    A model built with bias=False gets zero biases: the same function under GPT-2's layers.
    """
    ours = model.state_dict()
    state = {}
    for name in _gpt2_names(model.config):
        t = ours.get(_fastgpt_name(name))
        if t is None:  # a bias of a bias=False model: as long as the weight's first dim
            weight = ours[_fastgpt_name(name).removesuffix("bias") + "weight"]
            t = torch.zeros(weight.shape[0], dtype=weight.dtype)
        state["transformer." + name] = t.t() if _is_conv1d(name) else t
    return state


def _load(module: torch.nn.Module, state: dict[str, Tensor], tied: str) -> None:
    """load_state_dict, every parameter but the tied head required; one-line errors."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that do not fit the config
        detail = str(error).splitlines()[-1].strip()
        raise ValueError(f"The weights do not fit the config: {detail}") from None
    missing = set(result.missing_keys) - {tied}
    _check(not missing, f"No weights for {', '.join(sorted(missing)[:4])}.")


def from_hf(source: "str | Path | torch.nn.Module", **overrides) -> GPT:
    """fastgpt GPT with the weights of a local GPT-2 folder or a transformers GPT2LMHeadModel.

    overrides are GPTConfig fields (e.g. backend="cpp", dropout=0.1); logits equal
    transformers' on the same input, up to floating-point rounding.
    """
    if isinstance(source, torch.nn.Module):
        hf_config, state = source.config.to_dict(), source.state_dict()
    else:
        hf_config, state = _read_folder(Path(source))
    config = config_from_hf(hf_config, **overrides)
    weights = gpt2_state_to_fastgpt(state, config)
    model = GPT(config).to(weights["wte.weight"].dtype)
    _load(model, weights, tied="lm_head.weight")
    return model


def to_hf(model: GPT) -> "torch.nn.Module":
    """A transformers GPT2LMHeadModel with model's weights (same logits), in model's dtype, on CPU.

    Needs transformers (pip install 'fastgpt[hf]'); save it with .save_pretrained(folder).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    _check(
        c.n_kv_head in (None, c.n_head), f"GPT-2 has no grouped kv heads (n_kv_head {c.n_kv_head})."
    )
    _check(c.tie_head, "GPT-2 ties its head to wte; this model has its own head (tie_head=False).")
    _check(
        c.window is None and c.softcap == 0.0 and not c.sinks,
        "GPT-2 has no sliding window, softcap or attention sinks (this model's config has one).",
    )
    hf_config = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        activation_function=TO_HF_ACTIVATION[c.activation],
        layer_norm_epsilon=c.layer_norm_eps,
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=0.0,  # fastgpt's kernels have no attention dropout
        bos_token_id=None,  # GPT-2's 50256 would not fit a smaller vocabulary
        eos_token_id=None,
    )
    hf = GPT2LMHeadModel(hf_config).to(model.wte.weight.dtype)
    _load(hf, fastgpt_state_to_gpt2(model), tied="lm_head.weight")
    hf.tie_weights()
    return hf
