"""fastgpt.nn: the causal self-attention module the GPT model is built on, usable on its own, and
the encoder-decoder pieces (CrossAttention, EncoderBlock, DecoderBlock, sinusoidal_positions).

    from fastgpt.nn import CausalSelfAttention
    attn = CausalSelfAttention(n_embd=256, n_head=8, n_kv_head=2)  # GQA: 8 query heads, 2 kv heads
    y = attn(x)  # x, y: (B, T, n_embd)
    local = CausalSelfAttention(256, 8, window=127, softcap=30.0, sinks=True)  # the variants

One fused linear layer computes q, k and v; they are cut out of its output as views (no copy) and
handed to fastgpt.attention with the backend name given at construction (None = automatic pick),
or to another function with its signature given as attention_fn (e.g. torch SDPA, to compare).
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fastgpt.attention import attention
from fastgpt.kvcache import (
    KVCACHE_KERNELS,
    append_to_cache,
    attention_with_kvcache,
    check_page_size,
)
from fastgpt.varlen import attention_varlen

# fastgpt.attention's signature: (q, k, v, *, causal, backend) -> out (B, H, Tq, D).
AttentionFn = Callable[..., Tensor]


def _head_counts(n_embd: int, n_head: int, n_kv_head: int | None) -> tuple[int, int, int]:
    """Check the head counts of an attention layer; return (H, Hkv, head dim D = C // H)."""
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    if n_head <= 0 or n_embd % n_head != 0:
        raise ValueError(f"n_embd ({n_embd}) must be a positive multiple of n_head ({n_head}).")
    if n_kv_head <= 0 or n_head % n_kv_head != 0:
        raise ValueError(
            f"n_head ({n_head}) must be a positive multiple of n_kv_head ({n_kv_head})."
        )
    return n_head, n_kv_head, n_embd // n_head


def check_layer_variants(window: object, softcap: object) -> None:
    """Raise ValueError with one sentence for a layer's window (None or int >= 0) or softcap
    (finite, >= 0)."""
    if window is not None and (
        not isinstance(window, int) or isinstance(window, bool) or window < 0
    ):
        raise ValueError(
            f"window must be None or an int >= 0 (keys before each token), got {window!r}."
        )
    if not isinstance(softcap, int | float) or not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite number >= 0 (0 turns it off), got {softcap!r}.")


def init_weights(module: nn.Module, embedding_std: float = 0.02) -> None:
    """GPT-2's initialisation of one module (use with Module.apply): linear weights N(0, 0.02),
    biases zero, embeddings N(0, embedding_std)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=embedding_std)


class KVCache:
    """Keys and values of the positions seen so far, for one attention layer (generation).

    One length per sequence (row): row b holds positions [0, lengths[b]). Storage is allocated on
    the first append in the dtype and device of the keys (so autocast works), in flash-attn's
    layout for fastgpt.attention_with_kvcache:

        dense (page_size None): k, v (B, max_len, Hkv, D), one row of max_len slots per sequence
        paged (page_size P):    k, v (num_pages, P, Hkv, D) pages and block_table
                                (B, ceil(max_len / P)) int32; a row takes pages from the pool as it
                                grows (the pool doubles when empty), so memory follows the lengths.

    lengths (host list) and seqlens ((B,) int32 on the device) say the same; rewind() shortens
    rows, select() keeps some rows (a paged cache returns the others' pages to the pool).
    """

    def __init__(self, max_len: int, page_size: int | None = None) -> None:
        if page_size is not None:
            check_page_size(page_size)
        self.max_len, self.page_size = max_len, page_size
        self.lengths: list[int] = []
        self.seqlens: Tensor | None = None  # (B,) int32
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.block_table: Tensor | None = None  # (B, max_blocks) int32 when paged
        self.pages: list[list[int]] = []  # each row's page ids, in order
        self.free: list[int] = []  # unused page ids of the pool

    @property
    def length(self) -> int:
        """The longest row's length (every row's, when they are one length)."""
        return max(self.lengths, default=0)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, backend: str | None = None, **variants
    ) -> Tensor:
        """Append k, v (B, T, Hkv, D) after each row's cached positions and attend q (B, T, H, D)
        to each row's keys, causal: query i of row b sees its positions <= lengths[b] + i.
        -> (B, T, H, D). A backend without a KV-cache kernel gives way to the automatic pick.
        variants: the layer's window / softcap / sinks (fastgpt.attention's keywords)."""
        self._reserve(k)
        if backend not in KVCACHE_KERNELS:  # no KV-cache kernel: the automatic pick (debug logs it)
            backend = None
        y = attention_with_kvcache(
            q, self.k, self.v, k, v, cache_seqlens=self.seqlens, block_table=self.block_table,
            causal=True, backend=backend, **variants,
        )  # fmt: skip
        self._advance(k.shape[1])
        return y

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (B, T, Hkv, D); return every key and value as (B, Hkv, Tk, D) views (a
        dense cache whose rows are one length only: for an attention_fn that takes them)."""
        if self.page_size is not None or len(set(self.lengths)) > 1:
            raise NotImplementedError(
                "An attention_fn takes a dense KV cache whose rows are one length; this one is "
                f"{'paged' if self.page_size else 'ragged'} (lengths {self.lengths})."
            )
        self._reserve(k)
        append_to_cache(self.k, self.v, k, v, self.seqlens)
        self._advance(k.shape[1])
        end = self.length
        return self.k[:, :end].transpose(1, 2), self.v[:, :end].transpose(1, 2)

    def rewind(self, lengths: list[int]) -> None:
        """Shorten each row to lengths[b] (<= its length): later appends overwrite the rest."""
        if len(lengths) != len(self.lengths) or any(
            not 0 <= n <= m for n, m in zip(lengths, self.lengths, strict=True)
        ):
            raise ValueError(f"Cannot rewind rows of lengths {self.lengths} to {lengths}.")
        self.lengths = list(lengths)
        device = self.k.device if self.k is not None else None
        self.seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)

    def select(self, rows: list[int]) -> None:
        """Keep only these rows, in this order (e.g. drop the sequences that have finished)."""
        if self.k is None:
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.k.device)
        if self.page_size is None:
            self.k, self.v = self.k[index], self.v[index]
        else:
            kept = set(rows)
            self.free += [p for b, pages in enumerate(self.pages) if b not in kept for p in pages]
            self.pages = [self.pages[b] for b in rows]
            self._write_block_table()
        self.lengths = [self.lengths[b] for b in rows]
        self.seqlens = self.seqlens[index]

    def _reserve(self, k: Tensor) -> None:
        """Check k (B, T, Hkv, D) fits; allocate storage on the first call and pages as needed."""
        B, T, Hkv, D = k.shape
        if self.k is None:
            self._allocate(k)
        elif (B, Hkv, D) != (len(self.lengths), self.k.shape[2], self.k.shape[3]):
            held = (len(self.lengths), self.k.shape[2], self.k.shape[3])
            raise ValueError(
                f"The KV cache holds (B, Hkv, D) = {held}; cannot append keys (B, Hkv, T, D) = "
                f"{(B, Hkv, T, D)}: start a new cache for a new batch."
            )
        if self.length + T > self.max_len:
            raise ValueError(
                f"The KV cache holds {self.max_len} positions; appending {T} to {self.length} "
                "cached ones would overflow it."
            )
        if self.page_size is not None:
            self._take_pages(T)

    def _allocate(self, k: Tensor) -> None:
        B, _, Hkv, D = k.shape
        self.lengths = [0] * B
        self.seqlens = torch.zeros(B, dtype=torch.int32, device=k.device)
        if self.page_size is None:
            self.k = k.new_empty(B, self.max_len, Hkv, D)
            self.v = k.new_empty(B, self.max_len, Hkv, D)
        else:
            self.k = k.new_empty(0, self.page_size, Hkv, D)
            self.v = k.new_empty(0, self.page_size, Hkv, D)
            self.pages = [[] for _ in range(B)]

    def _take_pages(self, t: int) -> None:
        """Give every row the pages its next t positions need (the pool grows when short)."""
        page = self.page_size
        short = [
            -(-(n + t) // page) - len(p) for n, p in zip(self.lengths, self.pages, strict=True)
        ]
        missing = sum(max(0, s) for s in short) - len(self.free)
        if missing > 0:  # double the pool (at least enough): old page ids stay valid
            old = self.k.shape[0]
            grown = old + max(missing, old)
            for name in ("k", "v"):
                pool = getattr(self, name)
                setattr(self, name, torch.cat([pool, pool.new_empty(grown - old, *pool.shape[1:])]))
            self.free += range(old, grown)
        if any(s > 0 for s in short):
            for pages, s in zip(self.pages, short, strict=True):
                pages += [self.free.pop(0) for _ in range(max(0, s))]
            self._write_block_table()

    def _write_block_table(self) -> None:
        width = -(-self.max_len // self.page_size)
        rows = [pages + [0] * (width - len(pages)) for pages in self.pages]  # unused: any id
        self.block_table = torch.tensor(rows, dtype=torch.int32, device=self.k.device)
        self.block_table = self.block_table.view(len(rows), width)

    def _advance(self, t: int) -> None:
        self.lengths = [n + t for n in self.lengths]
        self.seqlens = self.seqlens + t


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with optional grouped key/value heads (GQA / MQA).

    Args:
        n_embd: model width C; input and output are (B, T, C).
        n_head: query heads H; the head dim is C // H.
        n_kv_head: key/value heads Hkv (H % Hkv == 0); None means n_head (plain multi-head).
        bias: biases in the QKV and output projections.
        dropout: dropout on the output projection (fastgpt's kernels have no attention dropout).
        backend: fastgpt.attention backend name ("triton", "cpp", "reference"), None for auto.
        attention_fn: what computes attention, called as fastgpt.attention is:
            attention_fn(q, k, v, causal=True, backend=backend) with q (B, H, T, D), k and v
            (B, Hkv, Tk, D) -> (B, H, T, D), plus the keywords window, softcap and sinks of the
            variants this layer uses (only those). None means fastgpt.attention.
        window: None (global attention), or W >= 0: a sliding window where each token sees
            itself and the W tokens before it (fastgpt.attention's window=(W, 0)).
        softcap: c > 0 caps the attention scores at c * tanh(s / c) (Gemma 2: 50.0); 0: off.
        sinks: a learnable per-head sink logit (gpt-oss): the parameter `sinks` (H,), zeros at
            initialisation, in the state dict. Off (no parameter) by default.
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        n_kv_head: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        backend: str | None = None,
        attention_fn: AttentionFn | None = None,
        window: int | None = None,
        softcap: float = 0.0,
        sinks: bool = False,
    ) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = _head_counts(n_embd, n_head, n_kv_head)
        check_layer_variants(window, softcap)
        self.backend = backend
        self.attention_fn = attention_fn
        self.window, self.softcap = window, float(softcap)
        self.c_attn = nn.Linear(n_embd, (n_head + 2 * self.n_kv_head) * self.head_dim, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        # Registered only when on, so checkpoints without sinks keep loading.
        self.sinks = nn.Parameter(torch.zeros(n_head)) if sinks else None  # (H,)

    def variants(self) -> dict[str, object]:
        """fastgpt.attention's keywords for this layer's variants: {} for plain attention."""
        extra: dict[str, object] = {}
        if self.window is not None:
            extra["window"] = (self.window, 0)
        if self.softcap != 0.0:
            extra["softcap"] = self.softcap
        if self.sinks is not None:
            extra["sinks"] = self.sinks
        return extra

    def forward(
        self,
        x: Tensor,
        kv_cache: KVCache | None = None,
        *,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> Tensor:
        """x: (B, T, C) -> (B, T, C). With kv_cache, x holds the positions after the cached ones.

        With cu_seqlens (int32 (N + 1,) prefix sums over the B T tokens in x.flatten(0, 1) order,
        longest document max_seqlen), x packs N documents and no token attends across a document
        boundary (fastgpt.attention_varlen); not with kv_cache or attention_fn.
        """
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.c_attn(x)  # (B, T, (H + 2 Hkv) D)
        if cu_seqlens is not None:
            y = self._attend_documents(qkv, cu_seqlens, max_seqlen, kv_cache)  # (B T, H, D)
            return self.resid_dropout(self.c_proj(y.view(B, T, C)))
        # Views into qkv (no copy): the head dim stays contiguous, as fastgpt.attention needs.
        q = qkv[..., : H * D].view(B, T, H, D)  # (B, T, H, D)
        k = qkv[..., H * D : (H + Hkv) * D].view(B, T, Hkv, D)  # (B, T, Hkv, D)
        v = qkv[..., (H + Hkv) * D :].view(B, T, Hkv, D)  # (B, T, Hkv, D)
        if kv_cache is not None and self.attention_fn is None:
            # Each row appends T keys after its own cached ones and attends causally to them.
            y = kv_cache.attend(q, k, v, backend=self.backend, **self.variants())  # (B, T, H, D)
            return self.resid_dropout(self.c_proj(y.reshape(B, T, C)))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first
        if kv_cache is not None:
            k, v = kv_cache.append(k.transpose(1, 2), v.transpose(1, 2))  # (B, Hkv, Tk, D)
        # Causal bottom-right: with a cache, query i sees every cached key and new keys up to i.
        attend = attention if self.attention_fn is None else self.attention_fn
        y = attend(q, k, v, causal=True, backend=self.backend, **self.variants())  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def _attend_documents(
        self, qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int | None, kv_cache: KVCache | None
    ) -> Tensor:
        """Causal attention within each packed document: qkv (B, T, (H + 2 Hkv) D) -> (B T, H, D)"""
        if kv_cache is not None or self.attention_fn is not None:
            raise NotImplementedError(
                "CausalSelfAttention takes cu_seqlens (packed documents) without a kv_cache or "
                "an attention_fn only."
            )
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        if max_seqlen is None:
            max_seqlen = int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0
        tokens = qkv.flatten(0, 1)  # (B T, (H + 2 Hkv) D), a view
        q = tokens[:, : H * D].unflatten(1, (H, D))  # (B T, H, D)
        k = tokens[:, H * D : (H + Hkv) * D].unflatten(1, (Hkv, D))  # (B T, Hkv, D)
        v = tokens[:, (H + Hkv) * D :].unflatten(1, (Hkv, D))  # (B T, Hkv, D)
        return attention_varlen(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
            backend=self.backend, **self.variants(),
        )  # fmt: skip


# --- Encoder-decoder pieces: cross-attention, encoder and decoder blocks, sinusoidal positions ---


class CrossAttention(nn.Module):
    """Multi-head attention of queries from x to keys/values from another sequence (GQA / MQA).

    Not causal: every query sees every key, and Tq != Tk is allowed. Called with context = x it
    is the encoder's (bidirectional) self-attention; the decoder calls it with the encoder output.

    Args:
        n_embd: width C of x (B, Tq, C) and of the output.
        n_head: query heads H; the head dim is C // H.
        n_kv_head: key/value heads Hkv (H % Hkv == 0); None means n_head.
        context_dim: width of the context (B, Tk, Cc); None means n_embd.
        bias: biases in the projections.
        dropout: dropout on the output projection.
        backend: fastgpt.attention backend name, None for auto.
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        n_kv_head: int | None = None,
        context_dim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = _head_counts(n_embd, n_head, n_kv_head)
        self.context_dim = n_embd if context_dim is None else context_dim
        self.backend = backend
        self.q_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.kv_proj = nn.Linear(self.context_dim, 2 * self.n_kv_head * self.head_dim, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """context (B, Tk, Cc) -> keys, values (B, Hkv, Tk, D): computed once per sequence."""
        B, Tk, Cc = context.shape
        if Cc != self.context_dim:
            raise ValueError(
                f"CrossAttention expects a context of width {self.context_dim}, got context "
                f"{tuple(context.shape)}."
            )
        Hkv, D = self.n_kv_head, self.head_dim
        kv = self.kv_proj(context)  # (B, Tk, 2 Hkv D)
        k = kv[..., : Hkv * D].view(B, Tk, Hkv, D).transpose(1, 2)  # (B, Hkv, Tk, D)
        v = kv[..., Hkv * D :].view(B, Tk, Hkv, D).transpose(1, 2)  # (B, Hkv, Tk, D)
        return k, v

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """x: (B, Tq, C), context: (B, Tk, Cc) or its project_kv(...) as kv -> (B, Tq, C)."""
        if key_padding_mask is not None:
            raise NotImplementedError(
                "CrossAttention has no key padding yet (fastgpt.attention has no variable-length "
                "path): batch sequences of one length, or run them one at a time."
            )
        if (context is None) == (kv is None):
            raise ValueError("CrossAttention needs exactly one of context or kv.")
        B, Tq, C = x.shape
        k, v = self.project_kv(context) if kv is None else kv  # (B, Hkv, Tk, D) each
        if k.shape[0] != B:
            raise ValueError(
                f"x and the context must have the same batch size, got x {tuple(x.shape)} and "
                f"keys {tuple(k.shape)}."
            )
        q = self.q_proj(x).view(B, Tq, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, Tq, D)
        y = attention(q, k, v, causal=False, backend=self.backend)  # (B, H, Tq, D)
        y = y.transpose(1, 2).reshape(B, Tq, C)  # (B, Tq, C)
        return self.resid_dropout(self.c_proj(y))


# Feed-forward non-linearities by name; "gelu_tanh" is GPT-2's tanh approximation ("gelu_new").
ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
}


class FeedForward(nn.Module):
    """The position-wise 4x MLP: Linear, activation, Linear, dropout. (B, T, C) -> (B, T, C).

    The GPT's MLP and the encoder/decoder blocks' feed-forward layer; activation is a key of
    ACTIVATIONS.
    """

    def __init__(
        self, n_embd: int, activation: str = "relu", bias: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}."
            )
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.act = ACTIVATIONS[activation]()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))  # (B, T, C)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm encoder block: bidirectional self-attention, then the feed-forward layer."""

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        n_kv_head: int | None = None,
        activation: str = "relu",
        bias: bool = True,
        dropout: float = 0.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CrossAttention(
            n_embd, n_head, n_kv_head, bias=bias, dropout=dropout, backend=backend
        )
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = FeedForward(n_embd, activation, bias, dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, Ts, C) source positions -> (B, Ts, C); every position sees every other."""
        h = self.ln_1(x)
        x = x + self.attn(h, h)  # (B, Ts, C)
        return x + self.mlp(self.ln_2(x))  # (B, Ts, C)


class DecoderBlock(nn.Module):
    """Pre-LayerNorm decoder block: masked self-attention, cross-attention to the encoder's
    output (queries from the decoder, keys/values from the encoder), then the feed-forward layer."""

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        n_kv_head: int | None = None,
        activation: str = "relu",
        bias: bool = True,
        dropout: float = 0.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        kw = dict(bias=bias, dropout=dropout, backend=backend)
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.self_attn = CausalSelfAttention(n_embd, n_head, n_kv_head, **kw)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.cross_attn = CrossAttention(n_embd, n_head, n_kv_head, **kw)
        self.ln_3 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = FeedForward(n_embd, activation, bias, dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        memory_kv: tuple[Tensor, Tensor] | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """x: (B, Tt, C) target positions, memory: (B, Ts, C) encoder output -> (B, Tt, C).

        For decoding, memory_kv = cross_attn.project_kv(memory) computed once replaces memory, and
        kv_cache holds the self-attention keys/values of the positions before x.
        """
        x = x + self.self_attn(self.ln_1(x), kv_cache)  # (B, Tt, C)
        x = x + self.cross_attn(self.ln_2(x), memory, memory_kv)  # (B, Tt, C)
        return x + self.mlp(self.ln_3(x))  # (B, Tt, C)


def sinusoidal_positions(length: int, n_embd: int, start: int = 0) -> Tensor:
    """The Transformer's fixed positional encoding, (length, n_embd) float32, positions from start:
    PE[p, 2i] = sin(p / 10000^(2i/C)), PE[p, 2i+1] = cos(p / 10000^(2i/C))."""
    import torch

    pos = torch.arange(start, start + length, dtype=torch.float32)[:, None]  # (T, 1)
    freq = 10000.0 ** (-torch.arange(0, n_embd, 2, dtype=torch.float32) / n_embd)  # (ceil(C/2),)
    pe = torch.zeros(length, n_embd)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: n_embd // 2])
    return pe  # (T, C)
