"""fastgpt.nn: the causal self-attention module the GPT model is built on, usable on its own.

    from fastgpt.nn import CausalSelfAttention
    attn = CausalSelfAttention(n_embd=256, n_head=8, n_kv_head=2)  # GQA: 8 query heads, 2 kv heads
    y = attn(x)  # x, y: (B, T, n_embd)

One fused linear layer computes q, k and v; they are cut out of its output as views (no copy) and
handed to fastgpt.attention with the backend name given at construction (None = automatic pick),
or to another function with its signature given as attention_fn (e.g. torch SDPA, to compare).
"""

from collections.abc import Callable

from torch import Tensor, nn

from fastgpt.attention import attention

# fastgpt.attention's signature: (q, k, v, *, causal, backend) -> out (B, H, Tq, D).
AttentionFn = Callable[..., Tensor]


class KVCache:
    """Keys and values of the positions seen so far, for one attention layer (generation).

    Buffers k, v: (B, Hkv, max_len, D), allocated on the first append in the dtype and device of
    the keys (so autocast works); positions [0, length) hold data.
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, Hkv, T, D) after the cached ones; return views of all keys and values."""
        start, end = self.length, self.length + k.shape[2]
        if self.k is not None and (k.shape[0], k.shape[1], k.shape[3]) != (
            self.k.shape[0],
            self.k.shape[1],
            self.k.shape[3],
        ):
            B, Hkv, _, D = self.k.shape
            raise ValueError(
                f"The KV cache holds (B, Hkv, D) = ({B}, {Hkv}, {D}); cannot append keys of shape "
                f"{tuple(k.shape)}: start a new cache for a new batch."
            )
        if end > self.max_len:
            raise ValueError(
                f"The KV cache holds {self.max_len} positions; appending {k.shape[2]} to "
                f"{start} cached ones would overflow it."
            )
        if self.k is None or self.v is None:
            B, Hkv, _, D = k.shape
            self.k = k.new_empty(B, Hkv, self.max_len, D)
            self.v = v.new_empty(B, Hkv, self.max_len, D)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, Hkv, end, D) views


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
            (B, Hkv, Tk, D) -> (B, H, T, D). None means fastgpt.attention.
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
    ) -> None:
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_head <= 0 or n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be a positive multiple of n_head ({n_head}).")
        if n_kv_head <= 0 or n_head % n_kv_head != 0:
            raise ValueError(
                f"n_head ({n_head}) must be a positive multiple of n_kv_head ({n_kv_head})."
            )
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = n_embd // n_head
        self.backend = backend
        self.attention_fn = attention_fn
        self.c_attn = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * self.head_dim, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """x: (B, T, C) -> (B, T, C). With kv_cache, x holds the positions after the cached ones."""
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.c_attn(x)  # (B, T, (H + 2 Hkv) D)
        # Views into qkv (no copy): the head dim stays contiguous, as fastgpt.attention needs.
        q = qkv[..., : H * D].view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = qkv[..., H * D : (H + Hkv) * D].view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = qkv[..., (H + Hkv) * D :].view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, Hkv, Tk, D), Tk = cached + T
        # Causal bottom-right: with a cache, query i sees every cached key and new keys up to i.
        attend = attention if self.attention_fn is None else self.attention_fn
        y = attend(q, k, v, causal=True, backend=self.backend)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))
