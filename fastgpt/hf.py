"""fastgpt as an attention implementation for Hugging Face transformers (optional extra ``hf``).

    import fastgpt
    fastgpt.register_hf_attention()  # -> "fastgpt"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fastgpt")

The registered function follows transformers' "sdpa" integration, with fastgpt's kernels where
it would call torch's SDPA without a mask: causal prefill, one-token decoding against the KV
cache, GQA without repeating K/V. Calls that carry a mask (padding, packed sequences, sliding
windows), dropout in training, a position bias or a paged cache go to transformers' own sdpa
function, so results match what the model gives with "eager" and "sdpa".

transformers is imported only by register_hf_attention, never by ``import fastgpt``.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from fastgpt.attention import log_path
from fastgpt.dropin import scaled_dot_product_attention

# transformers' sdpa attention function, looked up by register_hf_attention.
_hf_sdpa_forward: Callable | None = None
_FALLBACK_KWARGS = ("position_bias", "cache", "softcap", "s_aux")


def fastgpt_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention interface: returns ((B, Tq, H, D) contiguous, None).

    query: (B, H, Tq, D); key, value: (B, Hkv, Tk, D); attention_mask: None or a (B, 1, Tq, Tk)
    mask made by transformers' sdpa mask function (None when plain causal attention is exact).
    """
    extras = [name for name in _FALLBACK_KWARGS if kwargs.get(name) is not None]
    if attention_mask is not None or dropout > 0.0 or extras:
        why = "an attention mask" if attention_mask is not None else f"dropout={dropout}"
        log_path("hf_attention", "transformers sdpa", ", ".join(extras) or why)
        return _hf_sdpa_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )

    # As transformers' sdpa: a single query sees the whole cache; longer query blocks without a
    # mask are causal with torch's top-left alignment (an empty cache, static slots past Tq).
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = is_causal and query.shape[2] > 1
    log_path("hf_attention", "fastgpt", f"causal={causal}")
    out = scaled_dot_product_attention(
        query, key, value, is_causal=causal, scale=scaling, enable_gqa=True
    )  # (B, H, Tq, D)
    return out.transpose(1, 2).contiguous(), None  # (B, Tq, H, D)


def register_hf_attention(name: str = "fastgpt") -> str:
    """Register fastgpt in transformers' AttentionInterface (and its mask function) under `name`.

    Afterwards ``AutoModelForCausalLM.from_config(cfg, attn_implementation=name)`` and
    ``model.set_attn_implementation(name)`` run the model's attention on fastgpt. Returns `name`.
    Needs transformers (``pip install 'fastgpt[hf]'``).
    """
    global _hf_sdpa_forward
    if not isinstance(name, str) or not name or "/" in name or ":" in name:
        raise ValueError(
            f"register_hf_attention needs a plain name without '/' or ':' "
            f"(transformers reads those as hub kernels), got {name!r}."
        )
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError as error:
        raise ImportError(
            "register_hf_attention needs transformers: pip install 'fastgpt[hf]'."
        ) from error

    _hf_sdpa_forward = sdpa_attention_forward
    AttentionInterface.register(name, fastgpt_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        # Older transformers build masks without this registry; every masked call then falls back.
        return name
    # The sdpa mask function returns None where plain causal attention is exact, which is the
    # signal fastgpt_attention_forward uses to run on fastgpt's kernels.
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
