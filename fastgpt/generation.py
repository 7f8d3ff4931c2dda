"""Batched generation: prompts of different lengths decoded together, one KV-cache row each.

    for rows, tokens in decode_batch(model, [[5, 2, 9], [7]], [4, 6], temperature=0):
        ...  # rows: the prompts that drew a token this step; tokens: (len(rows),) those tokens

Each row gets exactly the computation it would get alone (greedy decoding gives it the same
tokens, up to floating-point ties): the prompts are prefilled in one right-padded forward (causal
attention: a position never sees the padding after it), the cache rows are then rewound to each
prompt's length, and every step feeds each row its last token at its own position. A row stops at
its own max_new_tokens or after end_id, and leaves the cache then; a row that outgrows the
context leaves the cache too and is recomputed on its last block_size tokens each step, as
GPT.generate does for one prompt.
"""

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def pick_tokens(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """Next token ids (n,) from logits (n, V): argmax at temperature 0, else sampled (top_k)."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # (n,)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (n, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[:, 0]  # (n,)


def prompt_lists(
    idx: Tensor | Sequence[Sequence[int]], lengths: Sequence[int] | Tensor | None = None
) -> list[list[int]]:
    """Prompts as token-id lists: idx a list of lists, or a (B, T) tensor (with lengths (B,): row
    b's first lengths[b] ids; the rest is padding)."""
    if not isinstance(idx, Tensor):
        if lengths is not None:
            raise ValueError("lengths goes with a padded (B, T) tensor of prompts, not with lists.")
        return [[int(t) for t in p] for p in idx]
    if idx.dim() != 2:
        raise ValueError(f"prompts must be a (B, T) tensor of token ids, got {tuple(idx.shape)}.")
    rows = idx.tolist()
    if lengths is None:
        return rows
    lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, Tensor) else lengths)]
    if len(lengths) != len(rows) or any(not 0 <= n <= idx.shape[1] for n in lengths):
        raise ValueError(
            f"lengths must give one length in 0..{idx.shape[1]} per row of idx "
            f"{tuple(idx.shape)}, got {lengths}."
        )
    return [row[:n] for row, n in zip(rows, lengths, strict=True)]


def check_batch(
    prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], temperature: float
) -> list[int]:
    """ValueError for a bad batch; -> max_new_tokens per prompt."""
    if not 0 <= temperature < math.inf:  # NaN fails too
        raise ValueError(f"temperature must be >= 0 and finite, got {temperature}.")
    lengths = [len(p) for p in prompts]
    if 0 in lengths:
        raise ValueError(
            f"generate needs at least one token to start from in every prompt, got prompt lengths "
            f"{lengths}."
        )
    if isinstance(max_new_tokens, int):
        max_new_tokens = [max_new_tokens] * len(prompts)
    budgets = list(max_new_tokens)
    if len(budgets) != len(prompts) or any(n < 0 for n in budgets):
        raise ValueError(
            f"max_new_tokens must be an int or one int >= 0 per prompt ({len(prompts)}), got "
            f"{budgets}."
        )
    return budgets


class BatchDecoder:
    """The state of one batched generation: step() gives the logits of every running row, record()
    appends the tokens drawn from them.

    tokens (B, width) holds each row's ids; lengths (host) their count.
    cached lists the rows that own a KV-cache row, in cache-row order.
    """

    def __init__(
        self,
        model: nn.Module,
        prompts: Sequence[Sequence[int]],
        budgets: list[int],
        device: torch.device,
        use_cache: bool = True,
        page_size: int | None = None,
    ) -> None:
        self.model, self.block = model, model.config.block_size
        self.use_cache, self.page_size = use_cache, page_size
        self.lengths = [len(p) for p in prompts]
        self.budgets = list(budgets)
        # Room for 256 new tokens at first; record() doubles it as needed (a huge budget costs
        # nothing up front).
        width = max(
            (n + min(m, 256) for n, m in zip(self.lengths, budgets, strict=True)), default=0
        )
        self.tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        for b, prompt in enumerate(prompts):
            self.tokens[b, : len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
        self.running = [b for b, m in enumerate(budgets) if m > 0]
        self.caches: list | None = None
        self.cached: list[int] = []

    def step(self) -> tuple[list[int], Tensor]:
        """The next-token logits of every running row: -> (rows, logits (n, V) float32)."""
        self._leave_cache()
        pieces: list[tuple[list[int], Tensor]] = []
        if self.use_cache and self.caches is None:
            fits = [b for b in self.running if self.lengths[b] <= self.block]
            if fits:
                pieces.append((fits, self._prefill(fits)))
        elif self.cached:
            pieces.append((list(self.cached), self._decode()))
        in_cache = set(self.cached)
        window = [b for b in self.running if b not in in_cache]
        if window:  # without a cache, or past the context: recompute the last block_size tokens
            pieces.append((window, self._recompute(window)))
        rows = [b for part, _ in pieces for b in part]
        logits = torch.cat([lg for _, lg in pieces])  # (n, V) in `rows` order
        order = sorted(range(len(rows)), key=rows.__getitem__)
        return sorted(rows), logits[order].float()

    def record(self, rows: list[int], next_ids: Tensor, end_id: int | None) -> None:
        """Append next_ids (n,) to rows; rows out of budget or at end_id stop running."""
        index = torch.tensor(rows, dtype=torch.long, device=self.tokens.device)
        at = [self.lengths[b] for b in rows]
        if max(at) >= self.tokens.shape[1]:
            self.tokens = torch.cat([self.tokens, torch.zeros_like(self.tokens)], dim=1)
        self.tokens[index, torch.tensor(at, device=index.device)] = next_ids
        ended = next_ids.tolist() if end_id is not None else [None] * len(rows)  # a sync
        stopped = set()
        for b, token in zip(rows, ended, strict=True):
            self.lengths[b] += 1
            self.budgets[b] -= 1
            if self.budgets[b] == 0 or (end_id is not None and token == end_id):
                stopped.add(b)
        self.running = [b for b in self.running if b not in stopped]

    def _leave_cache(self) -> None:
        """Rows that stopped, or whose next position is past the context, leave the cache."""
        running = set(self.running)
        keep = [
            i for i, b in enumerate(self.cached) if b in running and self.lengths[b] <= self.block
        ]
        if len(keep) < len(self.cached):
            for cache in self.caches:
                cache.select(keep)
            self.cached = [self.cached[i] for i in keep]

    def _prefill(self, rows: list[int]) -> Tensor:
        """One right-padded forward of the rows' prompts into new caches -> last logits (n, V)."""
        lengths = [self.lengths[b] for b in rows]
        index = torch.tensor(rows, dtype=torch.long, device=self.tokens.device)
        idx = self.tokens[index, : max(lengths)]  # (n, P): prompts, right-padded
        self.caches = self.model.new_kv_caches(self.page_size)
        logits, _ = self.model(idx, kv_caches=self.caches)  # (n, P, V)
        for cache in self.caches:
            cache.rewind(lengths)  # the padding's keys are overwritten by later appends
        self.cached = list(rows)
        return logits[torch.arange(len(rows)), [n - 1 for n in lengths]]  # (n, V)

    def _decode(self) -> Tensor:
        """Each cached row's last token at its own position -> logits (n, V)."""
        index = torch.tensor(self.cached, dtype=torch.long, device=self.tokens.device)
        at = torch.tensor([self.lengths[b] - 1 for b in self.cached], device=index.device)
        logits, _ = self.model(self.tokens[index, at][:, None], kv_caches=self.caches)  # (n, 1, V)
        return logits[:, -1]  # (n, V)

    def _recompute(self, rows: list[int]) -> Tensor:
        """Each row's last min(length, block_size) tokens, right-padded, no cache -> (n, V)."""
        context = [min(self.lengths[b], self.block) for b in rows]
        starts = torch.tensor([self.lengths[b] - c for b, c in zip(rows, context, strict=True)])
        cols = starts[:, None] + torch.arange(max(context))  # (n, C)
        cols = cols.clamp(max=self.tokens.shape[1] - 1).to(self.tokens.device)
        index = torch.tensor(rows, dtype=torch.long, device=self.tokens.device)
        logits, _ = self.model(self.tokens[index[:, None], cols])  # (n, C, V)
        return logits[torch.arange(len(rows)), [c - 1 for c in context]]  # (n, V)


def decode_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    end_id: int | None = None,
    page_size: int | None = None,
) -> Iterator[tuple[list[int], Tensor]]:
    """Continue each prompt (a list of token ids) by up to max_new_tokens[b] tokens (an int: the
    same for all), stopping a row after end_id; yields (rows, tokens (len(rows),)) per step: the
    prompts that drew a token, in ascending order, and those tokens. page_size: a paged cache."""
    budgets = check_batch(prompts, max_new_tokens, temperature)
    device = next(model.parameters()).device
    decoder = BatchDecoder(model, prompts, budgets, device, use_cache, page_size)
    while decoder.running:
        rows, logits = decoder.step()
        next_ids = pick_tokens(logits, temperature, top_k, generator)  # (n,)
        decoder.record(rows, next_ids, end_id)
        yield rows, next_ids
