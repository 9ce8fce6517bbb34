"""The KV tensors of the block pool and the paged attention that reads them.

Storage: per layer, K and V of shape ``[kv_heads, num_blocks * block_size, head_dim]``; block
``b`` owns slots ``b*block_size .. (b+1)*block_size - 1``. A step's new keys and values are
written into their slots (``index_copy_``), then each request attends over its own blocks.

Reading without copying: a request's blocks are grouped into runs of physically contiguous
blocks (in any logical order, since attention does not care about the order of keys once
each key's position is known); each run is a strided view of the storage, so decoding reads
the cache in place instead of gathering it every layer (which costs as much as the model's
weights for a few hundred tokens). A decoding query's scores are computed per run,
softmaxed together, and the values summed per run; the query heads of one KV head are
folded into the rows of one product, so K and V are never repeated. A prefill chunk goes
through PyTorch's fused attention (tiled: a 2,000-token chunk never materialises its
score matrix) over its runs, with grouped-query attention and a boolean mask. Positions a
query may not see (the future, the unwritten tail of the last block) are masked.

The model calls :func:`paged_attention` through transformers' attention interface
(``attn_implementation="edgellm_paged"``, :func:`register`), with the step's
:class:`StepLayout` (which names its :class:`KVCache`) passed down as the ``edgellm_step``
keyword argument: several engines in one process each have their own cache.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

ATTENTION_NAME = "edgellm_paged"
_EMPTY = torch.empty(())
"""``baddbmm``'s ignored input (``beta=0``): broadcast, never read."""


class KVCache:
    """K and V storage for ``num_blocks`` blocks of every layer."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int, dtype: torch.dtype):  # fmt: skip
        shape = (num_layers, num_kv_heads, num_blocks * block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.block_size = block_size
        self.num_blocks = num_blocks

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                        dtype: torch.dtype) -> int:  # fmt: skip
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * head_dim * block_size * element

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class _SeqLayout:
    """Where one request's keys are and which of them each of its queries may see.

    Decoding (one query): ``runs``, each ``(first slot, end slot, additive mask [1, n] or
    None)``, attended run by run (a few small products, no copy). Prefilling (a chunk of
    queries): ``spans`` (first slot, end slot) concatenated, with one boolean ``mask``
    ``[q_len, n]`` (True = visible) or None, for one fused attention call."""

    __slots__ = ("q_start", "q_len", "runs", "spans", "mask")

    def __init__(self, q_start: int, q_len: int):
        self.q_start = q_start
        self.q_len = q_len
        self.runs: list[tuple[int, int, torch.Tensor | None]] = []
        self.spans: list[tuple[int, int]] = []
        self.mask: torch.Tensor | None = None


class StepLayout:
    """The attention layout of one engine step, built once and used by every layer.

    ``tables[i]`` is request ``i``'s block ids (logical order), ``context_lens[i]`` its tokens
    with KV after this step and ``q_lens[i]`` how many of them this step computes (its
    queries, the last ones). ``slots`` is where the step's new keys go, in input order.
    """

    def __init__(self, cache: KVCache, tables: Sequence[Sequence[int]],
                 context_lens: Sequence[int], q_lens: Sequence[int]):  # fmt: skip
        self.cache = cache
        self.layers_seen = 0
        dtype = cache.k.dtype
        bs = cache.block_size
        self.seqs: list[_SeqLayout] = []
        slots: list[int] = []
        q_start = 0
        for table, ctx, q in zip(tables, context_lens, q_lens):
            table = table[: -(-ctx // bs)]
            for pos in range(ctx - q, ctx):
                slots.append(table[pos // bs] * bs + pos % bs)
            seq = _SeqLayout(q_start, q)
            q_pos = torch.arange(ctx - q, ctx).unsqueeze(1)
            masks = []
            for first_block, group in _runs(table):
                first = first_block * bs
                k_pos = (torch.tensor(group).unsqueeze(1) * bs + torch.arange(bs)).reshape(1, -1)
                visible = k_pos <= q_pos  # [q, n]: causal; the unwritten tail is in the future
                seen = int(visible[-1].sum())
                if not bool(visible[:, seen:].any()):
                    visible = visible[:, :seen]  # what nobody may see is at the run's end
                end = first + visible.shape[1]
                if end == first:
                    continue
                if q == 1:
                    mask = None if bool(visible.all()) else torch.zeros(
                        visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
                    seq.runs.append((first, end, mask))
                else:
                    seq.spans.append((first, end))
                    masks.append(visible)
            if masks:
                mask = masks[0] if len(masks) == 1 else torch.cat(masks, dim=1)
                seq.mask = None if bool(mask.all()) else mask
            self.seqs.append(seq)
            q_start += q
        self.slots = torch.tensor(slots, dtype=torch.long)
        self.num_tokens = q_start


def _runs(table: Sequence[int]) -> list[tuple[int, list[int]]]:
    """Physically contiguous groups of a block table: ``(first block id, logical indices)``."""
    groups: list[tuple[int, list[int]]] = []
    last = -2
    for logical in sorted(range(len(table)), key=table.__getitem__):
        physical = table[logical]
        if physical == last + 1:
            groups[-1][1].append(logical)
        else:
            groups.append((physical, [logical]))
        last = physical
    return groups


def attend(layout: StepLayout, layer: int, query: torch.Tensor, key: torch.Tensor,
           value: torch.Tensor, scale: float) -> torch.Tensor:  # fmt: skip
    """Store the step's keys/values of ``layer`` in their slots, then attend per request.
    ``query`` ``[H, T, d]``, ``key``/``value`` ``[KVH, T, d]`` (the step's tokens in input
    order); returns ``[H, T, d]``."""
    k_store = layout.cache.k[layer]
    v_store = layout.cache.v[layer]
    with _one_thread():  # small copies: see _decode
        k_store.index_copy_(1, layout.slots, key)
        v_store.index_copy_(1, layout.slots, value)
    heads, d = query.shape[0], query.shape[2]
    kv_heads = k_store.shape[0]
    group = heads // kv_heads
    outs = []
    for seq in layout.seqs:
        q = seq.q_len
        if q > 1:  # a prefill chunk: one fused (tiled) attention over the request's spans
            spans = seq.spans
            if len(spans) == 1:
                (first, end), = spans
                keys, values = k_store[:, first:end], v_store[:, first:end]
            else:
                keys = torch.cat([k_store[:, a:b] for a, b in spans], dim=1)
                values = torch.cat([v_store[:, a:b] for a, b in spans], dim=1)
            o = F.scaled_dot_product_attention(
                query[:, seq.q_start : seq.q_start + q].unsqueeze(0), keys.unsqueeze(0),
                values.unsqueeze(0), attn_mask=seq.mask, scale=scale, enable_gqa=True,
            )  # fmt: skip
            outs.append(o[0])
            continue
        with _one_thread():
            outs.append(_decode(seq, query, k_store, v_store, kv_heads, group, scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _decode(seq: _SeqLayout, query: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor,
            kv_heads: int, group: int, scale: float) -> torch.Tensor:
    """One decoding query against its runs in place: ``[H, 1, d]``.

    Runs single-threaded (the caller sees to it): these products and softmaxes are a few
    thousand elements each, and PyTorch would fork a worker team for some of them; on a busy
    machine each fork waits for a descheduled worker, and a step of a few hundred of them
    slows down tenfold."""
    heads, d = query.shape[0], query.shape[2]
    # [H, 1, d] -> [KVH, group, d]: the query heads sharing a KV head, stacked.
    qs = query[:, seq.q_start : seq.q_start + 1].reshape(kv_heads, group, d)
    scores = []
    for first, end, mask in seq.runs:
        # scale * q.k in one product (scaling the scores, as the reference does)
        s = torch.baddbmm(_EMPTY, qs, k_store[:, first:end].transpose(1, 2), beta=0, alpha=scale)
        if mask is not None:
            s = s + mask
        scores.append(s)
    s = scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1)
    if s.dtype == torch.float32:
        p = torch.softmax(s, dim=-1)
    else:
        p = torch.softmax(s.float(), dim=-1).to(qs.dtype)
    if len(seq.runs) == 1:
        first, end, _ = seq.runs[0]
        o = torch.matmul(p, v_store[:, first:end])
    else:
        o = None
        offset = 0
        for first, end, _ in seq.runs:
            part = torch.matmul(p[:, :, offset : offset + end - first], v_store[:, first:end])
            offset += end - first
            o = part if o is None else o + part
    return o.view(heads, 1, d)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    **kwargs):  # fmt: skip
    """:func:`attend` with transformers' attention-interface signature (``[1, H, T, d]`` in,
    ``[1, T, H, d]`` out)."""
    layout: StepLayout = kwargs["edgellm_step"]
    layout.layers_seen += 1
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attend(layout, module.layer_idx, query[0], key[0], value[0], scale)
    return out.transpose(0, 1).unsqueeze(0), None


def register() -> None:
    """Make ``attn_implementation="edgellm_paged"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention)
