"""Padded and packed Hugging Face batches on fastgpt.attention_varlen: unpad, attend, pad back.

transformers describes which keys each query may see with a 4-D mask (B, 1, Tq, Tk) (bool from
its sdpa mask function, True = visible; a user's float mask uses 0 and -inf), or for a batch
flattened by DataCollatorWithFlattening with the kwargs cu_seq_lens_q/k and max_length_q/k. Two
kinds of mask are variable-length attention in disguise:

    padding (left or right, prefill or decoding against a padded cache): query i of row b sees
    the valid keys j <= i + Tk - Tq; padded queries see nothing of their own
    packing (position_ids restarting per sequence): each query sees its own sequence, causally

varlen_layout reads either kind off the mask as segments: runs of real queries that all see one
interval of keys [first, own position]. Each segment is one sequence of attention_varlen, causal
bottom-right: its r-th query sees its keys up to r + Tk_s - Tq_s, which is the query's own
position. Any other mask (a hole in the padding, a sliding window, a bias) is refused with a
reason, and the caller falls back. Padded query rows come back as zeros.

With no mask, position_ids that restart within a row mean packed sequences too (as transformers'
flash-attn path reads them; its sdpa and eager paths would let them attend across). Layouts are
read once per forward pass: every layer gets the same mask or position_ids tensor (see cached).
"""

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgpt.varlen import attention_varlen, cu_seqlens_from_lengths

CU_SEQLENS_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@dataclass(frozen=True)
class VarlenLayout:
    """Where the real tokens of a (B, Tq) query batch and (B, Tk) key batch lie, as varlen input.

    q_index (total_q,) / k_index (total_k,): int64 rows of query.flatten(B, Tq) / key.flatten(B,
    Tk) in packed order; None when every row is taken in order (no copy needed).
    """

    batch: int
    q_len: int
    k_len: int
    q_index: Tensor | None
    k_index: Tensor | None
    cu_seqlens_q: Tensor  # int32 (N + 1,)
    cu_seqlens_k: Tensor  # int32 (N + 1,)
    max_seqlen_q: int
    max_seqlen_k: int

    @property
    def sequences(self) -> int:
        return self.cu_seqlens_q.numel() - 1


# The last tensor read and its layout: (weak reference to it, (its version, reader, args), layout).
_last: tuple[weakref.ref, tuple, VarlenLayout | str | None] | None = None


def boolean_mask(mask: Tensor, batch: int) -> Tensor | str:
    """(B, Tq, Tk) bool visibility of a (B or 1, 1, Tq, Tk) mask; a reason string when it is not a
    pure visibility mask (per-head masks, float biases other than 0 / -inf)."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch):
        return f"a mask of shape {tuple(mask.shape)} (not (B, 1, Tq, Tk))"
    if mask.dtype != torch.bool:
        if not mask.is_floating_point():
            return f"a {mask.dtype} mask"
        hidden = mask <= torch.finfo(mask.dtype).min / 2  # -inf, or transformers' dtype minimum
        if not bool(((mask == 0) | hidden).all()):
            return "a float mask with bias values (not only 0 and -inf)"
        mask = ~hidden
    return mask[:, 0].expand(batch, -1, -1)  # (B, Tq, Tk)


def _segments(visible: Tensor) -> tuple[Tensor, Tensor, Tensor] | str:
    """(real (B, Tq), first (B, Tq), start (B, Tq)) of a (B, Tq, Tk) bool mask: which queries are
    real tokens, the first key each sees, which begin a segment; a reason when the mask is not
    padding/packing. Query i sits at key position i + Tk - Tq."""
    B, Tq, Tk = visible.shape
    if Tk < Tq:
        return f"a mask with more queries ({Tq}) than keys ({Tk})"
    pos = torch.arange(Tq, device=visible.device) + (Tk - Tq)  # (Tq,) each query's own key
    real = visible[:, torch.arange(Tq, device=visible.device), pos]  # (B, Tq) sees itself
    seen = visible.any(1)[:, pos]  # (B, Tq): some query sees this query's own key
    as_int = visible.to(torch.uint8)
    first = as_int.argmax(-1)  # (B, Tq) first visible key
    last = Tk - 1 - as_int.flip(-1).argmax(-1)  # (B, Tq) last visible key
    count = as_int.sum(-1, dtype=torch.int64)  # (B, Tq)
    # A real query sees exactly the interval [first, own position]; a padded one is unseen, and
    # sees nothing (left padding) or follows a real query of its row (right padding). A query that
    # sees keys with none real before it is no padding: e.g. a static cache, whose queries do not
    # sit at the last Tq keys.
    interval = ~real | ((last == pos) & (count == pos - first + 1))
    after_real = F.pad(real.to(torch.uint8).cummax(1).values[:, :-1], (1, 0)) > 0  # (B, Tq)
    padding = real | (~seen & ((count == 0) | after_real))
    prev_real = F.pad(real[:, :-1], (1, 0), value=False)  # (B, Tq)
    prev_first = F.pad(first[:, :-1], (1, 0))  # (B, Tq)
    same = real & prev_real & (first == prev_first)  # continues the previous query's sequence
    # After a real query, the next one continues its sequence or starts a new one at itself.
    follows = ~(real & prev_real) | same | (first == pos)
    if not bool((interval & padding & follows).all()):
        return "a mask that is neither causal padding nor packed causal sequences"
    return real, first, real & ~same


def layout_from_mask(mask: Tensor, batch: int) -> VarlenLayout | str:
    """The varlen layout of a 4-D padding or packing mask, or the reason it has none."""
    visible = boolean_mask(mask, batch)
    if isinstance(visible, str):
        return visible
    found = _segments(visible)
    if isinstance(found, str):
        return found
    real, first, start = found
    B, Tq, Tk = visible.shape
    q_index = real.flatten().nonzero().squeeze(1)  # (total_q,) rows of (B Tq)
    starts = start.flatten()[q_index]  # (total_q,) True at each segment's first query
    segment = starts.cumsum(0) - 1  # (total_q,) segment of each query
    n_segments = int(starts.sum())
    q_lengths = torch.bincount(segment, minlength=n_segments)  # (N,)
    cu_q = cu_seqlens_from_lengths(q_lengths)  # (N + 1,)
    row = q_index // Tq  # (total_q,) batch row of each query
    k_first = (row * Tk + first.flatten()[q_index])[starts]  # (N,) first key row of a segment
    last_q = q_index[cu_q[1:].long() - 1]  # (N,) each segment's last query, as a row of (B Tq)
    k_last = last_q // Tq * Tk + last_q % Tq + (Tk - Tq)  # (N,) its own key row of (B Tk)
    k_lengths = k_last - k_first + 1  # (N,)
    cu_k = cu_seqlens_from_lengths(k_lengths)  # (N + 1,)
    lengths = torch.stack([q_lengths.max(), k_lengths.max()]).tolist() if n_segments else [0, 0]
    total_k = int(cu_k[-1])
    offsets = torch.arange(total_k, device=mask.device) - cu_k[:-1].long().repeat_interleave(
        k_lengths, output_size=total_k
    )  # (total_k,) index within the segment
    k_index = k_first.repeat_interleave(k_lengths, output_size=total_k) + offsets  # (total_k,)
    return VarlenLayout(
        B, Tq, Tk,
        None if q_index.numel() == B * Tq else q_index,
        None if total_k == B * Tk and n_segments and bool((k_index.diff() == 1).all()) else k_index,
        cu_q, cu_k, *lengths,
    )  # fmt: skip


def cached(read, tensor: Tensor, *args) -> VarlenLayout | str | None:
    """read(tensor, *args), read once per tensor: every layer of a forward pass gets the same
    mask (or position_ids), so the last answer is kept while that tensor is alive and unchanged."""
    global _last
    if _last is not None and _last[0]() is tensor and _last[1] == (tensor._version, read, args):
        return _last[2]
    layout = read(tensor, *args)
    if not torch.compiler.is_compiling():
        _last = (weakref.ref(tensor), (tensor._version, read, args), layout)
    return layout


def layout_from_positions(position_ids: Tensor, batch: int) -> VarlenLayout | None:
    """The layout of rows that pack several sequences, told by position_ids (B or 1, T) that
    restart (any step other than +1 starts a sequence, as transformers' flash-attn path reads
    them); None when no row restarts (plain causal attention is exact then)."""
    T = position_ids.shape[-1]
    positions = position_ids.reshape(-1, T).expand(batch, T)  # (B, T)
    step = positions.diff(dim=-1) != 1  # (B, T - 1)
    if not bool(step.any()):
        return None
    starts = F.pad(step, (1, 0), value=True).flatten()  # (B T,) a sequence starts here
    begin = starts.nonzero().squeeze(1)  # (N,)
    lengths = torch.cat([begin[1:], begin.new_tensor([batch * T])]) - begin  # (N,)
    cu = cu_seqlens_from_lengths(lengths)  # (N + 1,)
    longest = int(lengths.max())
    return VarlenLayout(batch, T, T, None, None, cu, cu, longest, longest)


def layout_from_kwargs(kwargs: dict, batch: int, q_len: int, k_len: int) -> VarlenLayout | None:
    """The layout DataCollatorWithFlattening's kwargs describe (one row of packed sequences); None
    when they are absent or do not describe this call (then the mask decides)."""
    if any(kwargs.get(name) is None for name in CU_SEQLENS_KWARGS) or batch != 1:
        return None
    cu_q, cu_k = (torch.as_tensor(kwargs[name]) for name in CU_SEQLENS_KWARGS[:2])
    if cu_q.dim() != 1 or cu_k.shape != cu_q.shape:
        return None
    if int(cu_q[-1]) != q_len or int(cu_k[-1]) != k_len:
        return None  # e.g. decoding against a cache: the mask describes that call
    return VarlenLayout(
        1, q_len, k_len, None, None, cu_q.to(torch.int32), cu_k.to(torch.int32),
        int(kwargs["max_length_q"]), int(kwargs["max_length_k"]),
    )  # fmt: skip


def unpad(x: Tensor, index: Tensor | None) -> Tensor:
    """(B, heads, T, D) -> the rows `index` of its (B T, heads, D) view (all of them for None)."""
    rows = x.transpose(1, 2)  # (B, T, heads, D)
    rows = rows[0] if rows.shape[0] == 1 else rows.flatten(0, 1)  # (B T, heads, D)
    return rows if index is None else rows.index_select(0, index)  # (total, heads, D)


def pad(out: Tensor, layout: VarlenLayout) -> Tensor:
    """(total_q, H, D) -> (B, Tq, H, D), zeros at the rows no sequence holds (padded queries)."""
    B, Tq = layout.batch, layout.q_len
    if layout.q_index is None:
        return out.view(B, Tq, *out.shape[1:])
    full = out.new_zeros(B * Tq, *out.shape[1:])  # (B Tq, H, D)
    return full.index_copy(0, layout.q_index, out).view(B, Tq, *out.shape[1:])


def attend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layout: VarlenLayout,
    scale: float | None,
    variants: dict | None = None,
) -> Tensor:
    """Causal attention of each segment of layout: query (B, H, Tq, D), key/value (B, Hkv, Tk, D)
    -> (B, Tq, H, D) contiguous, zeros at padded query positions. variants: attention_varlen's
    window / softcap / sinks keyword arguments (fastgpt.hf.hf_variants)."""
    if layout.sequences == 0:  # every query is padding
        return query.new_zeros(layout.batch, layout.q_len, query.shape[1], value.shape[-1])
    q = unpad(query, layout.q_index)  # (total_q, H, D)
    k, v = unpad(key, layout.k_index), unpad(value, layout.k_index)  # (total_k, Hkv, D)
    out = attention_varlen(
        q,
        k,
        v,
        layout.cu_seqlens_q.to(q.device),
        layout.cu_seqlens_k.to(q.device),
        layout.max_seqlen_q,
        layout.max_seqlen_k,
        causal=True,
        scale=scale,
        **(variants or {}),
    )  # fmt: skip  (total_q, H, D)
    return pad(out, layout).contiguous()  # (B, Tq, H, D)
