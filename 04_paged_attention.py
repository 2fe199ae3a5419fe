"""
04 - Paged attention: the KV cache as a pool of fixed-size blocks, shared between sequences.

A server holds the keys and values of many sequences at once. Give each sequence one contiguous
buffer sized for its longest possible length and most of the memory is reserved for tokens that
never come (internal fragmentation); give it exactly what it needs and grow it, and the free
memory breaks into holes no new sequence fits in (external fragmentation). vLLM's answer, borrowed
from virtual memory, is paging: the cache is one pool of `num_blocks` blocks of `block_size` token
slots, a sequence owns a list of block ids (its *block table*, the page table), and attention reads
a sequence's keys through that table. A sequence now wastes at most block_size - 1 slots (the tail
of its last block), any free block serves any sequence, and two sequences with the same prefix can
point at the same physical blocks: sharing costs no copy.

Slot mapping, worked example (block_size 4, block table [7, 2]):

    token position   0  1  2  3 | 4  5  6  7
    block            7  7  7  7 | 2  2  2  2
    slot             28 29 30 31| 8  9  10 11       slot = block_tables[pos // 4] * 4 + pos % 4

so position 5 lives in block 2 at offset 1, flat slot 2*4 + 1 = 9. The KV cache of one layer is
a tensor (num_blocks, n_kv, block_size, d): inside a block, each KV head's block_size vectors lie
back to back, so reading a sequence's keys for one head copies whole runs of block_size x d
numbers, never single vectors. Each step writes its new tokens' k/v with one indexed copy
(`store_kvcache`, vLLM's name).

Block size is a trade-off:
  - small blocks: less waste (<= block_size - 1 slots per sequence) and prefix hits at a finer
    grain, but longer block tables, more hash entries and more, smaller pieces to gather;
  - large blocks: the opposite. vLLM's default is 16 tokens.

Prefix caching (vLLM's "automatic prefix caching"): a full block is named by a hash chain,
hash(parent block's hash, this block's token ids), so a block's hash stands for the whole prefix up
to its end. When a request arrives, its full blocks are hashed from the start and looked up; every
hit is a block whose k/v need not be computed again, shared by reference count. Blocks whose last
user finished keep their contents and hash and become *evictable*: they are reused for new data
only when the free list is empty, least recently used first. So the system prompt of the previous
request is still there for the next one. Only blocks whose every token is computed and verified
are hashed (`commit`), never a partly filled block or speculative (draft) tokens.

Attention over a block table, written with torch's ops: a sequence's blocks are gathered in one
copy (whole blocks, one contiguous run per block and KV head), then each sequence - a prompt
chunk or one decoding token alike - is one fused SDPA over exactly its tokens (`_step_plan`). A
prompt's first chunk needs no gather at all: its keys are the step's own. Real engines never
make that copy: vLLM's paged-attention kernels and FlashAttention / FlashInfer (which take a
block table) read each block in place, inside one fused kernel. So does this file's first piece of
C++, for decode rows on a CPU (`DECODE_KERNEL_SOURCE`, ~100 lines against ATen, compiled on first
use): ~3x faster than gather + SDPA in a batch-16 decode step, and the gather + SDPA path stays as
its fallback and its check. The second is flash attention for bf16 prompt chunks on a CPU with bf16
dot-product instructions (`PREFILL_KERNEL_SOURCE`): tiles of queries against tiles of keys, scores
in fp32, ~3x SDPA's causal kernel on a 512-token prompt. Where shapes must not depend on the data
(CUDA graphs), each decoding sequence gathers its whole block table, padded, and a mask hides the
slots past its end (see `paged_decode_attention`).

    python 04_paged_attention.py     # block tables drawn, prefix cache hits, paged == dense attention
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import sys
import warnings
from collections import OrderedDict, deque
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

qwen3 = importlib.import_module("02_model")

# ----------------------------------------------------------------------------- block manager


class NoFreeBlocksError(RuntimeError):
    """The block pool cannot give what was asked; nothing was changed (callers check can_allocate first)."""


# Python's hash() never returns -1 (CPython reserves it for errors), so -1 can stand for "no
# parent" without ever colliding with a real block hash.
NO_PARENT = -1


def block_hash(parent: int, tokens: tuple[int, ...]) -> int:
    """The hash chain: a block's hash covers its tokens and (through the parent) every token before."""
    return hash((parent, tokens))


class BlockManager:
    """All allocation state of the paged KV cache: which blocks each sequence owns, and the prefix cache.

    Per sequence: `block_tables[seq_id]` (its block ids, position p lives in block
    block_tables[seq_id][p // block_size]) and `num_tokens[seq_id]` (token slots reserved).
    Per block: a reference count (how many block tables hold it), and for a cached block its hash,
    its token ids and its parent's hash (a hit is confirmed against these, never the hash alone).

    Every block is in exactly one of three states:
        used       ref > 0 (in at least one block table)
        evictable  ref 0, hashed: contents kept for a future prefix hit, reusable when needed
        free       ref 0, not hashed: on the free list
    A new block comes from the free list, else the least recently used evictable block (its
    hash entry is dropped). Every method that fails raises before changing anything.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_tables: dict[int, list[int]] = {}
        self.num_tokens: dict[int, int] = {}
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._parent: list[int | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        # Evictable blocks in the order they were released: the first is the least recently used.
        # (An ordered set is a last-use clock that needs no scan: eviction is popping the front.)
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[int, int] = {}                          # hash -> block id
        self._chain: dict[int, list[int]] = {}                     # seq -> hashes of its committed blocks
        self.prefix_lookups = self.prefix_hit_blocks = self.prefix_hit_tokens = 0

    # --- read-only views (demo, tests)

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
        """Blocks registered in the prefix cache (used or evictable)."""
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def is_cached(self, block_id: int) -> bool:
        return self._hash[block_id] is not None

    def cached_tokens(self, block_id: int) -> tuple[int, ...] | None:
        """The token ids a cached block holds (None when not cached)."""
        return self._tokens[block_id]

    def evictable_blocks(self) -> list[int]:
        """Evictable blocks, the next one to be evicted first."""
        return list(self._evictable)

    def num_committed_tokens(self, seq_id: int) -> int:
        """Tokens of the sequence in committed full blocks (truncate never goes below this)."""
        return len(self._chain.get(seq_id, ())) * self.block_size

    # --- capacity

    def blocks_needed(self, seq_id: int | None, n: int) -> int:
        """New blocks the sequence needs for n more token slots (a new sequence if seq_id is None/unknown)."""
        have_tokens = self.num_tokens.get(seq_id, 0)
        have_blocks = len(self.block_tables.get(seq_id, ()))
        return max(0, -(-(have_tokens + n) // self.block_size) - have_blocks)

    def can_allocate(self, n: int, seq_id: int | None = None) -> bool:
        """Whether n more token slots fit. For a new sequence n counts all its tokens, as if nothing
        hit the prefix cache: a hit never needs more blocks, so True guarantees allocate succeeds."""
        return self.blocks_needed(seq_id, n) <= self.num_free_blocks

    # --- allocation

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
        """Longest run of cached full blocks equal to token_ids from the start, stopping before the
        block holding the last token (its logits are needed, so it is always computed)."""
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
        """What admitting token_ids would take: (hit blocks, their hashes, cached tokens, new tokens,
        new blocks needed, whether that many can be had). Changes nothing."""
        hits, hashes = self._lookup(token_ids) if self.enable_prefix_caching else ([], [])
        cached = len(hits) * self.block_size
        n_new = len(token_ids) - cached if num_new_tokens is None else num_new_tokens
        if n_new < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {n_new}")
        need = -(-(cached + n_new) // self.block_size) - len(hits)
        revived = sum(1 for b in hits if self._ref[b] == 0)   # hits taken out of the evictable set
        return hits, hashes, cached, n_new, need, need <= self.num_free_blocks - revived

    def cached_prefix_tokens(self, token_ids) -> int:
        """How many leading tokens of token_ids the prefix cache holds now (a look, not a lookup:
        nothing is counted or changed)."""
        return len(self._lookup(token_ids)[0]) * self.block_size if self.enable_prefix_caching else 0

    def can_admit(self, token_ids, num_new_tokens: int | None = None) -> bool:
        """Whether allocate(seq_id, token_ids, num_new_tokens) would succeed now, prefix hits included."""
        return self._plan(token_ids, num_new_tokens)[-1]

    def allocate(self, seq_id: int, token_ids, num_new_tokens: int | None = None) -> int:
        """Register a new sequence: share its cached prefix blocks, then reserve slots for
        num_new_tokens more tokens (default: the rest of token_ids). Returns the cached token count."""
        if seq_id in self.block_tables:
            raise ValueError(f"sequence {seq_id} is already allocated")
        hits, hashes, cached, n_new, need, fits = self._plan(token_ids, num_new_tokens)
        if not fits:
            raise NoFreeBlocksError(f"sequence {seq_id} needs {need} new blocks, "
                                    f"{self.num_free_blocks} can be had")
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
        """After a step computed k/v: token_ids are the sequence's computed and verified tokens so
        far. Each full block they cover that is not yet committed gets its hash registered (if an
        identical block is already registered, that one stays and this one is left unhashed).
        Tokens beyond the reserved slots (e.g. the token just sampled) are ignored."""
        if not self.enable_prefix_caching:
            return
        chain, table, bs = self._chain[seq_id], self.block_tables[seq_id], self.block_size
        n_full = min(len(token_ids), self.num_tokens[seq_id]) // bs
        for i in range(len(chain), n_full):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            parent = chain[-1] if chain else NO_PARENT
            h = block_hash(parent, tokens)
            if h not in self._cached:
                b = table[i]
                self._cached[h] = b
                self._hash[b], self._tokens[b], self._parent[b] = h, tokens, parent
            chain.append(h)

    def truncate(self, seq_id: int, n: int) -> None:
        """Give back the last n reserved slots (speculative rollback); blocks entirely past the
        new length are released. Committed blocks cannot be truncated into."""
        new_len = self.num_tokens[seq_id] - n
        if n < 0 or new_len < self.num_committed_tokens(seq_id):
            raise ValueError(f"cannot truncate {n} of sequence {seq_id}'s {self.num_tokens[seq_id]} slots "
                             f"({self.num_committed_tokens(seq_id)} are committed)")
        table = self.block_tables[seq_id]
        keep = -(-new_len // self.block_size)
        for b in reversed(table[keep:]):
            self._release(b)
        del table[keep:]
        self.num_tokens[seq_id] = new_len

    def free(self, seq_id: int) -> None:
        """Release all the sequence's blocks. Released last block first, so within one sequence
        the tail is evicted before the head (a head block is useful to more future prefixes)."""
        for b in reversed(self.block_tables.pop(seq_id)):
            self._release(b)
        del self.num_tokens[seq_id]
        self._chain.pop(seq_id, None)


# ----------------------------------------------------------------------------- kv cache storage


def allocate_kv_cache(cfg, num_blocks: int, block_size: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """The whole paged cache as one tensor (layers, 2, num_blocks, n_kv, block_size, d):
    kv_cache[layer, 0] is that layer's k_cache, kv_cache[layer, 1] its v_cache (contiguous views).
    One allocation, sized once at startup, that every sequence shares. Zeroed, so even a slot
    never written holds a finite number."""
    return torch.zeros(cfg.num_hidden_layers, 2, num_blocks, cfg.num_key_value_heads, block_size,
                       cfg.head_dim, dtype=dtype, device=device)


def slot_rows(slot_mapping, n_kv: int, block_size: int) -> torch.Tensor:
    """Where slots live in a cache seen as rows of d numbers, (num_blocks * n_kv * block_size, d):
    slot s of head h is row ((s // block_size) * n_kv + h) * block_size + s % block_size (heads
    come before offsets inside a block). Returns (N * n_kv,), token by token, head by head.
    E.g. block_size 4, n_kv 2: slot 5 (block 1, offset 1) -> rows 9 and 13."""
    heads = torch.arange(n_kv, device=slot_mapping.device)
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    return ((blocks[:, None] * n_kv + heads) * block_size + offsets[:, None]).reshape(-1)


def store_kvcache(k, v, k_cache, v_cache, slot_mapping, rows=None) -> None:
    """Write the step's new keys/values into their slots: k/v (N, n_kv, d), caches
    (num_blocks, n_kv, block_size, d), slot_mapping (N,) int64. One row copy per cache
    (`rows`: slot_rows of slot_mapping, when the caller already has them)."""
    n_kv, block_size, d = k_cache.shape[1:]
    rows = slot_rows(slot_mapping, n_kv, block_size) if rows is None else rows
    k_cache.view(-1, d).index_copy_(0, rows, k.reshape(-1, d))
    v_cache.view(-1, d).index_copy_(0, rows, v.reshape(-1, d))


def read_slots(cache, slot_mapping) -> torch.Tensor:
    """The inverse of store_kvcache: the (N, n_kv, d) vectors held at these slots."""
    block_size = cache.shape[2]
    return cache[slot_mapping // block_size, :, slot_mapping % block_size]


# ----------------------------------------------------------------------------- attention, per sequence


def _step_plan(block_tables, context_lens, q_lens, block_size: int, n_kv: int, step_kv: bool):
    """Everything about a step's attention that does not depend on the layer, built once per step
    (vLLM's attention metadata does the same). Sequence b's q_len new tokens are the LAST q_len of
    its context_len positions (a cached prefix or earlier chunks come before them).

    step_kv: the step's own k/v will be at hand (PagedContext.attend). Then a chunk with nothing
    cached before it (context_len == q_len, a new prompt's first chunk) reads its keys from them:
    no gather. Every other sequence's blocks in use are gathered, head by head: `index` are the
    rows of the (blocks * n_kv, block_size * d) view of a cache, sequence after sequence, and
    sequence b's are index[rows[0]:rows[1]], giving its (n_kv, tokens, d). Each sequence then
    attends to exactly context_len tokens (so the unwritten tail of a last block, or a padding table
    entry, is never read) with a causal mask aligned to the bottom right: query row i sits at
    position context_len - q_len + i and sees the keys up to there. `decode` collects the decode
    rows (one query reading the cache) as one batch for the CPU kernel, which reads their blocks
    itself (no gather)."""
    lens, q_lens = context_lens.tolist(), q_lens.tolist()                       # one sync per step
    own_kv = [step_kv and n == m for n, m in zip(lens, q_lens)]
    blocks_used = [0 if own else -(-n // block_size) for n, own in zip(lens, own_kv)]
    device = block_tables.device
    B, width = block_tables.shape
    in_use = torch.arange(width, device=device) < torch.tensor(blocks_used, device=device)[:, None]   # (B, width)
    rows = block_tables.long()[:, None, :] * n_kv + torch.arange(n_kv, device=device)[None, :, None]  # (B, n_kv, width)
    index = rows[in_use[:, None, :].expand(B, n_kv, width)]           # (n_kv * blocks in use,) sequence, head, block
    seqs, q_start, row, decode_rows = [], 0, 0, []
    for b, (n, m, own, used) in enumerate(zip(lens, q_lens, own_kv, blocks_used)):
        mask = None
        if 1 < m < n:
            q_pos = torch.arange(n - m, n, device=device)
            mask = torch.arange(n, device=device)[None, :] <= q_pos[:, None]      # (q_len, context_len)
        kernel_row = None
        if m == 1 and not own:                   # a decode row reading the cache: the kernel's work
            kernel_row = len(decode_rows)
            decode_rows.append((b, q_start))
        seqs.append(SimpleNamespace(q=(q_start, q_start + m), own=own, rows=(row, row + n_kv * used),
                                    context_len=n, causal=m == n and m > 1, mask=mask, kernel_row=kernel_row))
        q_start, row = q_start + m, row + n_kv * used
    # The decode rows as one batch for `paged_decode_kernel` (only where it may run): their q
    # rows, tables and lengths.
    decode = None
    if decode_rows and device.type in DECODE_KERNEL_ON:
        which = torch.tensor([b for b, _ in decode_rows], dtype=torch.long, device=device)
        decode = SimpleNamespace(every_row=len(decode_rows) == q_start,
                                 q_rows=torch.tensor([r for _, r in decode_rows], dtype=torch.long, device=device),
                                 block_tables=block_tables.long()[which].contiguous(),
                                 context_lens=context_lens.long()[which].contiguous())
    return SimpleNamespace(index=index, seqs=seqs, decode=decode)


# On recent NVIDIA GPUs SDPA prefers cuDNN's attention for bf16, which builds a plan for every new
# sequence length: measured on an H200 (torch 2.11), 42-50 ms the first time a length is seen, so a
# new prompt length cost the engine ~54 ms instead of ~5. Flash attention takes any length at once
# (0.05 ms), and a server sees new lengths at almost every step: the per-sequence path leaves cuDNN out.
NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# Where a sequence's gathered blocks are read decides the copy. A GPU gathers the whole step at
# once (one kernel launch, not one per sequence). A CPU gathers each sequence right before its
# SDPA, which then reads them from cache: measured on an AMD EPYC, a bf16 batch-16 decode step at
# a 340-token context 195-235 -> 175 ms (the whole step's gather, 23 MB a layer, leaves SDPA
# reading from memory), fp32 409 -> 345; at a 48-token context 115 -> 125.
GATHER_WHOLE_STEP_ON = ("cuda",)


def _attend_per_sequence(q, k, v, k_cache, v_cache, plan, kernel: bool = True):
    """q (N, H, d) and the step's own k/v (N, n_kv, d; None: every sequence reads the cache) ->
    (N, H, d): each sequence's blocks gathered, then one fused SDPA per sequence; decode rows go
    to the decode kernel below, and prompt chunks of PREFILL_KERNEL_MIN_ROWS or more to the prompt
    kernel, where they apply (kernel=False: neither)."""
    with sdpa_kernel(NO_CUDNN) if q.is_cuda else contextlib.nullcontext():
        return _attend_each(q, k, v, k_cache, v_cache, plan, kernel)


def _attend_each(q, k, v, k_cache, v_cache, plan, kernel):
    n_kv, bs, d = k_cache.shape[1:]
    H = q.shape[1]
    heads_first = lambda x: x.transpose(0, 1)[None]          # noqa: E731   (n, h, d) -> (1, h, n, d)
    gather = lambda cache, index: cache.view(-1, bs * d).index_select(0, index)   # noqa: E731   (rows, bs * d)
    decoded = None
    if kernel and plan.decode is not None and decode_kernel_applies(q, k_cache):
        # Every decode row in one call of the kernel, which reads their blocks in place.
        dec = plan.decode
        if dec.every_row:                        # a pure decode step: the whole answer
            return paged_decode_kernel(q, k_cache, v_cache, dec.block_tables, dec.context_lens)
        decoded = paged_decode_kernel(q.index_select(0, dec.q_rows), k_cache, v_cache,
                                      dec.block_tables, dec.context_lens)                  # (decode rows, H, d)
    whole_step = q.device.type in GATHER_WHOLE_STEP_ON
    if whole_step and plan.index.numel():
        k_all, v_all = gather(k_cache, plan.index), gather(v_cache, plan.index)
    outs = []
    for seq in plan.seqs:
        qa, qb = seq.q
        if decoded is not None and seq.kernel_row is not None:
            outs.append(decoded[seq.kernel_row:seq.kernel_row + 1])
            continue
        if seq.own:
            keys, values = heads_first(k[qa:qb]), heads_first(v[qa:qb])           # (1, n_kv, q_len, d)
        else:
            ra, rb = seq.rows
            keys = k_all[ra:rb] if whole_step else gather(k_cache, plan.index[ra:rb])
            values = v_all[ra:rb] if whole_step else gather(v_cache, plan.index[ra:rb])
            keys = keys.view(1, n_kv, -1, d)[:, :, :seq.context_len]              # (1, n_kv, context_len, d)
            values = values.view(1, n_kv, -1, d)[:, :, :seq.context_len]
        if kernel and prefill_kernel_applies(q[qa:qb]):
            # A prompt chunk: the kernel below reads the same keys token-major (views, no copy).
            outs.append(cpu_prefill_kernel().causal_attention(q[qa:qb], keys[0].transpose(0, 1), values[0].transpose(0, 1)))
            continue
        if qb - qa == 1:
            # A decode row: GQA as a shape, the g query heads of a KV head are g queries of one
            # n_kv-headed attention (as in _decode_padded). Same numbers as enable_gqa, and on an
            # AMD EPYC 4x faster in bf16 (164 vs 698 us at a 400-token context): the fused CPU
            # kernel parallelises over query rows, and 16 heads of 1 row make tiny work items.
            out = F.scaled_dot_product_attention(q[qa].view(1, n_kv, H // n_kv, d), keys, values)
            outs.append(out.reshape(1, H, d))                                     # (1, H, d)
            continue
        # 4-D inputs take SDPA's fused CPU kernel (3-D ones fall back to plain math); GQA without
        # repeating K/V; is_causal lets the kernel skip the upper triangle.
        out = F.scaled_dot_product_attention(heads_first(q[qa:qb]), keys, values, attn_mask=seq.mask,
                                             is_causal=seq.causal, enable_gqa=True)   # (1, H, q_len, d)
        outs.append(out[0].transpose(0, 1))                                       # (q_len, H, d)
    return outs[0] if len(outs) == 1 else torch.cat(outs)                        # (N, H, d)


def paged_prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables):
    """Causal attention for B sequences' new tokens, keys/values read through block tables.

    q (N, H, d): packed new tokens; sequence b's are q[cu_seqlens_q[b]:cu_seqlens_q[b+1]], its
    LAST q_len positions (a cached prefix or earlier chunks come before: context_len >= q_len).
    Their k/v must already be stored in the caches (num_blocks, n_kv, block_size, d).
    block_tables (B, max_blocks), padded with any id (-1 is fine). Returns (N, H, d).

    One gather of every sequence's blocks in use, then one SDPA per sequence over exactly its
    context (see `_step_plan`). A decode token is just a chunk of length 1, so mixed prefill +
    decode batches work too. No sequence is padded to the longest one: the work is the tokens.
    """
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    plan = _step_plan(block_tables, context_lens, q_lens, k_cache.shape[2], k_cache.shape[1], step_kv=False)
    return _attend_per_sequence(q, None, None, k_cache, v_cache, plan)


# ----------------------------------------------------------------------------- decode rows on a CPU: a kernel


# What a paged-attention kernel is: attention that follows the block table itself, reading each
# block where it lies in the pool, so no sequence's keys are ever copied together. vLLM's CUDA and
# CPU kernels, FlashAttention and FlashInfer all work this way; torch ships none for the CPU, so
# here is one, written against ATen (the C++ library under torch) and compiled on first use.
# Per (sequence, KV head), the g query heads that share that KV head: for each block in the
# table, scores s = q.k for its tokens in use, then the online softmax (the running max m and sum
# l rescale what came before), then acc += p.v; out = acc / l. One work item reads its blocks'
# keys and values once, in fp32 arithmetic whatever the cache's dtype, and nothing else.
# Measured on a 2-core AMD EPYC (AVX-512), bf16, Qwen3-0.6B's heads, 16 sequences of 340 tokens
# already in cache: 0.59 ms a layer against 3.3 for the gather and one SDPA per sequence above
# (fp32 2.2 vs 4.2). In the engine, where every layer's K/V come from memory (16 sequences of
# 260-490 tokens, 28 layers): 28 ms of a 127 ms bf16 decode step, where gather + SDPA took ~80.
DECODE_KERNEL_SOURCE = r"""
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <cfloat>
#include <numeric>

using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();         // floats in one SIMD register: 16 with AVX-512, 8 with AVX2
constexpr int64_t MAX_D = 256, MAX_BLOCK = 64;

static inline Vec load(const float* p) { return Vec::loadu(p); }
static inline Vec load(const at::BFloat16* p) { Vec v; at::vec::load_to_float(p, v); return v; }

// One sequence, one KV head and its G query heads, over the blocks of one block table.
template <typename T, int G>
static void attend_one(const T* q, const T* k_cache, const T* v_cache, const int64_t* table,
                       int64_t context_len, int64_t n_kv, int64_t bs, int64_t d, int64_t head, T* out) {
  alignas(64) float qs[G][MAX_D], acc[G][MAX_D], p[G][MAX_BLOCK];
  float m[G], l[G];
  const Vec scale(1.0f / std::sqrt(float(d)));
  for (int a = 0; a < G; ++a) {
    for (int64_t i = 0; i < d; i += W) (load(q + a * d + i) * scale).store(qs[a] + i);
    std::fill(acc[a], acc[a] + d, 0.f);
    m[a] = -FLT_MAX;
    l[a] = 0.f;
  }
  for (int64_t j = 0; j * bs < context_len; ++j) {
    const int64_t n = std::min(bs, context_len - j * bs);           // tokens of block j in use
    const T* kb = k_cache + (table[j] * n_kv + head) * bs * d;       // (bs, d): this head's run
    const T* vb = v_cache + (table[j] * n_kv + head) * bs * d;
    // Ask for the next block's runs while this one is computed, a row of each per token, so the
    // reads overlap the arithmetic (the blocks lie anywhere in the pool: no hardware prefetcher
    // guesses the next one). Measured with the pool in memory, not cache: bf16 2.0 -> 1.1 ms a layer.
    const bool ahead = (j + 1) * bs < context_len;
    const char* k_next = ahead ? reinterpret_cast<const char*>(k_cache + (table[j + 1] * n_kv + head) * bs * d) : nullptr;
    const char* v_next = ahead ? reinterpret_cast<const char*>(v_cache + (table[j + 1] * n_kv + head) * bs * d) : nullptr;
    const int64_t row_bytes = d * int64_t(sizeof(T));
    for (int64_t t = 0; t < n; ++t) {                                // p[a][t] = q_a . k_t (scaled)
      for (int64_t off = t * row_bytes; ahead && off < (t + 1) * row_bytes; off += 64) {
        __builtin_prefetch(k_next + off, 0, 2);                      // (read, keep in L2)
        __builtin_prefetch(v_next + off, 0, 2);
      }
      Vec s[G];
      for (int a = 0; a < G; ++a) s[a] = Vec(0.f);
      for (int64_t i = 0; i < d; i += W) {
        const Vec k = load(kb + t * d + i);
        for (int a = 0; a < G; ++a) s[a] = at::vec::fmadd(Vec::loadu(qs[a] + i), k, s[a]);
      }
      for (int a = 0; a < G; ++a)
        p[a][t] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, s[a]);
    }
    for (int a = 0; a < G; ++a) {
      const float m_new = std::max(m[a], *std::max_element(p[a], p[a] + n));
      const float rescale = std::exp(m[a] - m_new);                  // what came before, re-based
      for (int64_t t = 0; t < n; t += W) {
        const int64_t c = std::min(W, n - t);
        (Vec::loadu(p[a] + t, c) - Vec(m_new)).exp_u20().store(p[a] + t, c);
      }
      l[a] = l[a] * rescale + std::accumulate(p[a], p[a] + n, 0.f);
      m[a] = m_new;
      for (int64_t i = 0; i < d; i += W) {                           // acc = acc * rescale + p . v
        Vec o = Vec::loadu(acc[a] + i) * Vec(rescale);
        for (int64_t t = 0; t < n; ++t) o = at::vec::fmadd(Vec(p[a][t]), load(vb + t * d + i), o);
        o.store(acc[a] + i);
      }
    }
  }
  for (int a = 0; a < G; ++a)
    for (int64_t i = 0; i < d; ++i) out[a * d + i] = T(acc[a][i] / l[a]);
}

template <typename T>
static void attend_all(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_tables, const at::Tensor& context_lens, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), d = q.size(2), n_kv = k_cache.size(1), bs = k_cache.size(2);
  const int64_t g = H / n_kv, width = block_tables.size(1);
  const T *qp = q.const_data_ptr<T>(), *kp = k_cache.const_data_ptr<T>(), *vp = v_cache.const_data_ptr<T>();
  const int64_t *tables = block_tables.const_data_ptr<int64_t>(), *lens = context_lens.const_data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  auto one = g == 1 ? attend_one<T, 1> : g == 2 ? attend_one<T, 2> : g == 4 ? attend_one<T, 4> : attend_one<T, 8>;
  // Work items head-major (all sequences of head 0, then head 1, ...): each thread's share of
  // them covers every sequence, long and short alike.
  at::parallel_for(0, n_kv * B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t h = w / B, b = w % B, first = (b * H + h * g) * d;
      one(qp + first, kp, vp, tables + b * width, lens[b], n_kv, bs, d, h, op + first);
    }
  });
}

// q (B, H, d); caches (num_blocks, n_kv, block_size, d); block_tables (B, width) and
// context_lens (B,) int64. Returns (B, H, d). Every index is checked before any is read.
at::Tensor paged_decode(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
                        at::Tensor context_lens) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && block_tables.dim() == 2, "paged_decode: bad ranks");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              block_tables.is_contiguous() && context_lens.is_contiguous(), "paged_decode: tensors must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.sizes() == k_cache.sizes() &&
              (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16), "paged_decode: fp32 or bf16 q/k/v");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong, "paged_decode: int64 tables");
  const int64_t B = q.size(0), H = q.size(1), d = q.size(2), n_kv = k_cache.size(1), bs = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d && d % W == 0 && d <= MAX_D && bs <= MAX_BLOCK && H % n_kv == 0 &&
              (H / n_kv == 1 || H / n_kv == 2 || H / n_kv == 4 || H / n_kv == 8), "paged_decode: unsupported shapes");
  TORCH_CHECK(block_tables.size(0) == B && context_lens.size(0) == B, "paged_decode: one table and length per row");
  const int64_t *tables = block_tables.const_data_ptr<int64_t>(), *lens = context_lens.const_data_ptr<int64_t>();
  const int64_t width = block_tables.size(1), num_blocks = k_cache.size(0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t used = (lens[b] + bs - 1) / bs;
    TORCH_CHECK(lens[b] >= 1 && used <= width, "paged_decode: context_len out of range");
    for (const int64_t* id = tables + b * width; id < tables + b * width + used; ++id)
      TORCH_CHECK(*id >= 0 && *id < num_blocks, "paged_decode: block id out of range");
  }
  at::Tensor out = at::empty_like(q);
  if (q.scalar_type() == at::kFloat) attend_all<float>(q, k_cache, v_cache, block_tables, context_lens, out);
  else attend_all<at::BFloat16>(q, k_cache, v_cache, block_tables, context_lens, out);
  return out;
}
"""

# Where decode rows go to the kernel: a CPU (a GPU replays the padded form in CUDA graphs, below).
DECODE_KERNEL_ON = ("cpu",)


def build_cpu_kernel(name: str, source: str, functions: list[str], what: str):
    """Compile C++ `source` (against ATen) for this CPU and return the Python module exposing
    `functions`, or None where it cannot be built (no C++ compiler or ninja), after one warning
    naming `what` falls back to torch. The first build takes ~25 s, with a notice on stderr; torch
    keeps the library on disk (~/.cache/torch_extensions) for the next process. The library is
    named after the CPU's vector ISA, so a home directory shared by machines of another kind never
    loads code built for instructions they lack. engine.py builds its C++ pieces with it too."""
    from torch.utils import cpp_extension
    isa = torch.backends.cpu.get_cpu_capability()           # "AVX512", "AVX2", "DEFAULT", ...
    name = f"{name}_{isa.lower()}"
    flags = ["-O3", "-march=native", "-fopenmp"]             # OpenMP: torch's own thread pool runs the work
    if isa in ("AVX512", "AVX2"):
        flags.append(f"-DCPU_CAPABILITY_{isa}")               # at::vec's SIMD implementation for it
    try:   # where torch keeps the build (a private helper of torch's: without it, no notice)
        built = os.path.exists(os.path.join(cpp_extension._get_build_directory(name, verbose=False), f"{name}.so"))
    except (AttributeError, OSError, RuntimeError):
        built = True
    if not built:                                            # say why startup pauses, once per machine
        print(f"compiling {what} for this CPU ({isa}; once, ~25 s)", file=sys.stderr)
    try:
        return cpp_extension.load_inline(name, source, functions=functions,
                                         extra_cflags=flags, extra_ldflags=["-fopenmp"])
    except (OSError, RuntimeError) as e:                     # no compiler, no ninja, a failed build
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"{what} could not be built ({first_line}); torch's ops run instead", stacklevel=3)
        return None


@functools.cache
def cpu_decode_kernel():
    """The kernel above, compiled for this CPU (see build_cpu_kernel), or None where it cannot be
    built: then decode rows take the gather + SDPA path, same numbers, slower."""
    return build_cpu_kernel("nano_vllm_paged_decode", DECODE_KERNEL_SOURCE, ["paged_decode"],
                            "04's C++ decode-attention kernel")


def decode_kernel_applies(q, k_cache) -> bool:
    """Whether the kernel takes these decode rows: a CPU, fp32 or bf16, the shapes it was written
    for (head size a multiple of 16 up to 256, blocks up to 64 tokens, 1, 2, 4 or 8 query heads
    per KV head; every Qwen3 qualifies), and a build that succeeded."""
    n_kv, block_size, d = k_cache.shape[1:]
    return (q.device.type in DECODE_KERNEL_ON and q.dtype in (torch.float32, torch.bfloat16)
            and d % 16 == 0 and d <= 256 and block_size <= 64 and q.shape[1] // n_kv in (1, 2, 4, 8)
            and q.shape[1] % n_kv == 0 and cpu_decode_kernel() is not None)


def paged_decode_kernel(q, k_cache, v_cache, block_tables, context_lens):
    """q (B, H, d): one decode row per sequence, attending to its context_lens[b] cached tokens
    through block_tables (B, width) int64, read in place by the kernel. Returns (B, H, d)."""
    return cpu_decode_kernel().paged_decode(q.contiguous(), k_cache, v_cache, block_tables, context_lens)


# ----------------------------------------------------------------------------- prompts on a CPU: a kernel


# Flash attention for prompt chunks in bf16, where the CPU multiplies bf16 pairs itself
# (AVX512-BF16: AMD Zen 4, Intel Cooper Lake and later). torch's causal flash kernel computes the
# same thing at ~77 GFLOP/s on a 2-core AMD EPYC (27% of a 512-token bf16 prefill); this one does
# it at ~220. The idea is the decode kernel's (scores, online softmax, p.v, one tile of keys at a
# time), now for a tile of queries as well, so every key and value loaded serves many rows:
#
#   for each KV head and each block of 32 query positions (x its g query heads, 64 rows for Qwen3-0.6B):
#     for each block of 64 keys up to the block's last position:
#       S = Q K^T        (rows, 64) fp32, `vdpbf16ps`: 16 keys' scores per instruction
#       online softmax   running max m and sum l per row; keys after a row's position masked
#       O = O * rescale + P V      P rounded to bf16 (as torch's flash kernel does), O in fp32
#     out = O / l
#
# `vdpbf16ps` multiplies bf16 PAIRS and adds both products into one fp32 lane, so the operands
# are repacked once per call so that pairs lie side by side: K as (keys/16, d/2, 16 keys x a pair
# of dims) and V as (keys/2, d, a pair of keys). Scores stay fp32 until the softmax (a bmm in bf16
# would round them to bf16 first). Row i of q sits at position n - m + i, so a chunk after a cached
# prefix (m < n) is the same loop.
PREFILL_KERNEL_SOURCE = r"""
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>
#include <omp.h>
#include <cstring>
#include <limits>
#include <vector>

#if !defined(__AVX512BF16__)
#error "this kernel needs AVX512-BF16 (vdpbf16ps)"
#endif

using Vec = at::vec::Vectorized<float>;
constexpr int64_t KEYS = 64;      // keys per tile: 4 registers of 16 scores
constexpr int64_t QPOS = 32;      // query positions per work item (fewer for a shorter chunk)
constexpr int ROWS = 4;           // query rows per register tile: 4 x 4 fp32 sums in registers
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// K of one KV head, n keys padded with zeros to n_pad: for each 16 keys, d/2 registers, lane j of
// register p holding (k[j][2p], k[j][2p+1]) as one 32-bit word.
static void pack_keys(const at::BFloat16* k, int64_t stride, int64_t n, int64_t n_pad, int64_t d, uint32_t* out) {
  for (int64_t j = 0; j < n_pad; ++j) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(k + j * stride);
    uint32_t* to = out + j / 16 * (d / 2) * 16 + j % 16;
    for (int64_t p = 0; p < d / 2; ++p) to[p * 16] = j < n ? row[p] : 0u;
  }
}

// V of one KV head: for each pair of keys t, d words (v[2t][c], v[2t+1][c]); two rows interleaved
// 16 bf16 at a time.
static void pack_values(const at::BFloat16* v, int64_t stride, int64_t n, int64_t n_pad, int64_t d, at::BFloat16* out) {
  alignas(64) static const uint16_t low[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t high[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(low), hi = _mm512_load_si512(high), zero = _mm512_setzero_si512();
  for (int64_t t = 0; t < n_pad / 2; ++t)
    for (int64_t c = 0; c < d; c += 32) {
      const __m512i a = 2 * t < n ? _mm512_loadu_si512(v + 2 * t * stride + c) : zero;
      const __m512i b = 2 * t + 1 < n ? _mm512_loadu_si512(v + (2 * t + 1) * stride + c) : zero;
      _mm512_storeu_si512(out + (t * d + c) * 2, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(out + (t * d + c + 16) * 2, _mm512_permutex2var_epi16(a, hi, b));
    }
}

// S[r][0:64] = q_r . k_j for ROWS rows and one tile of keys: per pair of dims, 4 loads of keys, one
// broadcast of each row's pair, 16 vdpbf16ps.
static inline void score_tile(const uint32_t* q, const uint32_t* keys, int64_t d, float* S) {
  __m512 acc[ROWS][4];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < d / 2; ++p) {
    __m512i k[4];
    for (int c = 0; c < 4; ++c) k[c] = _mm512_loadu_si512(keys + (c * d / 2 + p) * 16);
    for (int r = 0; r < ROWS; ++r) {
      const __m512i qp = _mm512_set1_epi32(q[r * d / 2 + p]);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)qp, (__m512bh)k[c]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(S + r * KEYS + c * 16, acc[r][c]);
}

// O[r][dims] += sum over the first `pairs` key pairs t of (p[r][2t] v[2t] + p[r][2t+1] v[2t+1]),
// 64 dims at a time (4 registers per row).
static inline void add_values_tile(const at::BFloat16* P, const at::BFloat16* values, int64_t pairs, int64_t d, float* O) {
  for (int64_t dc = 0; dc < d; dc += 64) {
    __m512 acc[ROWS][4];
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_loadu_ps(O + r * d + dc + c * 16);
    for (int64_t t = 0; t < pairs; ++t) {
      __m512i v[4];
      for (int c = 0; c < 4; ++c) v[c] = _mm512_loadu_si512(values + (t * d + dc + c * 16) * 2);
      for (int r = 0; r < ROWS; ++r) {
        const __m512i pp = _mm512_set1_epi32(reinterpret_cast<const uint32_t*>(P + r * KEYS)[t]);
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)pp, (__m512bh)v[c]);
      }
    }
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(O + r * d + dc + c * 16, acc[r][c]);
  }
}

// The online softmax of one row over one tile of scores: the first `valid` count, the rest are
// masked. Writes p = exp(s - m_new) as bf16, rescales the row's O and l to the new max.
static inline void softmax_row(float* s, int64_t valid, float scale, float& m, float& l, float* O, int64_t d,
                               at::BFloat16* p) {
  if (valid <= 0) {                                     // every key of the tile is after this row
    std::memset(p, 0, KEYS * sizeof(at::BFloat16));
    return;
  }
  Vec top(NEG_INF);
  for (int64_t j = 0; j < KEYS; j += 16) {
    Vec x = Vec::loadu(s + j) * Vec(scale);
    if (j + 16 > valid) {                               // lanes past `valid` get -inf, exp(-inf) = 0
      const __mmask16 keep = valid > j ? __mmask16((1u << std::min<int64_t>(16, valid - j)) - 1) : 0;
      x = _mm512_mask_blend_ps(keep, _mm512_set1_ps(NEG_INF), x);
    }
    x.store(s + j);
    top = at::vec::maximum(top, x);
  }
  const float m_new = std::max(m, at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, top));
  const float rescale = std::exp(m - m_new);            // 0 for the first tile (m = -inf)
  Vec sum(0.f);
  for (int64_t j = 0; j < KEYS; j += 16) {
    const Vec e = (Vec::loadu(s + j) - Vec(m_new)).exp_u20();
    sum = sum + e;
    e.store(s + j);
  }
  at::vec::convert(s, p, KEYS);
  l = l * rescale + at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sum);
  if (rescale != 1.f)
    for (int64_t c = 0; c < d; c += 16) (Vec::loadu(O + c) * Vec(rescale)).store(O + c);
  m = m_new;
}

// q (m, H, d), k and v (n, n_kv, d), bf16, each row's d values contiguous; n >= m, query row i at
// position n - m + i sees keys 0 .. n - m + i. Returns (m, H, d).
at::Tensor causal_attention(at::Tensor q, at::Tensor k, at::Tensor v) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes() && q.scalar_type() == at::kBFloat16 &&
              k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 && q.is_cpu() && k.is_cpu() &&
              v.is_cpu(), "causal_attention: bf16 q (m, H, d), k/v (n, n_kv, d) on the CPU");
  const int64_t m = q.size(0), H = q.size(1), d = q.size(2), n = k.size(0), n_kv = k.size(1);
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1 && k.size(2) == d && d % 64 == 0 &&
              H % n_kv == 0 && 1 <= m && m <= n, "causal_attention: unsupported shapes or strides");
  // A work item's positions: QPOS, or a short chunk's m rounded up to whole register tiles.
  const int64_t span = std::min(QPOS, (m + ROWS - 1) / ROWS * ROWS);
  const int64_t g = H / n_kv, n_pad = (n + KEYS - 1) / KEYS * KEYS, first = n - m, rows = g * span;
  const float scale = 1.f / std::sqrt(float(d));
  at::Tensor out = at::empty({m, H, d}, q.options());
  std::vector<uint32_t> kp(n_kv * n_pad * d / 2);
  std::vector<at::BFloat16> vp(n_kv * n_pad * d);
  const at::BFloat16 *qd = q.const_data_ptr<at::BFloat16>(), *kd = k.const_data_ptr<at::BFloat16>(),
                     *vd = v.const_data_ptr<at::BFloat16>();
  at::BFloat16* od = out.data_ptr<at::BFloat16>();
  const int64_t blocks = (m + span - 1) / span, items = n_kv * blocks;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static, 1)
    for (int64_t h = 0; h < n_kv; ++h) {
      pack_keys(kd + h * k.stride(1), k.stride(0), n, n_pad, d, kp.data() + h * n_pad * d / 2);
      pack_values(vd + h * v.stride(1), v.stride(0), n, n_pad, d, vp.data() + h * n_pad * d);
    }
    std::vector<uint32_t> Q(rows * d / 2);             // this item's rows: head by head, position by position
    std::vector<float> S(rows * KEYS), O(rows * d), row_max(rows), row_sum(rows);
    std::vector<at::BFloat16> P(rows * KEYS);
    std::vector<int64_t> pos(rows);
    // Causal work grows with the position: the last blocks first, handed out one at a time.
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t h = item % n_kv, i0 = (blocks - 1 - item / n_kv) * span, count = std::min(span, m - i0);
      for (int64_t a = 0; a < g; ++a)
        for (int64_t i = 0; i < span; ++i) {              // past `count`: the last row again, never written out
          const int64_t r = a * span + i, row = i0 + std::min(i, count - 1);
          pos[r] = first + row;
          std::memcpy(Q.data() + r * d / 2, qd + row * q.stride(0) + (h * g + a) * q.stride(1), d * sizeof(at::BFloat16));
        }
      std::fill(O.begin(), O.end(), 0.f);
      std::fill(row_max.begin(), row_max.end(), NEG_INF);
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      const uint32_t* K = kp.data() + h * n_pad * d / 2;
      const at::BFloat16* V = vp.data() + h * n_pad * d;
      for (int64_t k0 = 0; k0 <= first + i0 + count - 1; k0 += KEYS) {
        // A tile's rows are consecutive positions of one head: its last row sees the most.
        for (int64_t r = 0; r < rows; r += ROWS)
          if (k0 <= pos[r + ROWS - 1]) score_tile(Q.data() + r * d / 2, K + k0 * d / 2, d, S.data() + r * KEYS);
        for (int64_t r = 0; r < rows; ++r)
          softmax_row(S.data() + r * KEYS, std::min(KEYS, pos[r] - k0 + 1), scale, row_max[r], row_sum[r],
                      O.data() + r * d, d, P.data() + r * KEYS);
        for (int64_t r = 0; r < rows; r += ROWS) {
          const int64_t seen = std::min(KEYS, pos[r + ROWS - 1] - k0 + 1);
          if (seen > 0) add_values_tile(P.data() + r * KEYS, V + k0 * d, (seen + 1) / 2, d, O.data() + r * d);
        }
      }
      for (int64_t a = 0; a < g; ++a)
        for (int64_t i = 0; i < count; ++i) {             // out = O / l
          float* o = O.data() + (a * span + i) * d;
          for (int64_t c = 0; c < d; c += 16) (Vec::loadu(o + c) / Vec(row_sum[a * span + i])).store(o + c);
          at::vec::convert(o, od + ((i0 + i) * H + h * g + a) * d, d);
        }
    }
  }
  return out;
}
"""


@functools.cache
def cpu_prefill_kernel():
    """The kernel above, compiled for this CPU, or None: a CPU without bf16 dot products (its
    prompts take SDPA, which the kernel is checked against), or no compiler."""
    if not qwen3.cpu_has_bf16():
        return None
    return build_cpu_kernel("nano_vllm_prefill_attention", PREFILL_KERNEL_SOURCE, ["causal_attention"],
                            "04's C++ prompt-attention kernel")


# From how many rows of a chunk the kernel beats SDPA: it repacks the chunk's keys and values on
# every call, which a short chunk does not earn back. Measured on a 2-core AMD EPYC, one layer of
# Qwen3-0.6B's heads, chunk/context: 8/8 0.09 vs SDPA's 0.07 ms, 8/300 0.49 vs 0.35, 16/300 0.59
# both, 32/300 0.76 vs 0.97, 64/64 0.27 vs 0.47, 512/512 4.3 vs 14.
PREFILL_KERNEL_MIN_ROWS = 32


def prefill_kernel_applies(q) -> bool:
    """Whether the kernel takes a prompt chunk's rows q (m, H, d): at least PREFILL_KERNEL_MIN_ROWS
    of them, bf16 on a CPU with bf16 dot products, head size a multiple of 64 (every Qwen3: 128),
    and a build that succeeded."""
    return (q.shape[0] >= PREFILL_KERNEL_MIN_ROWS and q.device.type == "cpu" and q.dtype == torch.bfloat16
            and q.shape[-1] % 64 == 0 and cpu_prefill_kernel() is not None)


# ----------------------------------------------------------------------------- decode, static shapes


def _padded_metadata(block_tables, context_lens, block_size: int, n_kv: int):
    """Decode work whose shapes depend only on the tables' shapes (what CUDA graphs replay): every
    sequence gathers its table's full width, width x block_size slots, and a mask keeps the first
    context_len of them. Entries past a sequence's last block (padding, e.g. -1) read its first
    block instead, so every index is a real block; the mask hides them."""
    B, width = block_tables.shape
    device = block_tables.device
    in_use = torch.arange(width, device=device) < -(-context_lens.long() // block_size)[:, None]   # (B, width)
    blocks = torch.where(in_use, block_tables.long(), block_tables[:, :1].long())                 # (B, width)
    index = (blocks[:, None, :] * n_kv + torch.arange(n_kv, device=device)[None, :, None]).reshape(-1)
    valid = torch.arange(width * block_size, device=device) < context_lens[:, None]               # (B, L)
    return SimpleNamespace(index=index, valid=valid[:, None, :, None])                            # (B, 1, L, 1)


def _decode_padded(q, k_cache, v_cache, meta):
    B, H, d = q.shape
    n_kv, bs = k_cache.shape[1], k_cache.shape[2]
    L = meta.valid.shape[2]
    # One gather per cache, head by head (index: rows of the (blocks * n_kv, bs * d) view).
    k = k_cache.view(-1, bs * d).index_select(0, meta.index).view(B, n_kv, L, d)        # (B, n_kv, L, d)
    v = v_cache.view(-1, bs * d).index_select(0, meta.index).view(B, n_kv, L, d)
    # Masked slots may hold anything, NaN included (a weight of 0 times NaN is NaN): zero them.
    k, v = torch.where(meta.valid, k, 0), torch.where(meta.valid, v, 0)
    # GQA as a shape: the g query heads of a KV head are g queries of one (n_kv-headed) attention.
    out = F.scaled_dot_product_attention(q.view(B, n_kv, H // n_kv, d), k, v,
                                         attn_mask=meta.valid.transpose(-1, -2))        # (B, n_kv, g, d)
    return out.reshape(B, H, d)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, static_shapes: bool = False,
                           kernel: bool = True):
    """One new token per sequence: q (B, H, d) (its k/v already stored) attends to its
    context_lens[b] cached tokens through block_tables (B, max_blocks). Returns (B, H, d).

    Three ways, same numbers (up to rounding):

    On a CPU, the kernel (`paged_decode_kernel`): every row in one call that reads each block in
    place, where the build succeeded and the shapes fit (`decode_kernel_applies`; kernel=False
    takes the next way instead).

    Per sequence (eager, elsewhere): a sequence's blocks are gathered head by head into
    (n_kv, tokens, d) (on a GPU every sequence's in one copy), then each sequence is one fused
    SDPA call over exactly its context_len keys (a view, no mask, GQA without repeating K/V).
    How many blocks each sequence uses decides the shapes: fine for eager code. Measured on a
    2-core CPU, bf16, Qwen3-0.6B's heads: 0.26 ms a layer for one 430-token sequence and ~4 ms for
    16 sequences of 230-610 tokens, where a blockwise online softmax over just the blocks in use
    (flash-decoding written as ~30 tensor ops) took 0.8 and ~5.5 ms.

    Padded (static_shapes=True, what CUDA graphs replay): shapes may depend only on the tables'
    shapes, never on their values. So every sequence gathers its table's full width (B, n_kv,
    width x block_size, d), and one batched SDPA attends with a mask that keeps each sequence's
    first context_len keys. The work grows with the width, not the context: the engine rounds the
    width up to a power of two per step (its CUDA graphs are per width bucket, engine.py), so at
    most ~2x is wasted. On a GPU this is 5 kernels a layer where a sequence-by-sequence loop is
    B x more launches.

    Neither form writes out the (query, key) score matrix: a fused SDPA kernel reads the keys tile
    by tile and keeps a running max m, sum l and output o, rescaling what it has whenever a tile
    brings a larger score (m_new = max(m, m_tile); l = l exp(m - m_new) + sum exp(s - m_new); o
    likewise; output o / l at the end): the online softmax of FlashAttention. Scores in the
    thousands stay finite.
    """
    n_kv, block_size = k_cache.shape[1], k_cache.shape[2]
    if static_shapes:
        return _decode_padded(q, k_cache, v_cache, _padded_metadata(block_tables, context_lens, block_size, n_kv))
    plan = _step_plan(block_tables, context_lens, torch.ones_like(context_lens), block_size, n_kv, step_kv=False)
    return _attend_per_sequence(q, None, None, k_cache, v_cache, plan, kernel)


def decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens):
    """The check for paged_decode_attention: per sequence, gather exactly its context_len keys
    through its block table, repeat K/V for the query groups, plain softmax. Slow and obvious."""
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


# ----------------------------------------------------------------------------- the model's seam


class PagedContext:
    """What the engine hands the model for one step (02_model's `attend` calls `context.attend`).

    kv_cache: one tensor (layers, 2, num_blocks, n_kv, block_size, d) from `allocate_kv_cache`.
    slot_mapping (N,): where each new token's k/v goes. Then either
      prefill (cu_seqlens_q given): cu_seqlens_q (B+1,), context_lens (B,), block_tables (B, max_blocks)
      decode  (cu_seqlens_q None):  block_tables (B, max_blocks), context_lens (B,), one token each.
    Index tensors are int64 on the cache's device. The gather indices, the masks and the cache rows
    the new k/v go to do not depend on the layer, so the first layer's `attend` builds them and
    every later layer reuses them (`_step_plan`, `slot_rows`); a step that never runs this model's
    attention (a CUDA graph replays its own) builds nothing. static_shapes (decode only): the padded form, whose shapes depend on the
    tensors' shapes only, never on their values (what a CUDA graph replays).
    """

    def __init__(self, kv_cache, slot_mapping, block_tables, context_lens, cu_seqlens_q=None,
                 static_shapes: bool = False):
        self.kv_cache = kv_cache
        self.slot_mapping = slot_mapping.long()  # index_copy_ wants int64 (no copy when it already is)
        self.block_tables, self.context_lens = block_tables, context_lens
        self.cu_seqlens_q = cu_seqlens_q
        self.is_prefill = cu_seqlens_q is not None
        self.static_shapes = static_shapes and not self.is_prefill
        self.metadata = None                     # the step plan, or the padded form's metadata
        self.rows = None                         # slot_rows of slot_mapping: where every layer writes

    def _metadata(self):
        if self.metadata is None:
            block_size, n_kv = self.kv_cache.shape[4], self.kv_cache.shape[3]
            if self.static_shapes:
                self.metadata = _padded_metadata(self.block_tables, self.context_lens, block_size, n_kv)
            else:
                cu = self.cu_seqlens_q
                q_lens = cu[1:] - cu[:-1] if self.is_prefill else torch.ones_like(self.context_lens)
                self.metadata = _step_plan(self.block_tables, self.context_lens, q_lens, block_size, n_kv, step_kv=True)
        return self.metadata

    @classmethod
    def from_spans(cls, kv_cache, block_manager: BlockManager, spans, decode: bool | None = None):
        """Build a step from (seq_id, start, end) spans: each sequence computes positions
        [start, end) and attends to positions [0, end). Slots must be reserved already. decode:
        default True when every span is one token. (positions for the model: cat(arange(start, end)).)"""
        device = kv_cache.device
        if decode is None:
            decode = all(end - start == 1 for _, start, end in spans)
        slots = [s for sid, start, end in spans for s in block_manager.slot_mapping(sid, start, end)]
        tables = [block_manager.block_tables[sid][:-(-end // block_manager.block_size)] for sid, _, end in spans]
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int64, device=device)
        context_lens = torch.tensor([end for _, _, end in spans], dtype=torch.int64, device=device)
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
        cu = None
        if not decode:
            cu = torch.tensor([0] + [end - start for _, start, end in spans], device=device).cumsum(0)
        return cls(kv_cache, slot_mapping, block_tables, context_lens, cu)

    def attend(self, layer_idx: int, q, k, v):
        """q (N, H, d), k/v (N, n_kv, d) of the step's new tokens -> (N, H, d)."""
        k_cache, v_cache = self.kv_cache[layer_idx, 0], self.kv_cache[layer_idx, 1]
        if self.rows is None:
            self.rows = slot_rows(self.slot_mapping, k_cache.shape[1], k_cache.shape[2])
        store_kvcache(k, v, k_cache, v_cache, self.slot_mapping, self.rows)
        if self.static_shapes:
            return _decode_padded(q, k_cache, v_cache, self._metadata())
        return _attend_per_sequence(q, k, v, k_cache, v_cache, self._metadata())


# ----------------------------------------------------------------------------- demo


WORDS = ["<s>", "the", "cat", "sat", "on", "mat", "and", "then", "slept", "purred", "a", "dog", "ran",
         "far", "away", "home", "loudly", "all", "day", "long"]


def show_decode_speed(console, batch: int = 16, context_len: int = 340, dtype=torch.bfloat16) -> None:
    """Time one layer's decode attention both ways at Qwen3-0.6B's heads, here, on this machine."""
    import time
    H, n_kv, d, bs = 16, 8, 128, 16
    blocks = -(-context_len // bs)
    k_cache = torch.randn(batch * blocks, n_kv, bs, d, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(batch * blocks).view(batch, blocks)     # scattered over the pool
    lens, q = torch.full((batch,), context_len), torch.randn(batch, H, d, dtype=dtype)
    plan = _step_plan(tables, lens, torch.ones_like(lens), bs, n_kv, step_kv=False)   # once a step, not a layer

    def best_ms(kernel: bool) -> float:
        times = []
        for _ in range(6):                  # the first run pays for first touches: the best counts
            t = time.perf_counter()
            _attend_per_sequence(q, None, None, k_cache, v_cache, plan, kernel)
            times.append(time.perf_counter() - t)
        return 1e3 * min(times)
    kernel_ms, sdpa_ms = best_ms(True), best_ms(False)
    kv_mb = 2 * k_cache.numel() * k_cache.element_size() / 1e6
    console.print(f"\none layer of decode, Qwen3-0.6B's heads, {batch} sequences x {context_len} tokens, "
                  f"{str(dtype).removeprefix('torch.')}\n({kv_mb:.0f} MB of k/v), timed here: the kernel "
                  f"{kernel_ms:.2f} ms ({kv_mb / kernel_ms:.0f} GB/s), gather + SDPA {sdpa_ms:.2f} ms")


def show_prefill_speed(console, prompt_len: int = 512) -> None:
    """Time one layer's attention over a bf16 prompt both ways at Qwen3-0.6B's heads, and how far
    each is from the exact answer (float64)."""
    import time
    H, n_kv, d = 16, 8, 128
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(prompt_len, h, d, generator=g).bfloat16() for h in (H, n_kv, n_kv))
    heads = lambda x: x.transpose(0, 1)[None]             # noqa: E731   (n, h, d) -> (1, h, n, d)
    ways = {"the kernel": lambda: cpu_prefill_kernel().causal_attention(q, k, v),
            "SDPA (flash)": lambda: F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True,
                                                                   enable_gqa=True)[0].transpose(0, 1)}
    exact = F.scaled_dot_product_attention(heads(q.double()), heads(k.double()).repeat_interleave(H // n_kv, 1),
                                           heads(v.double()).repeat_interleave(H // n_kv, 1), is_causal=True)[0]
    flops = 2 * 2 * H * d * prompt_len * (prompt_len + 1) / 2           # q.k and p.v over the causal half
    console.print(f"\none layer of a {prompt_len}-token bf16 prompt, Qwen3-0.6B's heads, timed here:")
    for name, run in ways.items():
        times = []
        for _ in range(5):
            t = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t)
        err = (out.double() - exact.transpose(0, 1)).abs().max().item()
        console.print(f"  {name:14s} {1e3 * min(times):6.2f} ms ({flops / min(times) / 1e9:4.0f} GFLOP/s), "
                      f"max abs diff from float64 {err:.1e}")


def main() -> None:
    from rich.console import Console
    from rich.table import Table
    console = Console()
    ids = lambda text: [WORDS.index(w) for w in text.split()]  # noqa: E731
    show = lambda tokens: " ".join(WORDS[t] for t in tokens)  # noqa: E731
    bm = BlockManager(num_blocks=10, block_size=4)
    tokens: dict[int, list[int]] = {}
    names = {0: "A", 1: "B", 2: "C", 3: "D"}
    colors = {0: "cyan", 1: "magenta", 2: "green", 3: "yellow"}

    def draw(title: str, sequences: bool = True) -> None:
        owners: dict[int, list[int]] = {b: [] for b in range(bm.num_blocks)}
        for sid, table in bm.block_tables.items():
            for b in table:
                owners[b].append(sid)
        if sequences:
            seqs = Table(title=f"{title}: block tables", title_justify="left")
            for col in ("seq", "tokens", "block table"):
                seqs.add_column(col)
            for sid, table in bm.block_tables.items():
                seqs.add_row(f"[{colors[sid]}]{names[sid]}[/]", show(tokens[sid]), str(table))
            console.print(seqs)
        pool = Table(title=f"{title}: the block pool", title_justify="left")
        for col in ("block", "slots", "state", "ref", "cached", "holds"):
            pool.add_column(col)
        for b in range(bm.num_blocks):
            if bm.ref_count(b):
                sid = owners[b][0]
                i = bm.block_tables[sid].index(b)
                state = "used by " + ", ".join(f"[{colors[s]}]{names[s]}[/]" for s in owners[b])
                holds = show(tokens[sid][i * bm.block_size:(i + 1) * bm.block_size])
            elif bm.is_cached(b):
                state, holds = "[yellow]evictable[/]", f"[dim]{show(bm.cached_tokens(b))}[/]"
            else:
                state, holds = "[dim]free[/]", ""
            pool.add_row(str(b), f"{b * bm.block_size}..{b * bm.block_size + bm.block_size - 1}", state,
                         str(bm.ref_count(b)), "yes" if bm.is_cached(b) else "", holds)
        console.print(pool)
        console.print(f"pool: {bm.num_free_blocks - bm.num_evictable_blocks} free / {bm.num_evictable_blocks} "
                      f"evictable / {bm.num_used_blocks} used; prefix cache: {bm.prefix_lookups} lookups, "
                      f"{bm.prefix_hit_blocks} hits = {bm.prefix_hit_tokens} tokens\n")

    def admit(sid: int, text: str) -> None:
        tokens[sid] = ids(text)
        hit = bm.allocate(sid, tokens[sid])
        bm.commit(sid, tokens[sid])  # pretend the prefill ran: its full blocks are now cached
        console.print(f"allocate {names[sid]} ({len(tokens[sid])} tokens): {hit} from the prefix cache")

    console.print("[bold]Paged KV cache[/]: one pool of 10 blocks x 4 token slots, shared by all sequences\n")
    admit(0, "<s> the cat sat on the mat and then slept all day")
    admit(1, "<s> the cat sat on the mat and purred loudly")
    admit(2, "<s> a dog ran far away")
    draw("A, B, C (B shares A's first 2 blocks)")

    sid, start, end = 1, 4, 10
    console.print(f"slot_mapping of B, positions {start}..{end - 1}, block table {bm.block_tables[sid]}: "
                  f"slot = table\\[pos // 4] * 4 + pos % 4")
    mapping = zip(range(start, end), bm.slot_mapping(sid, start, end))
    console.print("  " + "  ".join(f"{p}->{s}" for p, s in mapping) + "\n")

    bm.free(0)
    console.print("free A: the shared blocks lose a reference; A's own block keeps its k/v and hash but "
                  "nobody uses it: evictable (a partly filled block would go straight to the free list)")
    draw("A freed", sequences=False)
    admit(3, "<s> the cat sat on the mat and then slept all day long")
    draw("D = A's prompt + 1 word: 3 hits, A's evictable block revived")

    # Attention through these block tables == dense attention, on random k/v in this layout.
    torch.manual_seed(0)
    H, n_kv, d = 4, 2, 16
    k_cache = torch.full((bm.num_blocks, n_kv, bm.block_size, d), float("nan"))  # unwritten = NaN
    v_cache = torch.full_like(k_cache, float("nan"))
    first = torch.tensor(bm.slot_mapping(3, 0, 12))  # A computed these blocks before it left
    store_kvcache(torch.randn(12, n_kv, d), torch.randn(12, n_kv, d), k_cache, v_cache, first)
    dense_k, dense_v, q_parts, spans = {}, {}, [], []
    for sid, cached in ((1, 8), (2, 0), (3, 12)):
        n = len(tokens[sid])
        slots = torch.tensor(bm.slot_mapping(sid, 0, n))
        store_kvcache(torch.randn(n - cached, n_kv, d), torch.randn(n - cached, n_kv, d), k_cache, v_cache,
                      slots[cached:])
        dense_k[sid], dense_v[sid] = read_slots(k_cache, slots), read_slots(v_cache, slots)
        q_parts.append(torch.randn(n - cached, H, d))
        spans.append((sid, cached, n))
    cu = torch.tensor([0] + [e - s for _, s, e in spans]).cumsum(0)
    ctx = torch.tensor([e for _, _, e in spans])
    width = max(len(bm.block_tables[s]) for s, _, _ in spans)
    tables = torch.tensor([bm.block_tables[s] + [-1] * (width - len(bm.block_tables[s])) for s, _, _ in spans])
    out = paged_prefill_attention(torch.cat(q_parts), k_cache, v_cache, cu, ctx, tables)
    diffs = []
    for i, (sid, start, end) in enumerate(spans):
        q_full = torch.cat([torch.zeros(start, H, d), q_parts[i]])  # rows before start only fill the shape
        ref = F.scaled_dot_product_attention(q_full.transpose(0, 1), dense_k[sid].transpose(0, 1),
                                             dense_v[sid].transpose(0, 1), is_causal=True, enable_gqa=True)
        diffs.append((out[cu[i]:cu[i + 1]] - ref.transpose(0, 1)[start:]).abs().max())
    err = torch.stack(diffs).max().item()
    q_dec = torch.randn(len(spans), H, d)
    dec_ref = decode_attention_reference(q_dec, k_cache, v_cache, tables, ctx)
    decodes = {"one SDPA per sequence": dict(kernel=False), "whole tables + a mask (CUDA graphs)": dict(static_shapes=True)}
    has_kernel = decode_kernel_applies(q_dec, k_cache)     # builds it the first time (~25 s)
    if has_kernel:
        decodes = {"the kernel, blocks read in place": {}, **decodes}
    dec_errs = {name: (paged_decode_attention(q_dec, k_cache, v_cache, tables, ctx, **how) - dec_ref).abs().max().item()
                for name, how in decodes.items()}
    console.print("[bold]paged attention == dense attention[/], random q/k/v in the layout above")
    console.print("(every slot no sequence wrote holds NaN, so reading one would show):")
    console.print(f"  prefill, B+C+D packed, B and D after their cached prefix: max abs diff {err:.1e}")
    console.print("  decode, against gather + plain softmax:")
    for name, e in dec_errs.items():
        console.print(f"    {name:44s} max abs diff {e:.1e}")
    if has_kernel:
        show_decode_speed(console)
    if cpu_prefill_kernel() is not None:                  # a CPU with bf16 dot products (built the first time)
        show_prefill_speed(console)

    real = qwen3.PRESETS["demo"]
    per_block = real.kv_bytes_per_token(torch.bfloat16) * 16
    console.print(f"\nQwen3-0.6B in bf16: a 16-token block holds {per_block / 2**20:.2f} MiB of k/v over "
                  f"{real.num_hidden_layers} layers; 1 GiB of cache is {2**30 // per_block} blocks "
                  f"= {2**30 // per_block * 16:,} tokens, shared by all requests.")
    if not (err < 1e-5 and max(dec_errs.values()) < 1e-5):  # NaN fails too
        raise SystemExit("paged attention does not match dense attention")


if __name__ == "__main__":
    sys.exit(main())
