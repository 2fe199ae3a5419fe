"""05_scheduler.py with a fake model: the policy alone (budgets, FIFO, chunking, preemption, accounting)."""
import random

import pytest

from conftest import load

paged = load("04_paged_attention")
S = load("05_scheduler")


def run_fake(prompt_lens, max_new, num_blocks, block_size=4, max_num_seqs=4, budget=16, prefix_caching=True,
             arrivals=None, shared_prefix=0, seed=0):
    """Drive the scheduler with a fake model whose next token is always (seq_id + 7).
    arrivals[i] = the step at which request i arrives (continuous batching)."""
    rng = random.Random(seed)
    bm = paged.BlockManager(num_blocks, block_size, prefix_caching)
    sch = S.Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    prefix = [rng.randrange(50) for _ in range(shared_prefix)]
    seqs = [S.Sequence(i, prefix + [rng.randrange(50) for _ in range(n)], shared_prefix + n) for i, n in enumerate(prompt_lens)]
    arrivals = arrivals or [0] * len(seqs)
    log = dict(batches=[], admitted=[], preempted=[], finished=[])
    step = 0
    while step < 10_000:
        for seq, t in zip(seqs, arrivals):
            if t == step:
                sch.add(seq)
        if not sch.has_unfinished() and step > max(arrivals):
            break
        batch = sch.schedule()
        step += 1
        log["batches"].append([(s.seq_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens)])
        log["preempted"] += [s.seq_id for s in batch.preempted]
        assert batch.num_batched_tokens <= budget
        assert len(sch.running) <= max_num_seqs
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.num_computed_tokens == seq.num_cached_tokens and seq.seq_id not in log["admitted"]:
                log["admitted"].append(seq.seq_id)
            assert len(seq.block_table) * block_size >= seq.num_computed_tokens + n
            seq.num_computed_tokens += n
            bm.commit(seq.seq_id, seq.token_ids[:seq.num_computed_tokens])
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(seq.seq_id + 7)
                if len(seq.completion_token_ids) == max_new[seq.seq_id]:
                    sch.finish(seq)
                    log["finished"].append(seq.seq_id)
        # pool accounting: every block is free, evictable, or owned by running sequences
        owned = {b for s in sch.running for b in s.block_table}
        assert bm.num_free_blocks + len(owned) == num_blocks
    return seqs, bm, sch, log


def test_every_request_finishes_within_budgets_and_frees_the_pool():
    lens = [5, 30, 3, 17, 8, 12, 1, 25]
    max_new = [6, 3, 9, 4, 1, 7, 5, 2]
    seqs, bm, sch, log = run_fake(lens, max_new, num_blocks=40)
    assert sorted(log["finished"]) == list(range(len(lens)))
    for seq in seqs:
        assert seq.completion_token_ids == [seq.seq_id + 7] * max_new[seq.seq_id]
        assert seq.status is S.SequenceStatus.FINISHED
    assert bm.num_free_blocks == 40 and not bm.block_tables


def test_fifo_admission_order():
    lens = [10, 10, 10, 10, 10, 10]
    _, _, _, log = run_fake(lens, [3] * 6, num_blocks=60, max_num_seqs=2)
    assert log["admitted"] == sorted(log["admitted"])


def test_chunked_prefill_splits_a_long_prompt_and_decodes_keep_running():
    # request 0 decodes while the 40-token prompt of request 1 is prefilled in budget-sized chunks
    _, _, _, log = run_fake([3, 40], [12, 2], num_blocks=40, budget=8, arrivals=[0, 2])
    chunks = [n for batch in log["batches"] for sid, n in batch if sid == 1 and n > 1]
    assert sum(chunks) >= 40 and max(chunks) <= 8 and len(chunks) >= 5
    during = [batch for batch in log["batches"] if any(sid == 1 and n > 1 for sid, n in batch)]
    assert any((0, 1) in batch for batch in during)    # request 0 was not stalled by the long prefill


def test_prompt_as_long_as_the_pool_finishes():
    # 10 blocks of 4 tokens = 40 slots; a 37-token prompt + 3 tokens needs all of it
    seqs, bm, _, log = run_fake([37, 5, 6], [3, 4, 4], num_blocks=10, budget=16)
    assert sorted(log["finished"]) == [0, 1, 2]
    assert bm.num_free_blocks == 10


def test_preemption_requeues_first_and_nothing_is_lost():
    lens = [6, 6, 6, 6]
    max_new = [20, 20, 20, 20]
    seqs, bm, sch, log = run_fake(lens, max_new, num_blocks=12, budget=32)
    assert sch.num_preemptions > 0 and log["preempted"]
    assert sorted(log["finished"]) == [0, 1, 2, 3]
    for seq in seqs:   # the fake model's tokens survive recomputation
        assert seq.completion_token_ids == [seq.seq_id + 7] * 20
    assert bm.num_free_blocks == 12


def test_preempted_request_is_readmitted_before_later_ones():
    bm = paged.BlockManager(6, 4, False)
    sch = S.Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a, b, c = (S.Sequence(i, [i] * 8, 8) for i in range(3))
    sch.add(a); sch.add(b)
    batch = sch.schedule()                       # a and b take 2 blocks each
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
        s.token_ids.append(1)
    sch.add(c)                                   # c waits: only 2 blocks left, needs 2 + preempt pressure
    for _ in range(8):
        batch = sch.schedule()
        if batch.preempted:
            break
        for s, n in zip(batch.seqs, batch.num_new_tokens):
            s.num_computed_tokens += n
            if s.num_computed_tokens == s.num_tokens:
                s.token_ids.append(1)
    assert batch.preempted, "the pool should have run out"
    victim = batch.preempted[0]
    assert sch.waiting[0] is victim and victim.status is S.SequenceStatus.WAITING and victim.num_computed_tokens == 0


def test_prefix_hits_counted_at_admission():
    seqs, bm, _, _ = run_fake([4, 4, 4], [2, 2, 2], num_blocks=30, shared_prefix=12, arrivals=[0, 5, 6])
    assert bm.prefix_hit_tokens >= 2 * 12 and all(s.num_cached_tokens == 12 for s in seqs[1:])


@pytest.mark.parametrize("seed", range(5))
def test_random_workloads_always_finish(seed):
    rng = random.Random(seed)
    n = 12
    lens = [rng.randrange(1, 30) for _ in range(n)]
    max_new = [rng.randrange(1, 15) for _ in range(n)]
    arrivals = sorted(rng.randrange(0, 20) for _ in range(n))
    blocks = max(12, -(-(max(lens) + max(max_new)) // 4) + 1)
    seqs, bm, _, log = run_fake(lens, max_new, num_blocks=blocks, budget=rng.choice([8, 16, 64]),
                                max_num_seqs=rng.choice([1, 3, 8]), arrivals=arrivals, seed=seed,
                                shared_prefix=rng.choice([0, 8]))
    assert sorted(log["finished"]) == list(range(n))
    assert bm.num_free_blocks == blocks and not bm.block_tables
