"""fastgpt as an attention implementation for Hugging Face transformers (optional extra ``hf``).

    import fastgpt
    fastgpt.register_hf_attention()  # -> "fastgpt"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fastgpt")

The registered function follows transformers' "sdpa" integration, with fastgpt's kernels where
it would call torch's SDPA without a mask: causal prefill, one-token decoding against the KV
cache, GQA without repeating K/V. Padded batches (a 2-D attention_mask, left or right padding,
prefill and generate()) and packed ones (position_ids restarting per sequence, or the
cu_seq_lens_q/k kwargs of DataCollatorWithFlattening) run on fastgpt.attention_varlen: unpad,
attend, pad back (fastgpt.hf_varlen). Any other mask (sliding windows, biases), dropout in
training, a position bias or a paged cache go to transformers' own sdpa function, so results match
what the model gives with "eager" and "sdpa"; FASTGPT_DEBUG=1 says which path ran and why.

transformers is imported only by register_hf_attention, never by ``import fastgpt``.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from fastgpt.attention import log_path
from fastgpt.dropin import scaled_dot_product_attention
from fastgpt.hf_varlen import (
    VarlenLayout,
    attend,
    cached,
    layout_from_kwargs,
    layout_from_mask,
    layout_from_positions,
)

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
    A padding or packing mask (or the flattening collator's cu_seq_lens_q/k kwargs) runs on
    fastgpt.attention_varlen; other masks on transformers' sdpa.
    """
    extras = [name for name in _FALLBACK_KWARGS if kwargs.get(name) is not None]
    why = ", ".join(extras) or (f"dropout={dropout}" if dropout > 0.0 else None)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    layout = None if why else _padding_or_packing(query, key, attention_mask, is_causal, kwargs)
    why = layout if isinstance(layout, str) else why
    if why is not None:
        log_path("hf_attention", "transformers sdpa", why)
        return _hf_sdpa_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    if isinstance(layout, VarlenLayout):
        log_path(
            "hf_attention", "fastgpt varlen", f"{layout.sequences} sequences of a "
            f"({layout.batch}, {layout.q_len}) batch, longest {layout.max_seqlen_q}",
        )  # fmt: skip
        return attend(query, key, value, layout, scaling), None  # (B, Tq, H, D)

    # As transformers' sdpa: a single query sees the whole cache; longer query blocks without a
    # mask are causal with torch's top-left alignment (an empty cache, static slots past Tq).
    causal = is_causal and query.shape[2] > 1
    log_path("hf_attention", "fastgpt", f"causal={causal}")
    out = scaled_dot_product_attention(
        query, key, value, is_causal=causal, scale=scaling, enable_gqa=True
    )  # (B, H, Tq, D)
    return out.transpose(1, 2).contiguous(), None  # (B, Tq, H, D)


def _padding_or_packing(
    query: Tensor, key: Tensor, attention_mask: Tensor | None, causal: bool, kwargs: dict
) -> VarlenLayout | str | None:
    """The varlen layout of a padded or packed call, from the flattening collator's kwargs, the
    mask, or (without a mask) restarting position_ids; None for plain attention; a reason string
    for a mask that is neither. The kwargs and position_ids count for causal modules only (the
    mask says what any module sees). query (B, H, Tq, D), key (B, Hkv, Tk, D)."""
    B, Tq, Tk = query.shape[0], query.shape[2], key.shape[2]
    layout = layout_from_kwargs(kwargs, B, Tq, Tk) if causal else None
    if layout is not None:
        return layout
    if attention_mask is not None:
        if attention_mask.shape[-2:] != (Tq, Tk):
            return f"a mask of shape {tuple(attention_mask.shape)} for {Tq} queries and {Tk} keys"
        return cached(layout_from_mask, attention_mask, B)
    positions = kwargs.get("position_ids")
    if causal and isinstance(positions, Tensor) and Tq == Tk > 1 and positions.shape[-1] == Tq:
        return cached(layout_from_positions, positions, B)
    return None


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
