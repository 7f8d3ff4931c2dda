"""fastgpt as an attention implementation for Hugging Face transformers (optional extra ``hf``).

    import fastgpt
    fastgpt.register_hf_attention()  # -> "fastgpt"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fastgpt")

The registered function follows transformers' "sdpa" integration, with fastgpt's kernels where
it would call torch's SDPA without a mask: causal prefill, one-token decoding against the KV
cache, GQA without repeating K/V, and the attention variants transformers passes as keyword
arguments (see variant_attention): Mistral's sliding window, Gemma 2's logit softcap, gpt-oss's
learnable sinks. Padded batches (a 2-D attention_mask, left or right padding, prefill and
generate()) and packed ones (position_ids restarting per sequence, or the cu_seq_lens_q/k kwargs
of DataCollatorWithFlattening) run on fastgpt.attention_varlen: unpad, attend, pad back
(fastgpt.hf_varlen), with the variants too. Any other mask (a sliding window inside a padding
mask, biases), dropout in training, a position bias or a paged cache go to transformers' own sdpa
function (to the model's own eager function when they also carry a softcap or sinks, which sdpa
lacks), so results match what the model gives with "eager"; FASTGPT_DEBUG=1 says which path ran
and why.

transformers is imported only by register_hf_attention, never by ``import fastgpt``.
"""

import sys
from collections.abc import Callable

import torch
from torch import Tensor

from fastgpt.attention import attention, log_path, variants_in_use
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
_FALLBACK_KWARGS = ("position_bias", "cache")


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
        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
            return eager_fallback(
                module, query, key, value, attention_mask, dropout, scaling, why, kwargs
            )
        log_path("hf_attention", "transformers sdpa", why)
        return _hf_sdpa_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    if isinstance(layout, VarlenLayout):
        log_path(
            "hf_attention", "fastgpt varlen", f"{layout.sequences} sequences of a "
            f"({layout.batch}, {layout.q_len}) batch, longest {layout.max_seqlen_q}",
        )  # fmt: skip
        variants = hf_variants(kwargs, causal=True)
        return attend(query, key, value, layout, scaling, variants), None  # (B, Tq, H, D)

    # As transformers' sdpa: a single query sees the whole cache; longer query blocks without a
    # mask are causal with torch's top-left alignment (an empty cache, static slots past Tq).
    causal = is_causal and query.shape[2] > 1
    if any(kwargs.get(name) is not None for name in ("sliding_window", "softcap", "s_aux")):
        return variant_attention(query, key, value, scaling, causal, kwargs)
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


# --- The attention variants transformers passes as keyword arguments ----------------------------


def variant_attention(
    query: Tensor, key: Tensor, value: Tensor, scaling: float | None, causal: bool, kwargs: dict
) -> tuple[Tensor, None]:
    """An unmasked call with sliding_window (Mistral, Gemma 2, gpt-oss), softcap (Gemma 2) or
    s_aux (gpt-oss's sinks) on fastgpt.attention: ((B, Tq, H, D) contiguous, None).

    query: (B, H, Tq, D); key, value: (B, Hkv, Tk, D); the variants as hf_variants turns them.
    Without a mask a causal block of Tq < Tk queries is top-left aligned (an empty static cache:
    the slots past Tq hold no key yet), which is bottom-right on the first Tq keys.
    """
    tq, tk = query.shape[2], key.shape[2]
    if causal and tq < tk:
        key, value = key[:, :, :tq], value[:, :, :tq]  # (B, Hkv, Tq, D) views
    variants = hf_variants(kwargs, causal)
    used = ", ".join(variants_in_use(**variants, causal=causal))
    log_path("hf_attention", "fastgpt", f"causal={causal}, {used}")
    out = attention(query, key, value, causal=causal, scale=scaling, **variants)  # (B, H, Tq, D)
    return out.transpose(1, 2).contiguous(), None  # (B, Tq, H, D)


def hf_variants(kwargs: dict, causal: bool) -> dict[str, object]:
    """transformers' sliding_window, softcap and s_aux keyword arguments as fastgpt.attention's
    (and attention_varlen's) window, softcap and sinks. transformers' window W lets a token see
    itself and the W - 1 tokens before it: window=(W - 1, 0), or (W - 1, -1) for a query block
    that is not causal (one query against the cache)."""
    window = kwargs.get("sliding_window")
    return {
        "window": None if window is None else (window - 1, 0 if causal else -1),
        "softcap": kwargs.get("softcap") or 0.0,
        "sinks": kwargs.get("s_aux"),
    }


def eager_fallback(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float,
    scaling: float | None,
    why: str,
    kwargs: dict,
) -> tuple[Tensor, Tensor | None]:
    """A masked call with a softcap or sinks, which transformers' sdpa lacks: the model's own
    eager_attention_forward (what attn_implementation="eager" runs), found in its module, with
    the boolean sdpa mask turned into eager's additive one."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(
            f"fastgpt's attention cannot run this {type(module).__name__} call ({why} with a "
            "softcap or sinks) and its module has no eager_attention_forward to fall back to."
        )
    log_path("hf_attention", "the model's eager attention", f"{why} with softcap or sinks")
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        # The sdpa mask says True where a query may look; eager adds its mask to the scores.
        hidden = torch.finfo(query.dtype).min
        additive = torch.zeros_like(attention_mask, dtype=query.dtype)  # (B, 1, Tq, Tk)
        attention_mask = additive.masked_fill(~attention_mask, hidden)
    return eager(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


def sdpa_mask_without_window(*args, **kwargs):
    """transformers' sdpa mask function, except that the model's sliding window alone never makes
    a mask: fastgpt applies it from the sliding_window keyword (as transformers' flash-attention
    path does), so an unpadded sliding layer gets None and runs on fastgpt's kernels. Padding
    still makes a mask, the window in it."""
    from transformers.masking_utils import sdpa_mask

    window = getattr(kwargs.get("config"), "sliding_window", None)
    if window is not None and kwargs.get("local_size") == window:  # not a chunked layer's size
        kwargs["local_size"] = None
    return sdpa_mask(*args, **kwargs)


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
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        # Older transformers build masks without this registry; every masked call then falls back.
        return name
    # The sdpa mask function returns None where plain causal attention is exact, which is the
    # signal fastgpt_attention_forward uses to run on fastgpt's kernels.
    AttentionMaskInterface.register(name, sdpa_mask_without_window)
    return name
