"""04_paged_attention.py: paged attention == dense attention, the block manager's bookkeeping under a
random fuzz, its unit behaviours (LRU, prefix hits, truncate, failures), and the real model through
PagedContext against the plain model and naive_generate. Decode rows both ways: 04's SDPA and the C++
backend plugged into its seam (the kernels themselves are tested in test_kernels.py)."""
import copy
import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import built_cpu_extension, load

P = load("04_paged_attention")
M = load("02_model")


# ----------------------------------------------------------------------------- attention vs dense


def paged_layout(ctx_lens, q_lens, H, n_kv, d, block_size, dtype=torch.float32, seed=0, pad=-1):
    """Random per-sequence q/k/v written into a NaN-filled cache at shuffled, non-contiguous blocks.
    Every slot not holding one of the sequences' tokens is NaN (unused blocks and the tails of
    last blocks), so any read outside the block tables shows up in the output."""
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(n / block_size) for n in ctx_lens]
    num_blocks = sum(need) + 5
    perm = torch.randperm(num_blocks, generator=g).tolist()
    k_cache = torch.full((num_blocks, n_kv, block_size, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    unused = perm[sum(need)]  # a NaN block, used as padding when pad == "nan-block"
    tables, seqs, at = [], [], 0
    for n, m in zip(ctx_lens, q_lens):
        blocks = perm[at:at + math.ceil(n / block_size)]
        at += len(blocks)
        k, v = (torch.randn(n, n_kv, d, generator=g).to(dtype) for _ in range(2))
        q = torch.randn(n, H, d, generator=g).to(dtype)
        slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in range(n)])
        P.store_kvcache(k, v, k_cache, v_cache, slots)
        tables.append(blocks)
        seqs.append((q, k, v, m))
    width = max(len(t) for t in tables) + 1  # always at least one padding column
    fill = unused if pad == "nan-block" else pad
    block_tables = torch.tensor([t + [fill] * (width - len(t)) for t in tables])
    return seqs, k_cache, v_cache, block_tables, torch.tensor(ctx_lens)


def dense_reference(q, k, v):
    """Causal attention of one whole sequence with K/V repeated for GQA, in fp32: (n, H, d)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(g, dim=1), v.float().repeat_interleave(g, dim=1)
    out = F.scaled_dot_product_attention(q.float().transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True)
    return out.transpose(0, 1)


GQA = [(2, 2), (4, 2), (8, 1)]  # (H, n_kv): ratios 1, 2, 8


@pytest.fixture(params=["kernel", "sdpa"])
def decode_path(request):
    """The backend decode rows go through, both ways: the C++ kernel reading blocks in place
    (nano_kernels/attention.py, every decode row of a step in one call), and 04's gather + SDPA."""
    if request.param == "kernel":
        built_cpu_extension()                    # skips without a compiler; with one, it must have built
        from nano_kernels.attention import CPUAttention
        return CPUAttention(decode=True, prefill=False)
    return P.TORCH_SDPA


@pytest.mark.parametrize("H,n_kv", GQA)
@pytest.mark.parametrize("block_size", [16, 4])
@pytest.mark.parametrize("pad", [-1, "nan-block"])
def test_prefill_equals_dense(H, n_kv, block_size, pad, decode_path):
    """The 1-token prompt is a decode row (the backend's, in a step with prompts)."""
    lens = [1, 15, 16, 17, 33]
    seqs, kc, vc, bt, ctx = paged_layout(lens, lens, H, n_kv, 16, block_size, pad=pad)
    q = torch.cat([s[0] for s in seqs])
    cu = torch.tensor([0] + lens).cumsum(0)
    out = P.paged_prefill_attention(q, kc, vc, cu, ctx, bt, backend=decode_path)
    assert out.shape == q.shape and torch.isfinite(out).all()
    ref = torch.cat([dense_reference(*s[:3]) for s in seqs])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("H,n_kv", GQA)
@pytest.mark.parametrize("whole_step", [False, True], ids=["per-sequence-gather", "whole-step-gather"])
def test_prefill_with_cached_prefix(H, n_kv, whole_step, decode_path, monkeypatch):
    """context_len > q_len: the new tokens are each sequence's last q_len positions (q_len 1: a
    decode row). Both ways of gathering (the whole step at once is what a GPU does; forced here on
    the CPU)."""
    monkeypatch.setattr(P, "GATHER_WHOLE_STEP_ON", ("cpu", "cuda") if whole_step else ())
    ctx_lens, q_lens = [17, 33, 5, 40, 16], [1, 10, 5, 7, 16]
    seqs, kc, vc, bt, ctx = paged_layout(ctx_lens, q_lens, H, n_kv, 16, 16, seed=1)
    q = torch.cat([s[0][-m:] for s, m in zip(seqs, q_lens)])
    cu = torch.tensor([0] + q_lens).cumsum(0)
    out = P.paged_prefill_attention(q, kc, vc, cu, ctx, bt, backend=decode_path)
    ref = torch.cat([dense_reference(*s[:3])[-m:] for s, m in zip(seqs, q_lens)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("H,n_kv", GQA)
@pytest.mark.parametrize("block_size", [16, 4])
@pytest.mark.parametrize("pad", [-1, "nan-block"])
@pytest.mark.parametrize("static_shapes", [False, True])
def test_decode_equals_reference_and_dense(H, n_kv, block_size, pad, static_shapes, decode_path):
    """static_shapes: every table entry is kept (what CUDA graphs replay), padding fully masked."""
    lens = [1, 15, 16, 17, 33, 64]
    seqs, kc, vc, bt, ctx = paged_layout(lens, [1] * len(lens), H, n_kv, 32, block_size, seed=2, pad=pad)
    q = torch.stack([s[0][-1] for s in seqs])                                  # (B, H, d)
    out = P.paged_decode_attention(q, kc, vc, bt, ctx, static_shapes, backend=decode_path)
    assert out.shape == q.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, P.decode_attention_reference(q, kc, vc, bt, ctx), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, torch.stack([dense_reference(*s[:3])[-1] for s in seqs]), atol=1e-5, rtol=1e-5)
    # Many trailing empty blocks (a wide, padded table) change nothing.
    wide = torch.cat([bt, torch.full((bt.shape[0], 5), -1)], dim=1)
    torch.testing.assert_close(P.paged_decode_attention(q, kc, vc, wide, ctx, static_shapes, backend=decode_path), out,
                               atol=1e-6, rtol=1e-6)


def test_int32_metadata_gives_the_same_result(decode_path):
    """vLLM keeps cu_seqlens_q, context_lens and block_tables in int32."""
    lens = [3, 17, 9]
    seqs, kc, vc, bt, ctx = paged_layout(lens, lens, 4, 2, 16, 4, seed=5)
    q, cu = torch.cat([s[0] for s in seqs]), torch.tensor([0] + lens).cumsum(0)
    assert torch.equal(P.paged_prefill_attention(q, kc, vc, cu.int(), ctx.int(), bt.int(), backend=decode_path),
                       P.paged_prefill_attention(q, kc, vc, cu, ctx, bt, backend=decode_path))
    qd = torch.stack([s[0][-1] for s in seqs])
    assert torch.equal(P.paged_decode_attention(qd, kc, vc, bt.int(), ctx.int(), backend=decode_path),
                       P.paged_decode_attention(qd, kc, vc, bt, ctx, backend=decode_path))


@pytest.mark.parametrize("static_shapes", [False, True])
def test_decode_online_softmax_is_stable_for_large_scores(static_shapes, decode_path):
    """Scores in the thousands: a plain exp would overflow; the running max keeps it finite."""
    seqs, kc, vc, bt, ctx = paged_layout([40, 7], [1, 1], 4, 2, 16, 4, seed=3)
    q = 300 * torch.stack([s[0][-1] for s in seqs])
    out = P.paged_decode_attention(q, kc, vc, bt, ctx, static_shapes, backend=decode_path)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, P.decode_attention_reference(q, kc, vc, bt, ctx), atol=1e-4, rtol=1e-4)


def test_bf16_prefill_and_decode(decode_path):
    lens = [5, 16, 33]
    seqs, kc, vc, bt, ctx = paged_layout(lens, lens, 4, 2, 32, 16, dtype=torch.bfloat16, seed=4)
    q = torch.cat([s[0] for s in seqs])
    out = P.paged_prefill_attention(q, kc, vc, torch.tensor([0] + lens).cumsum(0), ctx, bt, backend=decode_path)
    assert out.dtype == torch.bfloat16
    ref = torch.cat([dense_reference(*s[:3]) for s in seqs])
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    qd = torch.stack([s[0][-1] for s in seqs])
    dec = P.paged_decode_attention(qd, kc, vc, bt, ctx, backend=decode_path)
    assert dec.dtype == torch.bfloat16
    torch.testing.assert_close(dec.float(), P.decode_attention_reference(qd, kc, vc, bt, ctx).float(),
                               atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(dec.float(), torch.stack([dense_reference(*s[:3])[-1] for s in seqs]),
                               atol=3e-2, rtol=3e-2)


def test_store_kvcache_writes_exactly_the_slots():
    kc = torch.zeros(4, 2, 4, 3)                             # (blocks, n_kv, block_size, d)
    vc = torch.zeros_like(kc)
    k, v = torch.randn(3, 2, 3), torch.randn(3, 2, 3)
    slots = torch.tensor([9, 0, 15])                         # block 2 offset 1, block 0 offset 0, block 3 offset 3
    P.store_kvcache(k, v, kc, vc, slots)
    assert torch.equal(kc[2, :, 1], k[0]) and torch.equal(kc[0, :, 0], k[1]) and torch.equal(kc[3, :, 3], k[2])
    assert torch.equal(vc[2, :, 1], v[0]) and torch.equal(vc[3, :, 3], v[2])
    assert int((kc != 0).any(-1).sum()) == 3 * 2             # 3 slots x 2 heads, nothing else
    assert torch.equal(P.read_slots(kc, slots), k) and torch.equal(P.read_slots(vc, slots), v)


# ----------------------------------------------------------------------------- block manager: fuzz


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / append / commit / truncate / free over a 2-letter alphabet, new prompts
    often built from an earlier prompt's prefix, so prefixes collide all the time. The test keeps
    its own truth: which token each physical slot holds (it 'computes' every newly reserved slot)
    and, for each cached block, the full token prefix it stands for. A prefix hit must be exactly
    the blocks that truth says are cached, holding exactly the prompt's tokens."""

    BS, NUM_BLOCKS = 4, 14

    def __init__(self):
        super().__init__()
        self.bm = P.BlockManager(self.NUM_BLOCKS, self.BS)
        self.stream: dict[int, list[int]] = {}   # seq -> tokens in its reserved slots
        self.committed: dict[int, int] = {}      # seq -> committed full blocks
        self.slot_token: dict[int, int] = {}     # physical slot -> token computed into it
        self.cache_model: dict[int, tuple] = {}  # cached block -> the full prefix it holds
        self.next_id = 0
        self.history: list[list[int]] = []      # every prompt so far, to share prefixes with
        self.lookups = self.hit_tokens = 0

    # --- helpers

    def snapshot(self):
        return copy.deepcopy(self.bm.__dict__)

    def write(self, sid, start, end):
        """The engine computes positions [start, end): their slots get the tokens. Only ever into
        a block this sequence owns alone and that is not cached (copy-free sharing is read-only)."""
        table = self.bm.block_tables[sid]
        for p, slot in zip(range(start, end), self.bm.slot_mapping(sid, start, end)):
            b = table[p // self.BS]
            assert self.bm.ref_count(b) == 1 and not self.bm.is_cached(b)
            self.slot_token[slot] = self.stream[sid][p]

    def expected_hits(self, prompt):
        prefixes = set(self.cache_model.values())
        k = 0
        while k < (len(prompt) - 1) // self.BS and tuple(prompt[:(k + 1) * self.BS]) in prefixes:
            k += 1
        return k

    def sync_cache_model(self):
        for b in list(self.cache_model):
            if not self.bm.is_cached(b):  # evicted
                del self.cache_model[b]

    # --- rules

    @rule(data=st.data(), tail=st.lists(st.integers(0, 1), max_size=12), chunk=st.none() | st.integers(0, 12),
          computed=st.booleans())
    def allocate(self, data, tail, chunk, computed):
        prompt = tail
        if self.history and data.draw(st.booleans()):
            old = data.draw(st.sampled_from(self.history))
            prompt = old[:data.draw(st.integers(0, len(old)))] + tail
        if not prompt:
            prompt = [0]
        self.history.append(prompt)
        sid, bm = self.next_id, self.bm
        expected = self.expected_hits(prompt)
        fits = bm.can_allocate(len(prompt))
        before = self.snapshot()
        try:
            cached = bm.allocate(sid, prompt, chunk)
        except P.NoFreeBlocksError:
            assert not (fits and chunk is None), "can_allocate said yes"
            assert bm.__dict__ == before, "a failed allocate changed state"
            return
        self.next_id += 1
        assert cached == expected * self.BS
        assert cached % self.BS == 0 and (cached == 0 or cached < len(prompt))
        # the hit blocks really hold this prompt's tokens (the ones once committed into them)
        for i, b in enumerate(bm.block_tables[sid][:expected]):
            assert self.cache_model[b] == tuple(prompt[:(i + 1) * self.BS])
        assert [self.slot_token[s] for s in bm.slot_mapping(sid, 0, cached)] == prompt[:cached]
        n = bm.num_tokens[sid]
        assert n == (len(prompt) if chunk is None else cached + chunk)
        self.stream[sid] = list(prompt[:n]) + [0] * max(0, n - len(prompt))
        self.committed[sid] = expected
        self.lookups += 1
        self.hit_tokens += cached
        self.write(sid, cached, n)
        if computed:  # what the engine does after the prefill step
            self.do_commit(sid, n, extra=False)

    @precondition(lambda self: self.stream)
    @rule(data=st.data(), new=st.lists(st.integers(0, 1), max_size=7))
    def append(self, data, new):
        sid = data.draw(st.sampled_from(sorted(self.stream)))
        bm, n = self.bm, self.bm.num_tokens[sid]
        fits = bm.blocks_needed(sid, len(new)) <= bm.num_free_blocks
        assert fits == bm.can_allocate(len(new), sid)
        before = self.snapshot()
        try:
            bm.append_slots(sid, len(new))
        except P.NoFreeBlocksError:
            assert not fits and bm.__dict__ == before
            return
        assert fits
        self.stream[sid] += new
        self.write(sid, n, n + len(new))

    @precondition(lambda self: self.stream)
    @rule(data=st.data(), extra=st.booleans())
    def commit(self, data, extra):
        sid = data.draw(st.sampled_from(sorted(self.stream)))
        self.do_commit(sid, data.draw(st.integers(0, len(self.stream[sid]))), extra)

    def do_commit(self, sid, k, extra):
        self.sync_cache_model()  # an allocate just before may have evicted cached blocks
        tokens = self.stream[sid][:k] + ([1] if extra and k == len(self.stream[sid]) else [])  # + a sampled token
        was_cached = {b for b in range(self.NUM_BLOCKS) if self.bm.is_cached(b)}
        self.bm.commit(sid, tokens)
        table = self.bm.block_tables[sid]
        for i in range(self.committed[sid], k // self.BS):
            b = table[i]
            prefix = tuple(self.stream[sid][:(i + 1) * self.BS])
            if self.bm.is_cached(b) and b not in was_cached:
                assert prefix not in self.cache_model.values(), "an identical block was registered twice"
                self.cache_model[b] = prefix
            else:  # left unhashed: only because the same prefix is already cached elsewhere
                assert not self.bm.is_cached(b) and prefix in self.cache_model.values()
        self.committed[sid] = max(self.committed[sid], k // self.BS)

    @precondition(lambda self: self.stream)
    @rule(data=st.data())
    def truncate(self, data):
        sid = data.draw(st.sampled_from(sorted(self.stream)))
        n = self.bm.num_tokens[sid]
        allowed = n - self.committed[sid] * self.BS
        assert self.bm.num_committed_tokens(sid) == self.committed[sid] * self.BS
        k = data.draw(st.integers(0, allowed + 3))
        if k > allowed:
            before = self.snapshot()
            with pytest.raises(ValueError):
                self.bm.truncate(sid, k)
            assert self.bm.__dict__ == before
            return
        self.bm.truncate(sid, k)
        del self.stream[sid][n - k:]
        assert len(self.bm.block_tables[sid]) == math.ceil((n - k) / self.BS)

    @precondition(lambda self: self.stream)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.stream)))
        self.bm.free(sid)
        del self.stream[sid], self.committed[sid]

    # --- invariants, checked after every step

    @invariant()
    def pool_accounting(self):
        bm = self.bm
        self.sync_cache_model()
        owners = Counter(b for table in bm.block_tables.values() for b in table)
        for sid, table in bm.block_tables.items():
            assert len(set(table)) == len(table), "a block twice in one table"
            assert len(table) == math.ceil(bm.num_tokens[sid] / self.BS)
            assert bm.num_tokens[sid] == len(self.stream[sid])
        used = {b for b in range(self.NUM_BLOCKS) if bm.ref_count(b) > 0}
        free_list, evictable = list(bm._free), bm.evictable_blocks()
        assert len(set(free_list)) == len(free_list) and len(set(evictable)) == len(evictable)
        assert not (set(free_list) & set(evictable)) and not (used & (set(free_list) | set(evictable)))
        assert len(free_list) + len(evictable) + len(used) == self.NUM_BLOCKS, "a block leaked"
        for b in range(self.NUM_BLOCKS):
            assert bm.ref_count(b) == owners[b]
        assert all(bm.is_cached(b) for b in evictable) and not any(bm.is_cached(b) for b in free_list)
        assert bm.num_free_blocks == len(free_list) + len(evictable)
        assert bm.num_used_blocks == len(used) and bm.num_evictable_blocks == len(evictable)
        # every cached block is one the model saw registered, and still holds those tokens
        cached = [b for b in range(self.NUM_BLOCKS) if bm.is_cached(b)]
        assert set(cached) == set(self.cache_model) and bm.num_cached_blocks == len(cached)
        for b in cached:
            tokens = self.cache_model[b][-self.BS:]
            assert bm.cached_tokens(b) == tokens
            assert tuple(self.slot_token[b * self.BS + i] for i in range(self.BS)) == tokens
        assert bm.prefix_lookups == self.lookups and bm.prefix_hit_tokens == self.hit_tokens
        assert bm.prefix_hit_blocks * self.BS == self.hit_tokens

    def teardown(self):
        for sid in list(self.stream):
            self.bm.free(sid)
        assert self.bm.num_free_blocks == self.NUM_BLOCKS and self.bm.num_used_blocks == 0
        assert not self.bm.block_tables and not self.bm.num_tokens


TestBlockManagerFuzz = BlockManagerMachine.TestCase
TestBlockManagerFuzz.settings = settings(max_examples=200, stateful_step_count=30, derandomize=True, deadline=None)


# ----------------------------------------------------------------------------- block manager: units


def test_slot_mapping_follows_the_block_table():
    bm = P.BlockManager(8, 4, enable_prefix_caching=False)
    bm.allocate(0, list(range(8)))          # blocks 0, 1
    bm.allocate(1, list(range(12)))         # blocks 2, 3, 4
    bm.free(0)                              # free list now 5, 6, 7, 1, 0
    bm.allocate(2, list(range(6)))          # blocks 5, 6
    bm.free(1)
    bm.allocate(3, list(range(10)))         # blocks 7, 1, 0
    assert bm.block_tables[3] == [7, 1, 0]
    assert bm.slot_mapping(3, 0, 10) == [28, 29, 30, 31, 4, 5, 6, 7, 0, 1]
    assert bm.slot_mapping(3, 5, 9) == [5, 6, 7, 0]
    assert bm.slot_mapping(3, 10, 10) == []
    with pytest.raises(ValueError):
        bm.slot_mapping(3, 8, 11)           # slot 10 is not reserved


def test_blocks_needed_counts_boundaries():
    bm = P.BlockManager(8, 4)
    assert bm.blocks_needed(None, 0) == 0 and bm.blocks_needed(None, 1) == 1 and bm.blocks_needed(None, 5) == 2
    bm.allocate(0, [1, 2, 3])
    assert bm.blocks_needed(0, 1) == 0 and bm.blocks_needed(0, 2) == 1 and bm.blocks_needed(0, 10) == 3
    bm.append_slots(0, 1)
    assert len(bm.block_tables[0]) == 1
    bm.append_slots(0, 9)                   # several blocks at once
    assert len(bm.block_tables[0]) == 4 and bm.num_tokens[0] == 13
    assert bm.can_allocate(16) and not bm.can_allocate(17)       # 4 blocks free
    assert bm.can_allocate(19, seq_id=0) and not bm.can_allocate(20, seq_id=0)   # 13 + 19 = 32 = 8 blocks


def test_freed_prefix_still_hits_and_hits_are_capped():
    bm = P.BlockManager(16, 4)
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert bm.allocate(0, prompt) == 0
    bm.commit(0, prompt)
    bm.free(0)
    assert bm.num_free_blocks == 16 and bm.num_evictable_blocks == 2
    assert bm.allocate(1, prompt[:8] + [1, 2, 3]) == 8            # both full blocks, after the owner left
    assert bm.allocate(2, prompt[:8]) == 4                        # identical 8 tokens: the last block is recomputed
    assert bm.allocate(3, prompt[:4] + [0, 0, 0, 0, 1]) == 4      # diverges in block 1
    assert bm.allocate(4, [9] + prompt[1:]) == 0                  # diverges at token 0: no hit at all
    head = bm.block_tables[1][0]
    assert bm.block_tables[2][0] == bm.block_tables[3][0] == head and bm.ref_count(head) == 3
    assert bm.ref_count(bm.block_tables[1][1]) == 1 and bm.block_tables[4][0] != head
    assert (bm.prefix_lookups, bm.prefix_hit_blocks, bm.prefix_hit_tokens) == (5, 4, 16)


def test_commit_only_full_verified_blocks_and_ignores_unreserved_tokens():
    bm = P.BlockManager(8, 4)
    bm.allocate(0, [1, 2, 3, 4, 5, 6])
    bm.append_slots(0, 3)                                         # 3 draft tokens: slots 6..8
    bm.commit(0, [1, 2, 3, 4, 5, 6, 7])                           # 7 verified: only block 0 is full
    assert [bm.is_cached(b) for b in bm.block_tables[0]] == [True, False, False]
    bm.truncate(0, 2)                                             # reject 2 drafts
    assert bm.num_tokens[0] == 7 and len(bm.block_tables[0]) == 2
    bm.append_slots(0, 1)
    bm.commit(0, [1, 2, 3, 4, 5, 6, 7, 8, 99])                    # 99: sampled, no k/v yet -> ignored
    assert [bm.is_cached(b) for b in bm.block_tables[0]] == [True, True]
    assert bm.cached_tokens(bm.block_tables[0][1]) == (5, 6, 7, 8)
    # a second sequence computing the same block (no hit: it was allocated before the commit)
    bm2 = P.BlockManager(8, 4)
    bm2.allocate(0, [1, 2, 3, 4, 5])
    bm2.allocate(1, [1, 2, 3, 4, 6])
    bm2.commit(0, [1, 2, 3, 4, 5])
    bm2.commit(1, [1, 2, 3, 4, 6])                                # identical block 0: the first one stays
    assert bm2.is_cached(bm2.block_tables[0][0]) and not bm2.is_cached(bm2.block_tables[1][0])
    assert bm2.num_cached_blocks == 1


def test_hash_collisions_never_give_a_false_hit(monkeypatch):
    """With every block hash equal, a hit is still only an identical parent and identical tokens."""
    monkeypatch.setattr(P, "block_hash", lambda parent, tokens: 7)
    bm = P.BlockManager(16, 2)
    bm.allocate(0, [1, 2, 3, 4, 5])
    bm.commit(0, [1, 2, 3, 4, 5])                                 # block 0 registered under hash 7
    assert bm.allocate(1, [1, 3, 3, 4, 5]) == 0                   # same hash, other tokens
    assert bm.allocate(2, [1, 2, 1, 2, 1, 2, 9]) == 2             # block 0 hits; block 1: same hash and
    assert bm.allocate(3, [1, 2, 1, 2, 9]) == 2                   # tokens as block 0, but its parent differs


def test_lru_eviction_order():
    bm = P.BlockManager(6, 2)
    a, b = [1, 2, 3, 4, 5], [6, 7, 8, 9, 0]
    for sid, p in ((0, a), (1, b)):
        bm.allocate(sid, p)
        bm.commit(sid, p)
    blocks_a, blocks_b = bm.block_tables[0][:2], bm.block_tables[1][:2]
    bm.free(0)
    bm.free(1)
    # freed earlier = evicted earlier; within a sequence its tail goes before its head
    assert bm.evictable_blocks() == blocks_a[::-1] + blocks_b[::-1]
    assert bm.num_free_blocks == 6 and bm.num_evictable_blocks == 4
    assert bm.allocate(2, a[:4] + [4]) == 4                       # A's prefix is revived ...
    bm.free(2)                                                    # ... and becomes the most recent again
    assert bm.evictable_blocks() == blocks_b[::-1] + blocks_a[::-1]
    bm.allocate(3, [3] * 7)                                       # 4 blocks: the 2 free ones, then B's 2
    assert bm.evictable_blocks() == blocks_a[::-1]
    assert bm.allocate(4, a[:2] + [1]) == 2                       # A's head block; its new block evicts A's second
    assert bm.evictable_blocks() == [] and bm.num_free_blocks == 0
    bm.free(3)
    assert bm.allocate(5, b[:2] + [1]) == 0                       # B's blocks are gone


def test_prefix_caching_disabled():
    bm = P.BlockManager(8, 4, enable_prefix_caching=False)
    p = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    bm.allocate(0, p)
    bm.commit(0, p)
    bm.free(0)
    assert bm.allocate(1, p) == 0
    assert bm.num_cached_blocks == 0 and bm.num_evictable_blocks == 0
    assert (bm.prefix_lookups, bm.prefix_hit_blocks, bm.prefix_hit_tokens) == (0, 0, 0)
    bm.truncate(1, 9)                                             # nothing is committed without caching
    assert bm.block_tables[1] == [] and bm.num_free_blocks == 8


def test_truncate_releases_whole_blocks_and_never_committed_ones():
    bm = P.BlockManager(8, 4)
    bm.allocate(0, [1, 2, 3, 4, 5])
    bm.append_slots(0, 6)                                         # 11 slots, 3 blocks
    assert len(bm.block_tables[0]) == 3 and bm.num_free_blocks == 5
    bm.truncate(0, 2)                                             # 9 slots: still 3 blocks
    assert len(bm.block_tables[0]) == 3
    bm.truncate(0, 5)                                             # 4 slots: 1 block
    assert len(bm.block_tables[0]) == 1 and bm.num_free_blocks == 7 and bm.num_evictable_blocks == 0
    bm.commit(0, [1, 2, 3, 4])
    with pytest.raises(ValueError):
        bm.truncate(0, 1)                                         # into the committed block
    with pytest.raises(ValueError):
        bm.truncate(0, -1)
    bm.truncate(0, 0)
    assert bm.num_tokens[0] == 4


def test_failures_leave_state_unchanged():
    bm = P.BlockManager(3, 4)
    bm.allocate(0, [1, 2, 3, 4, 5])
    bm.commit(0, [1, 2, 3, 4, 5])
    before = copy.deepcopy(bm.__dict__)
    assert not bm.can_allocate(9)
    with pytest.raises(P.NoFreeBlocksError):
        bm.allocate(1, list(range(9)))
    with pytest.raises(P.NoFreeBlocksError):
        bm.append_slots(0, 8)
    with pytest.raises(ValueError):
        bm.allocate(0, [1])                                       # already allocated
    assert bm.__dict__ == before
    # a hit on an evictable block counts against the pool: A's block 0 is revived, 3 more are needed
    bm.free(0)
    before = copy.deepcopy(bm.__dict__)
    with pytest.raises(P.NoFreeBlocksError):
        bm.allocate(2, [1, 2, 3, 4] + [0] * 9)
    assert bm.__dict__ == before
    assert bm.allocate(2, [1, 2, 3, 4] + [0] * 8) == 4            # 3 blocks: the hit + 2 new
    assert bm.num_free_blocks == 0


# ----------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def tiny_model():
    cfg = M.PRESETS["tiny"]
    model = M.Qwen3ForCausalLM(cfg)
    model.load_state_dict(M.random_state_dict(cfg, 0), strict=False)
    model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


@torch.inference_mode()
def test_model_through_paged_context_equals_plain_model(tiny_model, decode_path):
    model, cfg = tiny_model, tiny_model.config
    bs = 4
    bm = P.BlockManager(num_blocks=40, block_size=bs)
    kv = P.allocate_kv_cache(cfg, 40, bs, torch.float32, "cpu")
    assert kv.shape == (cfg.num_hidden_layers, 2, 40, cfg.num_key_value_heads, bs, cfg.head_dim)
    g = torch.Generator().manual_seed(0)
    streams: dict[int, list[int]] = {}

    def step(spans, decode):
        """Run the model on (seq_id, start, end) spans; check every new token's logits against the plain
        model on the whole sequence; commit; return each sequence's last-position logits."""
        ctx = P.PagedContext.from_spans(kv, bm, spans, backend=decode_path)
        assert ctx.is_prefill != decode
        ids = torch.tensor([t for sid, s, e in spans for t in streams[sid][s:e]])
        pos = torch.cat([torch.arange(s, e) for _, s, e in spans])
        logits = model.compute_logits(model(ids, pos, ctx))
        at, last = 0, {}
        for sid, s, e in spans:
            full = model.compute_logits(model(torch.tensor(streams[sid][:e]), torch.arange(e)))
            torch.testing.assert_close(logits[at:at + e - s], full[s:e], atol=1e-4, rtol=1e-4)
            at += e - s
            last[sid] = logits[at - 1]
            bm.commit(sid, streams[sid][:e])
        return last

    # A request computes and caches a 12-token prompt, then leaves: its 3 blocks stay evictable.
    streams[0] = torch.randint(0, cfg.vocab_size, (12,), generator=g).tolist()
    bm.allocate(0, streams[0])
    step([(0, 0, 12)], decode=False)
    bm.free(0)
    assert bm.num_evictable_blocks == 3

    prompts = {
        1: streams[0][:8] + torch.randint(0, cfg.vocab_size, (5,), generator=g).tolist(),  # shares 2 blocks
        2: list(streams[0]),                                                                 # same prompt: capped
        3: torch.randint(0, cfg.vocab_size, (7,), generator=g).tolist(),                     # fresh, 2 chunks
    }
    streams.update({sid: list(p) for sid, p in prompts.items()})
    assert bm.allocate(1, prompts[1]) == 8
    assert bm.allocate(2, prompts[2]) == 8
    assert bm.allocate(3, prompts[3], num_new_tokens=4) == 0
    generated = {1: [], 2: [], 3: []}

    def sample(last):
        for sid, logits in last.items():
            tok = int(logits.argmax())
            generated[sid].append(tok)
            streams[sid].append(tok)
            bm.append_slots(sid, 1)

    # packed prefill: 1 and 2 after their cached prefix, 3's first chunk
    last = step([(1, 8, 13), (2, 8, 12), (3, 0, 4)], decode=False)
    del last[3]                                   # mid-prompt: nothing to sample
    sample(last)
    # mixed step through the prefill path: 1 and 2 decode one token, 3 computes its last chunk
    bm.append_slots(3, 3)
    sample(step([(1, 13, 14), (2, 12, 13), (3, 4, 7)], decode=False))
    for _ in range(4):                            # pure decode steps
        sample(step([(sid, len(streams[sid]) - 1, len(streams[sid])) for sid in (1, 2, 3)], decode=True))
    for sid in (1, 2, 3):
        assert generated[sid] == M.naive_generate(model, prompts[sid], len(generated[sid]))
    assert [len(generated[s]) for s in (1, 2, 3)] == [6, 6, 5]
    for sid in (1, 2, 3):
        bm.free(sid)
    assert bm.num_free_blocks == bm.num_blocks and bm.num_used_blocks == 0


@pytest.mark.parametrize("spans", [
    [(0, 9, 10), (1, 3, 12), (2, 5, 6), (3, 0, 7)],     # decode, chunk after 3 cached, decode, new prompt
    [(0, 9, 10), (1, 0, 12), (2, 5, 6), (3, 0, 7)],     # both chunks start their sequence
    [(1, 0, 12), (3, 0, 7)],                             # new prompts only
    [(1, 0, 12), (3, 2, 7)],
    [(0, 0, 1), (2, 5, 6)],                              # a one-token prompt and a decode
])
def test_step_attention_equals_reading_everything_from_the_cache(spans, decode_path):
    """A step mixing prefill chunks and one-token decodes: a chunk with nothing cached before it
    attends to the step's own k/v (no gather), every other sequence reads its blocks (decode rows
    through the kernel or SDPA). Either way the result equals reading every sequence from the
    cache with SDPA."""
    torch.manual_seed(0)
    cfg = SimpleNamespace(num_hidden_layers=1, num_key_value_heads=2, head_dim=16)
    bm = P.BlockManager(16, 4, enable_prefix_caching=False)
    kv = P.allocate_kv_cache(cfg, 16, 4)
    kv.normal_()
    for sid, _, end in spans:
        bm.allocate(sid, list(range(end)), num_new_tokens=end)
    ctx = P.PagedContext.from_spans(kv, bm, spans, backend=decode_path)
    n = sum(e - s for _, s, e in spans)
    q, k, v = torch.randn(n, 4, 16), torch.randn(n, 2, 16), torch.randn(n, 2, 16)
    out = ctx.attend(0, q, k, v)                                          # stores k/v, then attends
    assert [seq.own for seq in ctx.plan.seqs] == [start == 0 for _, start, _ in spans]
    decodes = [i for i, (_, start, end) in enumerate(spans) if end - start == 1 and start > 0]
    assert [seq.decode_row is not None for seq in ctx.plan.seqs] == \
        [decode_path.batches_decode_rows and i in decodes for i in range(len(spans))]
    ref = P.paged_prefill_attention(q, kv[0, 0], kv[0, 1], torch.tensor([0] + [e - s for _, s, e in spans]).cumsum(0),
                                    ctx.context_lens, ctx.block_tables, backend=P.TORCH_SDPA)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
