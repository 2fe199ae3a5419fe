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
chunk or one decoding token alike - is one fused SDPA over exactly its tokens (`step_plan`). A
prompt's first chunk needs no gather at all: its keys are the step's own. Real engines never
make that copy: vLLM's paged-attention kernels and FlashAttention / FlashInfer (which take a
block table) read each block in place, inside one fused kernel. Here the per-sequence work goes
through an `AttentionBackend`, the seam where the engine plugs in such kernels (nano_kernels/attention.py:
C++ that reads each block in place for decode rows, and flash attention for bf16 prompts); this
file's torch path stays their reference. Where shapes must not depend on the data (CUDA graphs),
each decoding sequence gathers its whole block table, padded, and a mask hides the slots past its
end (see `paged_decode_attention`).

    python 04_paged_attention.py     # block tables drawn, prefix cache hits, paged == dense attention
"""
from __future__ import annotations

import contextlib
import importlib
import math
import sys
from collections import OrderedDict, deque
from dataclasses import dataclass

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
    """The step's decode rows (one query reading the cache) as one batch, for a backend that
    attends to all of them in one call (AttentionBackend.batches_decode_rows)."""
    every_row: bool                # the step is decode rows only: the batch is the whole answer
    q_rows: torch.Tensor           # (D,) their rows of the step's q
    block_tables: torch.Tensor     # (D, width) int64
    context_lens: torch.Tensor     # (D,) int64


@dataclass
class StepPlan:
    """Everything about a step's attention that does not depend on the layer (vLLM's attention
    metadata): `index` are the rows of the (blocks * n_kv, block_size * d) view of a cache to
    gather, sequence after sequence, head by head."""
    index: torch.Tensor
    seqs: list[SequencePlan]
    decode: DecodeRows | None


def step_plan(block_tables, context_lens, q_lens, block_size: int, n_kv: int, step_kv: bool,
              batch_decode_rows: bool = False) -> StepPlan:
    """The plan of a step. Sequence b's q_len new tokens are the LAST q_len of its context_len
    positions (a cached prefix or earlier chunks come before them).

    step_kv: the step's own k/v will be at hand (PagedContext.attend). Then a chunk with nothing
    cached before it (context_len == q_len, a new prompt's first chunk) reads its keys from them:
    no gather. Every other sequence's blocks in use are gathered, head by head, giving its
    (n_kv, tokens, d). Each sequence then attends to exactly context_len tokens (so the unwritten
    tail of a last block, or a padding table entry, is never read) with a causal mask aligned to
    the bottom right: query row i sits at position context_len - q_len + i and sees the keys up to
    there. batch_decode_rows: also collect the decode rows as one batch (`DecodeRows`)."""
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
    """How attention is computed once a sequence's keys are found: torch's fused SDPA, one call per
    sequence. This is the seam for faster paths: a subclass may take every decode row of a step in
    one call (`batches_decode_rows`, `decode_rows`) or compute a sequence its own way (`sequence`);
    the engine plugs in nano_kernels/attention.py's C++ kernels this way. This class is their reference."""

    batches_decode_rows = False

    def decode_rows(self, q, k_cache, v_cache, block_tables, context_lens):
        """q (B, H, d), one row per sequence, reading context_lens[b] cached tokens through
        block_tables (B, width) -> (B, H, d). Only called when batches_decode_rows is True."""
        raise NotImplementedError

    def sequence(self, q, keys, values, seq: SequencePlan):
        """One sequence: q (m, H, d) against keys/values (1, n_kv, context_len, d) -> (m, H, d)."""
        m, H, d = q.shape
        n_kv = keys.shape[1]
        if m == 1:
            # A decode row: GQA as a shape, the g query heads of a KV head are g queries of one
            # n_kv-headed attention (as in _decode_padded); SDPA's CPU kernel splits its work by
            # query rows, and this gives it n_kv x g rows instead of 16 heads of one.
            out = F.scaled_dot_product_attention(q[0].view(1, n_kv, H // n_kv, d), keys, values)
            return out.reshape(1, H, d)                                           # (1, H, d)
        # 4-D inputs take SDPA's fused CPU kernel (3-D ones fall back to plain math); GQA without
        # repeating K/V; is_causal lets the kernel skip the upper triangle.
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, attn_mask=seq.mask,
                                             is_causal=seq.causal, enable_gqa=True)   # (1, H, q_len, d)
        return out[0].transpose(0, 1)                                             # (q_len, H, d)


TORCH_SDPA = AttentionBackend()

# SDPA on NVIDIA GPUs prefers cuDNN's attention for bf16, which builds a plan for every new
# sequence length, and a server sees new lengths at almost every step: leave cuDNN out.
NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# A GPU gathers the whole step's blocks at once (one launch, not one per sequence); a CPU gathers
# each sequence right before its SDPA, which then reads them from cache.
GATHER_WHOLE_STEP_ON = ("cuda",)


def attend_per_sequence(q, k, v, k_cache, v_cache, plan: StepPlan, backend: AttentionBackend = TORCH_SDPA):
    """q (N, H, d) and the step's own k/v (N, n_kv, d; None: every sequence reads the cache) ->
    (N, H, d): each sequence's blocks gathered, then the backend attends sequence by sequence
    (and to the decode rows in one call, where it batches them)."""
    with sdpa_kernel(NO_CUDNN) if q.is_cuda else contextlib.nullcontext():
        n_kv, bs, d = k_cache.shape[1:]
        gather = lambda cache, index: cache.view(-1, bs * d).index_select(0, index)   # noqa: E731   (rows, bs * d)
        decoded = None
        if plan.decode is not None:              # every decode row in one call of the backend
            dec = plan.decode
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
    """Causal attention for B sequences' new tokens, keys/values read through block tables.

    q (N, H, d): packed new tokens; sequence b's are q[cu_seqlens_q[b]:cu_seqlens_q[b+1]], its
    LAST q_len positions (a cached prefix or earlier chunks come before: context_len >= q_len).
    Their k/v must already be stored in the caches (num_blocks, n_kv, block_size, d).
    block_tables (B, max_blocks), padded with any id (-1 is fine). Returns (N, H, d).

    One gather of every sequence's blocks in use, then one SDPA per sequence over exactly its
    context (see `step_plan`). A decode token is just a chunk of length 1, so mixed prefill +
    decode batches work too. No sequence is padded to the longest one: the work is the tokens.
    """
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    plan = step_plan(block_tables, context_lens, q_lens, k_cache.shape[2], k_cache.shape[1], step_kv=False,
                     batch_decode_rows=backend.batches_decode_rows)
    return attend_per_sequence(q, None, None, k_cache, v_cache, plan, backend)


# ----------------------------------------------------------------------------- decode, static shapes


@dataclass
class PaddedPlan:
    """Decode work whose shapes depend only on the tables' shapes (what CUDA graphs replay)."""
    index: torch.Tensor            # (B * n_kv * width,) rows of the (blocks * n_kv, block_size * d) view
    valid: torch.Tensor            # (B, 1, width * block_size, 1) bool: the slots within each context


def padded_plan(block_tables, context_lens, block_size: int, n_kv: int) -> PaddedPlan:
    """Every sequence gathers its table's full width, width x block_size slots, and a mask keeps
    the first context_len of them. Entries past a sequence's last block (padding, e.g. -1) read its
    first block instead, so every index is a real block; the mask hides them."""
    B, width = block_tables.shape
    device = block_tables.device
    in_use = torch.arange(width, device=device) < -(-context_lens.long() // block_size)[:, None]   # (B, width)
    blocks = torch.where(in_use, block_tables.long(), block_tables[:, :1].long())                 # (B, width)
    index = (blocks[:, None, :] * n_kv + torch.arange(n_kv, device=device)[None, :, None]).reshape(-1)
    valid = torch.arange(width * block_size, device=device) < context_lens[:, None]               # (B, L)
    return PaddedPlan(index=index, valid=valid[:, None, :, None])                                 # (B, 1, L, 1)


def _decode_padded(q, k_cache, v_cache, plan: PaddedPlan):
    B, H, d = q.shape
    n_kv, bs = k_cache.shape[1], k_cache.shape[2]
    L = plan.valid.shape[2]
    # One gather per cache, head by head (index: rows of the (blocks * n_kv, bs * d) view).
    k = k_cache.view(-1, bs * d).index_select(0, plan.index).view(B, n_kv, L, d)        # (B, n_kv, L, d)
    v = v_cache.view(-1, bs * d).index_select(0, plan.index).view(B, n_kv, L, d)
    # Masked slots may hold anything, NaN included (a weight of 0 times NaN is NaN): zero them.
    k, v = torch.where(plan.valid, k, 0), torch.where(plan.valid, v, 0)
    # GQA as a shape: the g query heads of a KV head are g queries of one (n_kv-headed) attention.
    out = F.scaled_dot_product_attention(q.view(B, n_kv, H // n_kv, d), k, v,
                                         attn_mask=plan.valid.transpose(-1, -2))        # (B, n_kv, g, d)
    return out.reshape(B, H, d)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, static_shapes: bool = False,
                           backend: AttentionBackend = TORCH_SDPA):
    """One new token per sequence: q (B, H, d) (its k/v already stored) attends to its
    context_lens[b] cached tokens through block_tables (B, max_blocks). Returns (B, H, d).

    Two ways, same numbers (up to rounding):

    Per sequence (eager): a sequence's blocks are gathered head by head into (n_kv, tokens, d)
    (on a GPU every sequence's in one copy), then each sequence is one fused SDPA call over exactly
    its context_len keys (a view, no mask, GQA without repeating K/V). How many blocks each
    sequence uses decides the shapes: fine for eager code. A backend that batches decode rows
    (nano_kernels/attention.py: a C++ kernel that reads each block in place) takes them all at once.

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
        return _decode_padded(q, k_cache, v_cache, padded_plan(block_tables, context_lens, block_size, n_kv))
    plan = step_plan(block_tables, context_lens, torch.ones_like(context_lens), block_size, n_kv, step_kv=False,
                     batch_decode_rows=backend.batches_decode_rows)
    return attend_per_sequence(q, None, None, k_cache, v_cache, plan, backend)


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
    every later layer reuses them (`step_plan`, `slot_rows`); a step that never runs this model's
    attention (a CUDA graph replays its own) builds nothing. static_shapes (decode only): the
    padded form, whose shapes depend on the tensors' shapes only (what a CUDA graph replays).
    backend: how each sequence's attention is computed (default: torch's SDPA).
    """

    def __init__(self, kv_cache, slot_mapping, block_tables, context_lens, cu_seqlens_q=None,
                 static_shapes: bool = False, backend: AttentionBackend = TORCH_SDPA):
        self.kv_cache = kv_cache
        self.slot_mapping = slot_mapping.long()  # index_copy_ wants int64 (no copy when it already is)
        self.block_tables, self.context_lens = block_tables, context_lens
        self.cu_seqlens_q = cu_seqlens_q
        self.is_prefill = cu_seqlens_q is not None
        self.static_shapes = static_shapes and not self.is_prefill
        self.backend = backend
        self.plan: StepPlan | PaddedPlan | None = None   # built by the first layer, reused by the rest
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
    decodes = {"one SDPA per sequence": {}, "whole tables + a mask (CUDA graphs)": dict(static_shapes=True)}
    dec_errs = {name: (paged_decode_attention(q_dec, k_cache, v_cache, tables, ctx, **how) - dec_ref).abs().max().item()
                for name, how in decodes.items()}
    console.print("[bold]paged attention == dense attention[/], random q/k/v in the layout above")
    console.print("(every slot no sequence wrote holds NaN, so reading one would show):")
    console.print(f"  prefill, B+C+D packed, B and D after their cached prefix: max abs diff {err:.1e}")
    console.print("  decode, against gather + plain softmax:")
    for name, e in dec_errs.items():
        console.print(f"    {name:44s} max abs diff {e:.1e}")

    real = qwen3.PRESETS["demo"]
    per_block = real.kv_bytes_per_token(torch.bfloat16) * 16
    console.print(f"\nQwen3-0.6B in bf16: a 16-token block holds {per_block / 2**20:.2f} MiB of k/v over "
                  f"{real.num_hidden_layers} layers; 1 GiB of cache is {2**30 // per_block} blocks "
                  f"= {2**30 // per_block * 16:,} tokens, shared by all requests.")
    if not (err < 1e-5 and max(dec_errs.values()) < 1e-5):  # NaN fails too
        raise SystemExit("paged attention does not match dense attention")


if __name__ == "__main__":
    sys.exit(main())
