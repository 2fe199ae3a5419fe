"""
04 - Paged attention: the KV cache as a pool of fixed-size blocks, shared between sequences.

A buffer per sequence sized for its longest length reserves memory for tokens that never come;
buffers grown exactly leave holes no new sequence fits in. vLLM borrows paging from virtual memory:
the cache is one pool of `num_blocks` blocks of `block_size` token slots, a sequence owns a list of
block ids (its *block table*), and attention reads its keys through that table. A sequence wastes at
most block_size - 1 slots, any free block serves any sequence, and sequences with the same prefix
share blocks without a copy. Slot mapping, worked example (block_size 4, block table [7, 2]):

    token position   0  1  2  3 | 4  5  6  7
    block            7  7  7  7 | 2  2  2  2
    slot             28 29 30 31| 8  9  10 11       slot = block_tables[pos // 4] * 4 + pos % 4

A layer's cache is (num_blocks, n_kv, block_size, d): inside a block each KV head's vectors lie back
to back, so gathering a sequence copies whole runs of block_size x d numbers, never single vectors.
Block size is a trade-off: small blocks waste less and share prefixes at a finer grain, but make
longer tables, more hashes and more, smaller pieces to gather. vLLM uses 16: for Qwen3-0.6B in bf16
that is 1.75 MiB of k/v a block over 28 layers, and 1 GiB of cache holds 9,360 tokens.

Prefix caching: a full block is named by a hash chain, hash(parent's hash, its token ids), standing for
the whole prefix up to its end. A new request's full blocks are looked up; every hit is k/v shared by
reference count, not computed again. A finished sequence's hashed blocks keep their k/v (*evictable*)
until the free list runs dry: the last request's system prompt is still there for the next one.
Only full blocks of computed, verified tokens are hashed (`commit`): never a partial block or draft tokens.

Attention: each sequence - a prompt chunk or one decoding token alike - gathers its blocks and runs
one fused SDPA over exactly its tokens. Kernels that read the blocks in place (vLLM's, FlashInfer)
plug in at `AttentionBackend`; this torch path is their reference. CUDA graphs need data-independent
shapes: there each decoding sequence gathers its whole padded table and a mask hides what is past its end.

    python 04_paged_attention.py     # block tables drawn, prefix cache hits, paged == dense attention
"""
from __future__ import annotations

import contextlib
import math
import sys
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# ----------------------------------------------------------------------------- block manager


class NoFreeBlocksError(RuntimeError):
    """The block pool cannot give what was asked; nothing was changed (callers check can_allocate first)."""


NO_PARENT = -1   # "no parent": Python's hash() never returns -1 (CPython reserves it for errors)


def block_hash(parent: int, tokens: tuple[int, ...]) -> int:
    """The hash chain: a block's hash covers its tokens and (through the parent) every token before."""
    return hash((parent, tokens))


class BlockManager:
    """All allocation state of the paged KV cache: block tables, reference counts and the prefix cache.
    A cached block keeps its token ids and parent's hash: a hit is checked against them, never the hash
    alone. Every method that fails raises before changing anything. Each block is in one state:
        used       ref > 0 (in at least one block table)
        evictable  ref 0, hashed: kept for a prefix hit, taken (least recently used first) when none is free
        free       ref 0, not hashed: on the free list"""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.enable_prefix_caching = num_blocks, block_size, enable_prefix_caching
        self.block_tables: dict[int, list[int]] = {}
        self.num_tokens: dict[int, int] = {}
        self._ref = [0] * num_blocks
        self._hash, self._tokens, self._parent = [None] * num_blocks, [None] * num_blocks, [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()   # in release order: eviction pops the front
        self._cached: dict[int, int] = {}                          # hash -> block id
        self._chain: dict[int, list[int]] = {}                     # seq -> hashes of its committed blocks
        self.prefix_lookups = self.prefix_hit_blocks = self.prefix_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks obtainable now: the free list plus evictable cached blocks."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def is_cached(self, block_id: int) -> bool:
        return self._hash[block_id] is not None

    def cached_tokens(self, block_id: int) -> tuple[int, ...] | None:
        return self._tokens[block_id]

    def evictable_blocks(self) -> list[int]:
        """Evictable blocks, the next one to be evicted first."""
        return list(self._evictable)

    def num_committed_tokens(self, seq_id: int) -> int:
        """Tokens of the sequence in committed full blocks (truncate never goes below this)."""
        return len(self._chain.get(seq_id, ())) * self.block_size

    def blocks_needed(self, seq_id: int | None, n: int) -> int:
        """New blocks the sequence needs for n more token slots (a new sequence if seq_id is None/unknown)."""
        have_tokens, have_blocks = self.num_tokens.get(seq_id, 0), len(self.block_tables.get(seq_id, ()))
        return max(0, -(-(have_tokens + n) // self.block_size) - have_blocks)

    def can_allocate(self, n: int, seq_id: int | None = None) -> bool:
        """Whether n more slots fit; for a new sequence, all its tokens (a prefix hit never needs more blocks)."""
        return self.blocks_needed(seq_id, n) <= self.num_free_blocks

    def _take_block(self) -> int:
        if self._free:
            b = self._free.popleft()
        else:  # evict the least recently used cached block
            b, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash[b]]
            self._hash[b] = self._tokens[b] = self._parent[b] = None
        self._ref[b] = 1
        return b

    def _release(self, b: int) -> None:
        self._ref[b] -= 1
        if self._ref[b] == 0:
            if self._hash[b] is not None:
                self._evictable[b] = None   # most recently used end
            else:
                self._free.append(b)

    def _lookup(self, token_ids) -> tuple[list[int], list[int]]:
        """The longest run of cached full blocks starting token_ids, never the last token's (its logits are needed)."""
        bs, blocks, hashes, parent = self.block_size, [], [], NO_PARENT
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            h = block_hash(parent, tokens)
            b = self._cached.get(h)
            if b is None or self._parent[b] != parent or self._tokens[b] != tokens or b in blocks:
                break  # miss, or a hash collision: the stored parent and tokens decide
            blocks.append(b)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def _plan(self, token_ids, num_new_tokens: int | None):
        """What admitting token_ids takes: (hits, their hashes, cached, new tokens, new blocks, whether they fit)."""
        hits, hashes = self._lookup(token_ids) if self.enable_prefix_caching else ([], [])
        cached = len(hits) * self.block_size
        n_new = len(token_ids) - cached if num_new_tokens is None else num_new_tokens
        if n_new < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {n_new}")
        need = -(-(cached + n_new) // self.block_size) - len(hits)
        revived = sum(1 for b in hits if self._ref[b] == 0)   # hits taken out of the evictable set
        return hits, hashes, cached, n_new, need, need <= self.num_free_blocks - revived

    def cached_prefix_tokens(self, token_ids) -> int:
        """How many leading tokens of token_ids the prefix cache holds now (a look: nothing counted or changed)."""
        return len(self._lookup(token_ids)[0]) * self.block_size if self.enable_prefix_caching else 0

    def can_admit(self, token_ids, num_new_tokens: int | None = None) -> bool:
        """Whether allocate(seq_id, token_ids, num_new_tokens) would succeed now, prefix hits included."""
        return self._plan(token_ids, num_new_tokens)[-1]

    def allocate(self, seq_id: int, token_ids, num_new_tokens: int | None = None) -> int:
        """Register a new sequence: share its cached prefix blocks, then reserve num_new_tokens more slots
        (default: the rest of token_ids). Returns how many tokens were cached."""
        if seq_id in self.block_tables:
            raise ValueError(f"sequence {seq_id} is already allocated")
        hits, hashes, cached, n_new, need, fits = self._plan(token_ids, num_new_tokens)
        if not fits:
            raise NoFreeBlocksError(f"sequence {seq_id} needs {need} new blocks, {self.num_free_blocks} can be had")
        for b in hits:
            if self._ref[b] == 0:
                del self._evictable[b]  # revived: back in use, out of the eviction queue
            self._ref[b] += 1
        self.block_tables[seq_id] = hits + [self._take_block() for _ in range(need)]
        self.num_tokens[seq_id] = cached + n_new
        if self.enable_prefix_caching:
            self._chain[seq_id] = hashes
            self.prefix_lookups += 1
            self.prefix_hit_blocks += len(hits)
            self.prefix_hit_tokens += cached
        return cached

    def append_slots(self, seq_id: int, n: int = 1) -> None:
        """Reserve n more token slots (new blocks only when crossing block boundaries)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        need = self.blocks_needed(seq_id, n)
        if need > self.num_free_blocks:
            raise NoFreeBlocksError(f"sequence {seq_id} needs {need} new blocks, {self.num_free_blocks} free")
        self.block_tables[seq_id].extend(self._take_block() for _ in range(need))
        self.num_tokens[seq_id] += n

    def slot_mapping(self, seq_id: int, start: int, end: int) -> list[int]:
        """Flat cache slots of token positions [start, end): block_id * block_size + offset."""
        if not 0 <= start <= end <= self.num_tokens[seq_id]:
            raise ValueError(f"positions [{start}, {end}) outside the {self.num_tokens[seq_id]} "
                             f"slots reserved for sequence {seq_id}")
        table, bs = self.block_tables[seq_id], self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def commit(self, seq_id: int, token_ids) -> None:
        """token_ids: the sequence's computed and verified tokens (never draft tokens). Each full block they
        cover gets its hash registered, unless an identical block has it; slots not reserved are ignored."""
        if not self.enable_prefix_caching:
            return
        chain, table, bs = self._chain[seq_id], self.block_tables[seq_id], self.block_size
        n_full = min(len(token_ids), self.num_tokens[seq_id]) // bs
        for i in range(len(chain), n_full):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            parent = chain[-1] if chain else NO_PARENT
            h = block_hash(parent, tokens)
            if h not in self._cached:
                self._cached[h] = b = table[i]
                self._hash[b], self._tokens[b], self._parent[b] = h, tokens, parent
            chain.append(h)

    def truncate(self, seq_id: int, n: int) -> None:
        """Give back the last n reserved slots (speculative rollback), never into committed blocks."""
        new_len = self.num_tokens[seq_id] - n
        if n < 0 or new_len < self.num_committed_tokens(seq_id):
            raise ValueError(f"cannot truncate {n} of sequence {seq_id}'s {self.num_tokens[seq_id]} slots "
                             f"({self.num_committed_tokens(seq_id)} are committed)")
        table, keep = self.block_tables[seq_id], -(-new_len // self.block_size)
        for b in reversed(table[keep:]):
            self._release(b)
        del table[keep:]
        self.num_tokens[seq_id] = new_len

    def free(self, seq_id: int) -> None:
        """Release the sequence's blocks, tail first: its head serves more future prefixes, so is evicted last."""
        for b in reversed(self.block_tables.pop(seq_id)):
            self._release(b)
        del self.num_tokens[seq_id]
        self._chain.pop(seq_id, None)


# ----------------------------------------------------------------------------- kv cache storage


def allocate_kv_cache(cfg, num_blocks: int, block_size: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """The whole cache (layers, 2, num_blocks, n_kv, block_size, d), zeroed: [l, 0] is layer l's k_cache, [l, 1] v."""
    return torch.zeros(cfg.num_hidden_layers, 2, num_blocks, cfg.num_key_value_heads, block_size,
                       cfg.head_dim, dtype=dtype, device=device)


def slot_rows(slot_mapping, n_kv: int, block_size: int) -> torch.Tensor:
    """Rows (N * n_kv,) of a cache seen as (num_blocks * n_kv * block_size, d): slot s of head h is row
    ((s // block_size) * n_kv + h) * block_size + s % block_size. E.g. block_size 4, n_kv 2: slot 5 -> rows 9, 13."""
    heads = torch.arange(n_kv, device=slot_mapping.device)
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    return ((blocks[:, None] * n_kv + heads) * block_size + offsets[:, None]).reshape(-1)


def store_kvcache(k, v, k_cache, v_cache, slot_mapping, rows=None) -> None:
    """Write the step's new k/v (N, n_kv, d) to their slots (N,): one row copy per cache (`rows`: slot_rows)."""
    n_kv, block_size, d = k_cache.shape[1:]
    rows = slot_rows(slot_mapping, n_kv, block_size) if rows is None else rows
    k_cache.view(-1, d).index_copy_(0, rows, k.reshape(-1, d))
    v_cache.view(-1, d).index_copy_(0, rows, v.reshape(-1, d))


def read_slots(cache, slot_mapping) -> torch.Tensor:
    """The inverse of store_kvcache: the (N, n_kv, d) vectors held at these slots."""
    block_size = cache.shape[2]
    return cache[slot_mapping // block_size, :, slot_mapping % block_size]


# ----------------------------------------------------------------------------- attention


@dataclass
class SequencePlan:
    """One sequence of a step, as its attention sees it (built once per step, used by every layer)."""
    q: tuple[int, int]             # its rows [start, end) of the step's packed q (its new tokens)
    own: bool                      # its keys are the step's own k/v (a first prompt chunk): no gather
    rows: tuple[int, int]          # its part [start, end) of StepPlan.index (the blocks to gather)
    context_len: int               # keys it attends to: its cached tokens and its new ones
    causal: bool                   # a whole prompt at once: SDPA's causal mask suffices
    mask: torch.Tensor | None      # (q_len, context_len) bool: a chunk after earlier positions
    decode_row: int | None         # its row in StepPlan.decode, when a backend takes decode rows together


@dataclass
class DecodeRows:
    """The step's decode rows (one query reading the cache) as one batch, for a backend that batches them."""
    every_row: bool                # the step is decode rows only: the batch is the whole answer
    q_rows: torch.Tensor           # (D,) their rows of the step's q
    block_tables: torch.Tensor     # (D, width) int64
    context_lens: torch.Tensor     # (D,) int64


@dataclass
class StepPlan:
    """What a step's attention needs that does not depend on the layer (vLLM's attention metadata)."""
    index: torch.Tensor            # rows of the (blocks * n_kv, block_size * d) view of a cache to gather
    seqs: list[SequencePlan]
    decode: DecodeRows | None


def step_plan(block_tables, context_lens, q_lens, block_size: int, n_kv: int, step_kv: bool,
              batch_decode_rows: bool = False) -> StepPlan:
    """Sequence b's q_len new tokens are the LAST of its context_len positions (query row i at position
    context_len - q_len + i). step_kv: the step's own k/v will be at hand, so a chunk with nothing cached
    before it reads them; every other sequence gathers its blocks in use (never a padding entry)."""
    lens, q_lens = context_lens.tolist(), q_lens.tolist()                       # one sync per step
    own_kv = [step_kv and n == m for n, m in zip(lens, q_lens)]
    blocks_used = [0 if own else -(-n // block_size) for n, own in zip(lens, own_kv)]
    (B, width), device = block_tables.shape, block_tables.device
    in_use = torch.arange(width, device=device) < torch.tensor(blocks_used, device=device)[:, None]   # (B, width)
    rows = block_tables.long()[:, None, :] * n_kv + torch.arange(n_kv, device=device)[None, :, None]  # (B, n_kv, width)
    index = rows[in_use[:, None, :].expand(B, n_kv, width)]           # (n_kv * blocks in use,) sequence, head, block
    seqs, q_start, row, decode_rows = [], 0, 0, []
    for b, (n, m, own, used) in enumerate(zip(lens, q_lens, own_kv, blocks_used)):
        mask = None
        if 1 < m < n:
            q_pos = torch.arange(n - m, n, device=device)
            mask = torch.arange(n, device=device)[None, :] <= q_pos[:, None]      # (q_len, context_len)
        decode_row = None
        if batch_decode_rows and m == 1 and not own:
            decode_row = len(decode_rows)
            decode_rows.append((b, q_start))
        seqs.append(SequencePlan(q=(q_start, q_start + m), own=own, rows=(row, row + n_kv * used), context_len=n,
                                 causal=m == n and m > 1, mask=mask, decode_row=decode_row))
        q_start, row = q_start + m, row + n_kv * used
    decode = None
    if decode_rows:
        which = torch.tensor([b for b, _ in decode_rows], dtype=torch.long, device=device)
        decode = DecodeRows(every_row=len(decode_rows) == q_start,
                            q_rows=torch.tensor([r for _, r in decode_rows], dtype=torch.long, device=device),
                            block_tables=block_tables.long()[which].contiguous(),
                            context_lens=context_lens.long()[which].contiguous())
    return StepPlan(index=index, seqs=seqs, decode=decode)


class AttentionBackend:
    """Attention once a sequence's keys are found: torch's SDPA, one call per sequence. The engine's kernels
    (nano_kernels/attention.py) subclass it: all decode rows in one call, or `sequence` their own way."""

    batches_decode_rows = False

    def decode_rows(self, q, k_cache, v_cache, block_tables, context_lens):
        """q (B, H, d), one row per sequence over its context_lens[b] cached tokens -> (B, H, d)."""
        raise NotImplementedError

    def sequence(self, q, keys, values, seq: SequencePlan):
        """One sequence: q (m, H, d) against keys/values (1, n_kv, context_len, d) -> (m, H, d)."""
        (m, H, d), n_kv = q.shape, keys.shape[1]
        if m == 1:
            # GQA as a shape: a KV head's g query heads are g queries (n_kv x g rows for SDPA's threads).
            out = F.scaled_dot_product_attention(q[0].view(1, n_kv, H // n_kv, d), keys, values)
            return out.reshape(1, H, d)                                           # (1, H, d)
        # 4-D inputs take SDPA's fused CPU kernel (3-D: plain math); is_causal skips the upper triangle.
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, attn_mask=seq.mask,
                                             is_causal=seq.causal, enable_gqa=True)   # (1, H, q_len, d)
        return out[0].transpose(0, 1)                                             # (q_len, H, d)


TORCH_SDPA = AttentionBackend()

# cuDNN's SDPA builds a plan for every new sequence length, and a server sees new ones at almost every step.
NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# A GPU gathers the whole step's blocks in one launch; a CPU gathers each sequence right before its SDPA.
GATHER_WHOLE_STEP_ON = ("cuda",)


def attend_per_sequence(q, k, v, k_cache, v_cache, plan: StepPlan, backend: AttentionBackend = TORCH_SDPA):
    """q (N, H, d) and the step's own k/v (N, n_kv, d; None: every sequence reads the cache) -> (N, H, d)."""
    with sdpa_kernel(NO_CUDNN) if q.is_cuda else contextlib.nullcontext():
        n_kv, bs, d = k_cache.shape[1:]
        gather = lambda cache, index: cache.view(-1, bs * d).index_select(0, index)   # noqa: E731   (rows, bs * d)
        dec, decoded = plan.decode, None
        if dec is not None:                      # every decode row in one call of the backend
            if dec.every_row:                    # a pure decode step: the whole answer
                return backend.decode_rows(q, k_cache, v_cache, dec.block_tables, dec.context_lens)
            decoded = backend.decode_rows(q.index_select(0, dec.q_rows), k_cache, v_cache,
                                          dec.block_tables, dec.context_lens)            # (decode rows, H, d)
        whole_step = q.device.type in GATHER_WHOLE_STEP_ON
        if whole_step and plan.index.numel():
            k_all, v_all = gather(k_cache, plan.index), gather(v_cache, plan.index)
        outs = []
        for seq in plan.seqs:
            qa, qb = seq.q
            if seq.decode_row is not None:
                outs.append(decoded[seq.decode_row:seq.decode_row + 1])
                continue
            if seq.own:
                keys, values = k[qa:qb].transpose(0, 1)[None], v[qa:qb].transpose(0, 1)[None]   # (1, n_kv, q_len, d)
            else:
                ra, rb = seq.rows
                keys = k_all[ra:rb] if whole_step else gather(k_cache, plan.index[ra:rb])
                values = v_all[ra:rb] if whole_step else gather(v_cache, plan.index[ra:rb])
                keys = keys.view(1, n_kv, -1, d)[:, :, :seq.context_len]              # (1, n_kv, context_len, d)
                values = values.view(1, n_kv, -1, d)[:, :, :seq.context_len]
            outs.append(backend.sequence(q[qa:qb], keys, values, seq))
        return outs[0] if len(outs) == 1 else torch.cat(outs)                    # (N, H, d)


def paged_prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables,
                            backend: AttentionBackend = TORCH_SDPA):
    """Causal attention of B sequences' new tokens packed in q (N, H, d), sequence b's from row cu_seqlens_q[b],
    k/v stored, through block_tables (B, max_blocks) -> (N, H, d). A decode row is just a chunk of one."""
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    plan = step_plan(block_tables, context_lens, q_lens, k_cache.shape[2], k_cache.shape[1], step_kv=False,
                     batch_decode_rows=backend.batches_decode_rows)
    return attend_per_sequence(q, None, None, k_cache, v_cache, plan, backend)


@dataclass
class PaddedPlan:
    """Decode work whose shapes depend only on the tables' shapes (what CUDA graphs replay)."""
    index: torch.Tensor            # (B * n_kv * width,) rows of the (blocks * n_kv, block_size * d) view
    valid: torch.Tensor            # (B, 1, width * block_size, 1) bool: the slots within each context


def padded_plan(block_tables, context_lens, block_size: int, n_kv: int) -> PaddedPlan:
    """Every table entry past a sequence's last block (padding, e.g. -1) reads its first block: all indices real."""
    (B, width), device = block_tables.shape, block_tables.device
    in_use = torch.arange(width, device=device) < -(-context_lens.long() // block_size)[:, None]   # (B, width)
    blocks = torch.where(in_use, block_tables.long(), block_tables[:, :1].long())                 # (B, width)
    index = (blocks[:, None, :] * n_kv + torch.arange(n_kv, device=device)[None, :, None]).reshape(-1)
    valid = torch.arange(width * block_size, device=device) < context_lens[:, None]               # (B, L)
    return PaddedPlan(index=index, valid=valid[:, None, :, None])                                 # (B, 1, L, 1)


def _decode_padded(q, k_cache, v_cache, plan: PaddedPlan):
    B, H, d = q.shape
    n_kv, bs, L = k_cache.shape[1], k_cache.shape[2], plan.valid.shape[2]
    k = k_cache.view(-1, bs * d).index_select(0, plan.index).view(B, n_kv, L, d)        # (B, n_kv, L, d)
    v = v_cache.view(-1, bs * d).index_select(0, plan.index).view(B, n_kv, L, d)
    # Masked slots may hold anything, NaN included (a weight of 0 times NaN is NaN): zero them.
    k, v = torch.where(plan.valid, k, 0), torch.where(plan.valid, v, 0)
    out = F.scaled_dot_product_attention(q.view(B, n_kv, H // n_kv, d), k, v,
                                         attn_mask=plan.valid.transpose(-1, -2))        # (B, n_kv, g, d)
    return out.reshape(B, H, d)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, static_shapes: bool = False,
                           backend: AttentionBackend = TORCH_SDPA):
    """q (B, H, d), one new token per sequence (k/v stored), over its context_lens[b] cached tokens -> (B, H, d).
    static_shapes: the padded form, its width rounded up to a power of two by the engine (<= 2x waste). Neither
    writes out the scores: fused SDPA keeps a running max, sum and output over key tiles (online softmax)."""
    n_kv, block_size = k_cache.shape[1], k_cache.shape[2]
    if static_shapes:
        return _decode_padded(q, k_cache, v_cache, padded_plan(block_tables, context_lens, block_size, n_kv))
    plan = step_plan(block_tables, context_lens, torch.ones_like(context_lens), block_size, n_kv, step_kv=False,
                     batch_decode_rows=backend.batches_decode_rows)
    return attend_per_sequence(q, None, None, k_cache, v_cache, plan, backend)


def decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens):
    """The check for paged_decode_attention: gather each sequence's keys, repeat K/V, plain softmax."""
    B, H, d = q.shape
    n_kv, bs = k_cache.shape[1], k_cache.shape[2]
    out = []
    for b in range(B):
        n = int(context_lens[b])
        pos = torch.arange(n, device=q.device)
        slots = block_tables[b].long()[pos // bs] * bs + pos % bs                                   # (n,)
        k = read_slots(k_cache, slots).float().repeat_interleave(H // n_kv, dim=1)                 # (n, H, d)
        v = read_slots(v_cache, slots).float().repeat_interleave(H // n_kv, dim=1)                 # (n, H, d)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) / math.sqrt(d)                       # (H, n)
        out.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v))                            # (H, d)
    return torch.stack(out).to(q.dtype)                                                          # (B, H, d)


class PagedContext:
    """A step as the model sees it (02_model's `attend` calls `context.attend`). Tensors, int64: slot_mapping
    (N,), block_tables (B, max_blocks), context_lens (B,), cu_seqlens_q (B+1,) or None for decode."""

    def __init__(self, kv_cache, slot_mapping, block_tables, context_lens, cu_seqlens_q=None,
                 static_shapes: bool = False, backend: AttentionBackend = TORCH_SDPA):
        self.kv_cache, self.backend = kv_cache, backend
        self.slot_mapping = slot_mapping.long()  # index_copy_ wants int64 (no copy when it already is)
        self.block_tables, self.context_lens = block_tables, context_lens
        self.cu_seqlens_q, self.is_prefill = cu_seqlens_q, cu_seqlens_q is not None
        self.static_shapes = static_shapes and not self.is_prefill   # decode's padded form (CUDA graphs)
        self.plan: StepPlan | PaddedPlan | None = None   # layer-independent: the first layer builds it
        self.rows = None                         # slot_rows of slot_mapping: where every layer writes

    def _plan(self):
        if self.plan is None:
            block_size, n_kv = self.kv_cache.shape[4], self.kv_cache.shape[3]
            if self.static_shapes:
                self.plan = padded_plan(self.block_tables, self.context_lens, block_size, n_kv)
            else:
                cu = self.cu_seqlens_q
                q_lens = cu[1:] - cu[:-1] if self.is_prefill else torch.ones_like(self.context_lens)
                self.plan = step_plan(self.block_tables, self.context_lens, q_lens, block_size, n_kv, step_kv=True,
                                      batch_decode_rows=self.backend.batches_decode_rows)
        return self.plan

    @classmethod
    def from_spans(cls, kv_cache, block_manager: BlockManager, spans, decode: bool | None = None,
                   backend: AttentionBackend = TORCH_SDPA):
        """A step from (seq_id, start, end) spans, slots reserved: compute [start, end), attend to [0, end)."""
        device = kv_cache.device
        decode = all(end - start == 1 for _, start, end in spans) if decode is None else decode
        slots = [s for sid, start, end in spans for s in block_manager.slot_mapping(sid, start, end)]
        tables = [block_manager.block_tables[sid][:-(-end // block_manager.block_size)] for sid, _, end in spans]
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int64, device=device)
        context_lens = torch.tensor([end for _, _, end in spans], dtype=torch.int64, device=device)
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
        cu = None if decode else torch.tensor([0] + [end - start for _, start, end in spans], device=device).cumsum(0)
        return cls(kv_cache, slot_mapping, block_tables, context_lens, cu, backend=backend)

    def attend(self, layer_idx: int, q, k, v):
        """q (N, H, d), k/v (N, n_kv, d) of the step's new tokens -> (N, H, d)."""
        k_cache, v_cache = self.kv_cache[layer_idx, 0], self.kv_cache[layer_idx, 1]
        if self.rows is None:
            self.rows = slot_rows(self.slot_mapping, k_cache.shape[1], k_cache.shape[2])
        store_kvcache(k, v, k_cache, v_cache, self.slot_mapping, self.rows)
        if self.static_shapes:
            return _decode_padded(q, k_cache, v_cache, self._plan())
        return attend_per_sequence(q, k, v, k_cache, v_cache, self._plan(), self.backend)


# ----------------------------------------------------------------------------- demo


WORDS = ["<s>", "the", "cat", "sat", "on", "mat", "and", "then", "slept", "purred", "a", "dog", "ran",
         "far", "away", "home", "loudly", "all", "day", "long"]


def main() -> None:
    import rich.table
    console, bm, tokens, bs = rich.get_console(), BlockManager(num_blocks=10, block_size=4), {}, 4
    show = lambda ids: " ".join(WORDS[t] for t in ids or ())  # noqa: E731

    def admit(sid: int, text: str) -> None:
        tokens[sid] = [WORDS.index(w) for w in text.split()]
        console.print(f"allocate {'ABCD'[sid]}: {bm.allocate(sid, tokens[sid])} of {len(tokens[sid])} tokens cached")
        bm.commit(sid, tokens[sid])  # pretend the prefill ran: its full blocks are now cached

    def draw(title: str) -> None:
        pool = rich.table.Table("block (slots)", "state", "ref", "hashed tokens")
        for b in range(bm.num_blocks):
            users = ", ".join("ABCD"[sid] for sid, table in bm.block_tables.items() if b in table)
            state = f"used by {users}" if users else "[yellow]evictable[/]" if bm.is_cached(b) else "[dim]free[/]"
            pool.add_row(f"{b} ({b * bs}..{b * bs + bs - 1})", state, str(bm.ref_count(b)), show(bm.cached_tokens(b)))
        tables = [f"{'ABCD'[sid]}: block table {table}, {show(tokens[sid])}" for sid, table in bm.block_tables.items()]
        console.print(f"[bold]{title}[/]", *tables, pool, sep="\n")

    admit(0, "<s> the cat sat on the mat and then slept all day")
    admit(1, "<s> the cat sat on the mat and purred loudly")
    admit(2, "<s> a dog ran far away")
    draw("A, B, C in a pool of 10 blocks x 4 slots: B shares A's first 2 blocks")
    console.print("B's slot_mapping, position->slot:", *(f"{p}->{s}" for p, s in enumerate(bm.slot_mapping(1, 0, 10))))
    bm.free(0)
    draw("\nfree A: its shared blocks lose a reference, its own full block keeps k/v and hash (evictable)")
    admit(3, "<s> the cat sat on the mat and then slept all day long")
    draw("D = A's prompt + 1 word: 3 prefix hits, A's evictable block revived")

    # Paged attention == dense attention on random q/k/v in this layout, every unwritten slot holding NaN.
    torch.manual_seed(0)
    H, n_kv, d = 4, 2, 16
    kv_cache = torch.full((1, 2, bm.num_blocks, n_kv, bs, d), float("nan"))      # one layer
    k_cache, v_cache = kv_cache[0]
    first = torch.tensor(bm.slot_mapping(3, 0, 12))                              # A computed these before it left
    store_kvcache(torch.randn(12, n_kv, d), torch.randn(12, n_kv, d), k_cache, v_cache, first)
    spans = [(1, 8, 10), (2, 0, 6), (3, 12, 13)]                                 # B and D after their cached prefix
    ctx = PagedContext.from_spans(kv_cache, bm, spans)
    tables, lens, q, q_dec = ctx.block_tables, ctx.context_lens, torch.randn(9, H, d), torch.randn(3, H, d)
    out = ctx.attend(0, q, torch.randn(9, n_kv, d), torch.randn(9, n_kv, d))   # stores the k/v, then attends
    # Dense: a query at position p attends to exactly positions 0..p, like a decode row of the reference.
    seq, pos = zip(*[(i, p) for i, (_, start, end) in enumerate(spans) for p in range(start, end)])
    ref = decode_attention_reference(q, k_cache, v_cache, tables[list(seq)], torch.tensor(pos) + 1)
    dec_ref = decode_attention_reference(q_dec, k_cache, v_cache, tables, lens)
    errs = {"prefill, B+C+D in one step": out - ref}
    for name, static in (("decode, per sequence", False), ("decode, padded (CUDA graphs)", True)):
        errs[name] = paged_decode_attention(q_dec, k_cache, v_cache, tables, lens, static) - dec_ref
    console.print("\n[bold]paged attention == dense attention[/] (gather + plain softmax), max abs diff:",
                  *(f"  {name}: {e.abs().max():.1e}" for name, e in errs.items()), sep="\n")
    if not all(e.abs().max() < 1e-5 for e in errs.values()):  # NaN fails too
        raise SystemExit("paged attention does not match dense attention")


if __name__ == "__main__":
    sys.exit(main())
