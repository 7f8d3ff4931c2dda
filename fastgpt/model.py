"""A GPT (decoder-only transformer) whose attention runs on fastgpt's kernels.

Token + learned position embeddings, pre-LayerNorm blocks (causal self-attention, then a 4x MLP,
each added to the residual stream), a final LayerNorm and an LM head (tied to the token embedding
unless tie_head=False).
GPT-2 initialisation, with the residual output projections scaled by 1/sqrt(2 * n_layer), so
the loss at step 0 is close to ln(vocab_size).
"""

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgpt.generation import decode_batch, prompt_lists
from fastgpt.nn import (
    ACTIVATIONS,
    AttentionFn,
    CausalSelfAttention,
    FeedForward,
    KVCache,
    check_layer_variants,
    init_weights,
)


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # tokens the model reads and predicts (set from the tokenizer)
    block_size: int = 1024  # longest context, in tokens (size of the position embedding)
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # query heads per attention layer
    n_kv_head: int | None = None  # key/value heads (GQA); None means n_head
    n_embd: int = 768  # model width; head dim is n_embd // n_head
    dropout: float = 0.0  # on embeddings, attention output and MLP output (training only)
    bias: bool = True  # biases in the linear layers and LayerNorms, as GPT-2
    activation: str = "gelu"  # MLP non-linearity: "gelu", "gelu_tanh" (GPT-2's) or "relu"
    layer_norm_eps: float = 1e-5  # epsilon of every LayerNorm (GPT-2: 1e-5)
    tie_head: bool = True  # the LM head shares the token embedding's matrix (GPT-2); False: its own
    backend: str | None = None  # fastgpt.attention backend name; None picks automatically
    window: int | None = None  # sliding window: a token sees itself and `window` before it
    global_every: int | None = None  # with window: every global_every-th layer is global
    softcap: float = 0.0  # attention logit softcap c * tanh(s / c) (Gemma 2: 50.0); 0: off
    sinks: bool = False  # a learnable per-head attention sink logit in every layer (gpt-oss)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}."
            )
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}.")
        check_layer_variants(self.window, self.softcap)
        every = self.global_every
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"GPTConfig.global_every must be None or an int >= 1, got {every!r}.")

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of block `layer` (0-based): `window`, except on the global layers
        global_every - 1, 2 global_every - 1, ... (Gemma 2 is window=4095, global_every=2)."""
        if self.global_every is not None and (layer + 1) % self.global_every == 0:
            return None
        return self.window

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Architectures only; the vocabulary size comes from the tokenizer at training time.
PRESETS: dict[str, dict] = {
    # The seed notebook's model: 2 layers, 2 heads, 32 dims, a 6-word context, ReLU, own head.
    "tiny": dict(block_size=6, n_layer=2, n_head=2, n_embd=32, activation="relu", tie_head=False),
    # A character-level Shakespeare-class model (as nanoGPT's shakespeare_char).
    "small": dict(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
    # GPT-2 small: 124M parameters with GPT-2's 50257-token vocabulary.
    "gpt2": dict(block_size=1024, n_layer=12, n_head=12, n_embd=768),
}


def preset_config(name: str, **overrides) -> GPTConfig:
    """GPTConfig of a preset ("tiny", "small", "gpt2"), with fields overridden by keyword."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; expected one of {', '.join(PRESETS)}.")
    return GPTConfig(**{**PRESETS[name], **overrides})


def document_positions(cu_seqlens: Tensor, idx: Tensor, block_size: int) -> tuple[Tensor, int]:
    """Positions restarting at 0 in each packed document, (B, T), and a bound on the longest
    document: its length, or block_size under torch.compile (where reading it would break the
    graph and the values go unchecked).

    cu_seqlens: int32 (N + 1,) prefix sums of the document lengths over idx.flatten() (B T,).
    """
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        shape = tuple(cu_seqlens.shape) if isinstance(cu_seqlens, Tensor) else cu_seqlens
        raise ValueError(f"cu_seqlens must be a 1-d (N + 1,) tensor of prefix sums, got {shape}.")
    lengths = cu_seqlens.diff()  # (N,)
    longest = block_size
    if not torch.compiler.is_compiling():
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != idx.numel() or int(lengths.min()) < 0:
            raise ValueError(
                f"cu_seqlens must run from 0 to the {idx.numel()} tokens of idx "
                f"{tuple(idx.shape)} without decreasing, got {cu_seqlens.tolist()}."
            )
        longest = int(lengths.max())
        if longest > block_size:
            raise ValueError(
                f"A document of {longest} tokens does not fit the model's context of "
                f"{block_size} tokens (idx {tuple(idx.shape)})."
            )
    starts = cu_seqlens[:-1].repeat_interleave(lengths, output_size=idx.numel())  # (B T,)
    pos = torch.arange(idx.numel(), device=idx.device) - starts  # (B T,)
    return pos.view(idx.shape), longest


class Block(nn.Module):
    def __init__(
        self, config: GPTConfig, attention_fn: AttentionFn | None = None, layer: int = 0
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(
            config.n_embd,
            config.n_head,
            config.n_kv_head,
            bias=config.bias,
            dropout=config.dropout,
            backend=config.backend,
            attention_fn=attention_fn,
            window=config.layer_window(layer),
            softcap=config.softcap,
            sinks=config.sinks,
        )
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = FeedForward(config.n_embd, config.activation, config.bias, config.dropout)

    def forward(self, x: Tensor, kv_cache: KVCache | None = None, **documents) -> Tensor:
        """x: (B, T, C) -> (B, T, C); documents: cu_seqlens, max_seqlen (CausalSelfAttention)."""
        x = x + self.attn(self.ln_1(x), kv_cache, **documents)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT(nn.Module):
    """The model of config; attention_fn replaces fastgpt.attention in every block (None: keep).

    attention_fn is not part of the config (it is not saved): a seam for comparing attentions
    (bench/train.py swaps in torch SDPA) with everything else the same.
    """

    def __init__(self, config: GPTConfig, attention_fn: AttentionFn | None = None) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, attention_fn, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_head:
            self.lm_head.weight = self.wte.weight  # tied: one matrix embeds and predicts tokens

        self.apply(init_weights)
        # GPT-2: each residual branch's output projection scaled by 1/sqrt(2 * n_layer), so the
        # residual stream's variance does not grow with depth.
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position embedding (as GPT-2 counts)."""
        n = sum(p.numel() for p in self.parameters())  # the tied head is counted once
        return n - self.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), counted as nanoGPT: 6N + 12 L H Q T."""
        c, T = self.config, seq_len or self.config.block_size
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * T

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
        *,
        cu_seqlens: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """idx, targets: (B, T) token ids -> (logits (B, T, V), mean cross-entropy or None).

        With kv_caches (one per block, from new_kv_caches), idx holds the tokens after the cached
        ones and positions continue from there.

        With cu_seqlens, idx packs several documents: int32 (N + 1,) prefix sums of the document
        lengths over the B T tokens of idx.flatten() (flash-attn's cu_seqlens; fastgpt.varlen.
        cu_seqlens_from_lengths makes it). Attention never crosses a document boundary and
        positions restart at 0 in each document, so each document's logits are those of the
        model run on it alone. Read on the host (a sync on CUDA); not with kv_caches.
        """
        B, T = idx.shape
        if cu_seqlens is not None:
            pos, max_seqlen = document_positions(cu_seqlens, idx, self.config.block_size)
            documents = {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
            if kv_caches is not None:
                raise ValueError("GPT.forward takes cu_seqlens or kv_caches, not both.")
        else:
            pos, documents = self._positions(idx, kv_caches), {}  # (T,) or (B, T)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, kv_caches[i] if kv_caches is not None else None, **documents)  # (B, T, C)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def _positions(self, idx: Tensor, kv_caches: list[KVCache] | None) -> Tensor:
        """Positions of idx (B, T) after the cached ones: (T,), or (B, T) when the cache's rows
        have different lengths (each row continues from its own)."""
        T, lengths = idx.shape[1], kv_caches[0].lengths if kv_caches is not None else []
        start = max(lengths, default=0)
        if start + T > self.config.block_size:
            raise ValueError(
                f"Cannot run {start + T} positions (idx {tuple(idx.shape)}, {start} cached): "
                f"the model's context is {self.config.block_size} tokens."
            )
        if len(set(lengths)) > 1:
            return kv_caches[0].seqlens.long()[:, None] + torch.arange(T, device=idx.device)
        return torch.arange(start, start + T, device=idx.device)  # (T,)

    def new_kv_caches(self, page_size: int | None = None) -> list[KVCache]:
        """One empty KV cache per block, of block_size positions per row; page_size: paged."""
        return [KVCache(self.config.block_size, page_size) for _ in self.blocks]

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor | Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int],
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        *,
        lengths: Sequence[int] | Tensor | None = None,
        end_id: int | None = None,
        page_size: int | None = None,
    ) -> Tensor | list[list[int]]:
        """Continue idx (B, T) by max_new_tokens tokens -> (B, T + max_new_tokens).

        temperature 0 picks the most likely token (greedy); top_k keeps the k likeliest.
        While the text fits the context, a KV cache makes each step cost one position; past
        block_size the context is cropped to its last block_size tokens and recomputed (learned
        positions shift with the window), so the tokens are those of use_cache=False.

        A batch of prompts of different lengths: idx a list of token-id lists, or (B, T) right-
        padded with lengths (B,); max_new_tokens an int or one per prompt; end_id stops a row
        after it draws that token. Each prompt keeps its own KV-cache row (page_size: a paged
        cache of that many positions per page) and, decoded greedily, gets exactly the tokens it
        would get alone. Returns a list: each prompt followed by its new tokens (also when idx is
        a tensor given with lengths or end_id, or max_new_tokens is a list).
        """
        uniform = lengths is None and end_id is None and isinstance(max_new_tokens, int)
        if isinstance(idx, Tensor) and uniform:  # every row continued by max_new_tokens
            new = self.generate_tokens(
                idx, max_new_tokens, temperature, top_k, generator, use_cache, page_size
            )
            return torch.cat([idx, *new], dim=1)
        prompts = prompt_lists(idx, lengths)
        out = [list(p) for p in prompts]
        for rows, tokens in self.generate_stream(
            prompts, max_new_tokens, temperature, top_k, generator, use_cache, end_id, page_size
        ):
            for b, token in zip(rows, tokens.tolist(), strict=True):
                out[b].append(token)
        return out

    @torch.no_grad()
    def generate_tokens(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        page_size: int | None = None,
    ) -> Iterator[Tensor]:
        """generate() one token at a time: yields each new token (B, 1) as soon as it is drawn."""
        if idx.shape[1] == 0:
            raise ValueError(f"generate needs at least one token to start from, got {idx.shape}.")
        prompts = idx.tolist()
        steps = self.generate_stream(
            prompts, max_new_tokens, temperature, top_k, generator, use_cache, None, page_size
        )
        for _, tokens in steps:  # every row draws a token at every step
            yield tokens[:, None]  # (B, 1)

    @torch.no_grad()
    def generate_stream(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int],
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        end_id: int | None = None,
        page_size: int | None = None,
    ) -> Iterator[tuple[list[int], Tensor]]:
        """Batched generation step by step: yields (rows, tokens (len(rows),)): the prompts that
        drew a token this step (ascending) and those tokens. See generate and fastgpt.generation.
        """
        yield from decode_batch(
            self, prompts, max_new_tokens, temperature, top_k, generator, use_cache, end_id,
            page_size,
        )  # fmt: skip

    @classmethod
    def from_hf(cls, source: "str | os.PathLike | nn.Module", **overrides) -> "GPT":
        """A GPT with the weights of a local Hugging Face GPT-2 (a save_pretrained folder, or a
        transformers GPT2LMHeadModel); overrides are GPTConfig fields. See fastgpt.hf_convert."""
        from fastgpt.hf_convert import from_hf

        return from_hf(source, **overrides)

    def to_hf(self) -> nn.Module:
        """This model as a transformers GPT2LMHeadModel (same logits). See fastgpt.hf_convert."""
        from fastgpt.hf_convert import to_hf

        return to_hf(self)
