"""An encoder-decoder transformer (the original Transformer's shape) on fastgpt's kernels.

    model = Seq2Seq(Seq2SeqConfig(vocab_size=40, block_size=16))
    logits, loss = model(src, tgt_in, tgt_out)        # src (B, Ts), tgt_in/out (B, Tt)
    out = model.generate(src, 16, sos_id=1, end_id=0)  # greedy; the encoder runs once

The encoder reads the source with bidirectional self-attention; the decoder predicts the target one
token at a time with masked self-attention and cross-attention to the encoder's output (queries
from the decoder, keys and values from the encoder). Targets are shifted right: the decoder reads
<SOS> y1 y2 ... and predicts y1 y2 ... <END>. Every attention goes through fastgpt.attention.
"""

from dataclasses import asdict, dataclass, fields
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgpt.nn import DecoderBlock, EncoderBlock, KVCache, init_weights, sinusoidal_positions

IGNORE = -1  # target id that adds nothing to the loss (padding)


@dataclass
class Seq2SeqConfig:
    vocab_size: int = 64  # tokens of source and target (one shared vocabulary)
    block_size: int = 32  # longest source and longest target, in tokens
    n_layer: int = 2  # encoder blocks, and as many decoder blocks
    n_head: int = 2  # query heads per attention layer
    n_kv_head: int | None = None  # key/value heads (GQA); None means n_head
    n_embd: int = 64  # model width; head dim is n_embd // n_head
    dropout: float = 0.0  # on embeddings and residual branches (training only)
    bias: bool = True  # biases in the linear layers and LayerNorms
    activation: str = "relu"  # feed-forward non-linearity: "relu" (the Transformer's) or "gelu"
    positions: str = "sinusoidal"  # "sinusoidal" (fixed) or "learned" position embeddings
    backend: str | None = None  # fastgpt.attention backend name; None picks automatically

    def __post_init__(self) -> None:
        if self.positions not in ("sinusoidal", "learned"):
            raise ValueError(
                f"positions must be 'sinusoidal' or 'learned', got {self.positions!r}."
            )
        if self.activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {self.activation!r}.")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"Seq2SeqConfig.{name} must be positive, got {getattr(self, name)}."
                )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Seq2SeqConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class Positions(nn.Module):
    """Position embeddings (T, C) for positions start..start+T-1: learned or sinusoidal."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.block_size = config.block_size
        self.learned = config.positions == "learned"
        if self.learned:
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        else:  # fixed: a buffer, not a parameter, and not saved with the weights
            pe = sinusoidal_positions(config.block_size, config.n_embd)
            self.register_buffer("pe", pe, persistent=False)

    def forward(self, length: int, start: int = 0, what: str = "sequence") -> Tensor:
        if start + length > self.block_size:
            raise ValueError(
                f"Cannot embed a {what} of {start + length} positions: the model's block_size is "
                f"{self.block_size}."
            )
        if self.learned:
            pos = torch.arange(start, start + length, device=self.wpe.weight.device)
            return self.wpe(pos)  # (T, C)
        return self.pe[start : start + length]  # (T, C)


class Seq2Seq(nn.Module):
    """Token embedding shared by both sides, position embeddings per side, n_layer pre-LN encoder
    blocks and n_layer pre-LN decoder blocks, a final LayerNorm on each side, an LM head."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = c = config
        kw = dict(activation=c.activation, bias=c.bias, dropout=c.dropout, backend=c.backend)
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)  # shared by encoder and decoder
        self.enc_pos, self.dec_pos = Positions(c), Positions(c)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList(
            EncoderBlock(c.n_embd, c.n_head, c.n_kv_head, **kw) for _ in range(c.n_layer)
        )
        self.ln_enc = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.decoder = nn.ModuleList(
            DecoderBlock(c.n_embd, c.n_head, c.n_kv_head, **kw) for _ in range(c.n_layer)
        )
        self.ln_dec = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        # Embeddings at unit scale, as the sinusoidal positions; linear layers small (GPT-2), so
        # the loss at step 0 is close to ln(vocab_size).
        self.apply(partial(init_weights, embedding_std=1.0))

    def encode(self, src: Tensor) -> Tensor:
        """src: (B, Ts) token ids -> memory (B, Ts, C), the encoder's output."""
        x = self.drop(self.wte(src) + self.enc_pos(src.shape[1], what="source"))  # (B, Ts, C)
        for block in self.encoder:
            x = block(x)  # (B, Ts, C)
        return self.ln_enc(x)  # (B, Ts, C)

    def memory_kvs(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Each decoder layer's cross-attention keys and values of memory, (B, Hkv, Ts, D) each."""
        return [block.cross_attn.project_kv(memory) for block in self.decoder]

    def decode(
        self,
        tgt: Tensor,
        memory: Tensor | None = None,
        memory_kvs: list[tuple[Tensor, Tensor]] | None = None,
        kv_caches: list[KVCache] | None = None,
    ) -> Tensor:
        """tgt: (B, Tt) decoder input ids -> logits (B, Tt, V).

        Either memory (B, Ts, C) or its memory_kvs; with kv_caches, tgt holds the positions after
        the cached ones.
        """
        start = kv_caches[0].length if kv_caches is not None else 0
        pos = self.dec_pos(tgt.shape[1], start, what="target")  # (Tt, C)
        x = self.drop(self.wte(tgt) + pos)  # (B, Tt, C)
        for i, block in enumerate(self.decoder):
            kv = memory_kvs[i] if memory_kvs is not None else None
            cache = kv_caches[i] if kv_caches is not None else None
            x = block(x, None if kv is not None else memory, kv, cache)  # (B, Tt, C)
        return self.lm_head(self.ln_dec(x))  # (B, Tt, V)

    def forward(
        self, src: Tensor, tgt_in: Tensor, tgt_out: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """src (B, Ts), tgt_in (B, Tt) = <SOS> y..., tgt_out (B, Tt) = y... <END> (IGNORE for
        padding) -> (logits (B, Tt, V), mean cross-entropy or None)."""
        if src.shape[0] != tgt_in.shape[0]:
            raise ValueError(
                f"src and tgt_in must have the same batch size, got src {tuple(src.shape)} and "
                f"tgt_in {tuple(tgt_in.shape)}."
            )
        logits = self.decode(tgt_in, memory=self.encode(src))  # (B, Tt, V)
        loss = None
        if tgt_out is not None:
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=IGNORE
            )
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        src: Tensor,
        max_new_tokens: int,
        sos_id: int,
        end_id: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Decode targets of src (B, Ts) -> (B, N) ids after <SOS>, N <= max_new_tokens.

        Stops once every row has produced end_id (rows that ended early repeat end_id). With
        use_cache the encoder's keys/values are projected once per layer and the decoder's
        self-attention keys/values are cached, so each step runs one position; without it every
        step reruns the decoder on the whole prefix (the same tokens: a test checks it).
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}.")
        B = src.shape[0]
        max_new_tokens = min(max_new_tokens, self.config.block_size)
        memory = self.encode(src)  # (B, Ts, C)
        kvs = self.memory_kvs(memory) if use_cache else None
        caches = [KVCache(self.config.block_size) for _ in self.decoder] if use_cache else None
        idx = torch.full((B, 1), sos_id, dtype=torch.long, device=src.device)  # (B, 1)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        for _ in range(max_new_tokens):
            if use_cache:
                logits = self.decode(idx[:, -1:], memory_kvs=kvs, kv_caches=caches)  # (B, 1, V)
            else:
                logits = self.decode(idx, memory=memory)  # (B, T, V)
            next_id = pick_token(logits[:, -1].float(), temperature, top_k, generator)  # (B, 1)
            next_id = next_id.masked_fill(done[:, None], end_id)
            idx = torch.cat([idx, next_id], dim=1)
            done |= next_id[:, 0] == end_id
            if done.all():
                break
        return idx[:, 1:]


def pick_token(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """Next token ids (B, 1) from logits (B, V): argmax at temperature 0, else sampled."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
