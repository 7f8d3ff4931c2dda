"""fastgpt: fused causal attention kernels and a GPT that runs on them."""

from fastgpt import nn, ops  # noqa: F401  (ops registers the fastgpt:: torch.library ops)
from fastgpt.attention import attention, available_backends
from fastgpt.dropin import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
    scaled_dot_product_attention,
)
from fastgpt.hf import register_hf_attention
from fastgpt.kvcache import attention_with_kvcache
from fastgpt.model import GPT, GPTConfig
from fastgpt.reference import reference_attention
from fastgpt.seq2seq import Seq2Seq, Seq2SeqConfig
from fastgpt.varlen import attention_varlen

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "GPTConfig",
    "Seq2Seq",
    "Seq2SeqConfig",
    "attention",
    "attention_varlen",
    "attention_with_kvcache",
    "available_backends",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "nn",
    "register_hf_attention",
    "reference_attention",
    "scaled_dot_product_attention",
]
