"""
05 - The scheduler: continuous batching, chunked prefill and preemption.

A server gets requests at any time, each wanting a different number of tokens. Running them one
after another leaves the hardware idle (decoding one token reads all the weights for one row of
work); padding them into a static batch wastes the slots of requests that finish early. vLLM's
answer is *continuous batching*: the unit of work is one model step, and before every step the
scheduler decides which tokens of which requests go into it. Requests join and leave between steps.

Every step has a token budget (`max_num_batched_tokens`) and a sequence budget (`max_num_seqs`).
The policy, in order:

  1. RUNNING sequences first, oldest first. A decoding sequence needs 1 token; a sequence still in
     prefill needs the rest of its prompt, cut to what is left of the budget (*chunked prefill*:
     a 3000-token prompt with a 512-token budget takes 6 steps, and decodes of other requests
     run in those same steps instead of stalling behind it).
  2. Then WAITING sequences, strictly first-come first-served: the head of the queue is admitted
     if a sequence slot, some budget and the KV blocks for its first chunk are free; if not,
     admission stops (nobody overtakes it, so no request starves). On admission the prefix cache
     is asked for the longest run of cached blocks of its prompt: those tokens are not computed.
  3. Out of KV blocks for a running sequence? *Preemption by recompute*: the newest running
     sequence gives back all its blocks and goes to the FRONT of the waiting queue with its
     tokens (prompt + what it generated so far). When readmitted it recomputes their KV (often
     partly from the prefix cache) and continues exactly where it was: nothing is lost, only
     compute. The newest goes because it has the least work invested; if the sequence that needs
     the block is itself the newest, it preempts itself.

Any prompt up to `max_model_len` finishes: the pool holds at least one sequence of that length
(the engine checks it) and preemption can always free everything but the oldest sequence.

Book-keeping per sequence: `num_computed_tokens` is how many of its tokens have KV in the cache.
A step computes tokens [num_computed, num_computed + n); when that reaches the end of the
sequence, the step's last position yields logits and a new token is sampled. So a decoding
sequence always has exactly one token (the last sampled) not yet computed.

    python 05_scheduler.py      # watch the queues, the budget and a preemption, step by step
"""
from __future__ import annotations

import importlib
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

paged = importlib.import_module("04_paged_attention")


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request as the scheduler sees it: its tokens and how far their KV has been computed."""
    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    sampling: Any = None                  # its sampling parameters (06_sampling.SamplingConfig)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0          # tokens whose K/V are in the cache
    num_cached_tokens: int = 0            # of those, taken from the prefix cache at the last admission
    num_preemptions: int = 0
    block_table: list[int] = field(default_factory=list)  # the BlockManager's list for this sequence

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_prefill(self) -> bool:
        """True until the prompt (and, after a preemption, the tokens generated before it) is computed."""
        return self.num_tokens - self.num_computed_tokens > 1


@dataclass
class ScheduledBatch:
    """What one model step computes: for each sequence, `num_new_tokens` tokens starting at its
    `num_computed_tokens`. `preempted` lists the sequences that lost their blocks for it."""
    seqs: list[Sequence]
    num_new_tokens: list[int]
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: paged.BlockManager, max_num_seqs: int = 16, max_num_batched_tokens: int = 512):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []        # in admission order, oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        bm = self.block_manager
        batch = ScheduledBatch([], [])
        budget = self.max_num_batched_tokens

        # 1. running sequences, oldest first; preempt from the newest end when blocks run out
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.can_allocate(n, seq.seq_id):
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break                            # it preempted itself: everything after it is gone too
            bm.append_slots(seq.seq_id, n)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            i += 1

        # 2. waiting sequences, first come first served, while slots, budget and blocks last
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not batch.preempted:
            seq = self.waiting[0]
            n = min(seq.num_tokens - bm.cached_prefix_tokens(seq.token_ids), budget)
            if not bm.can_admit(seq.token_ids, n):
                break                            # the head of the queue waits; nobody overtakes it
            cached = bm.allocate(seq.seq_id, seq.token_ids, n)   # shares the cached prefix blocks
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = seq.num_cached_tokens = cached
            seq.block_table = bm.block_tables[seq.seq_id]
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq.seq_id)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.block_table = []
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """A sequence is done (stop condition): its blocks go back to the pool (cached ones stay evictable)."""
        self.block_manager.free(seq.seq_id)
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.block_table = []


def main() -> None:
    """A fake model (the next token is always 1) to watch the scheduling policy alone."""
    from rich.console import Console
    from rich.table import Table
    console = Console()
    bm = paged.BlockManager(num_blocks=9, block_size=4)
    sched = Scheduler(bm, max_num_seqs=3, max_num_batched_tokens=16)
    prompts = {0: 13, 1: 6, 2: 9, 3: 5}
    max_new = {0: 12, 1: 4, 2: 10, 3: 4}
    for sid, plen in prompts.items():
        sched.add(Sequence(sid, list(range(100 * sid, 100 * sid + plen)), plen))
    console.print(f"pool: {bm.num_free_blocks} blocks of {bm.block_size} tokens; budget {sched.max_num_batched_tokens} "
                  f"tokens and {sched.max_num_seqs} sequences per step; prompts {prompts}; outputs {max_new}")
    table = Table("step", "computed this step (seq: tokens)", "waiting", "running", "free blocks", "events")
    step = 0
    while sched.has_unfinished():
        batch = sched.schedule()
        step += 1
        events = [f"preempted seq {s.seq_id}" for s in batch.preempted]
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            bm.commit(seq.seq_id, seq.token_ids[:seq.num_computed_tokens])
            if seq.num_computed_tokens == seq.num_tokens:      # reached the end: a token is sampled
                seq.token_ids.append(1)
                if len(seq.completion_token_ids) == max_new[seq.seq_id]:
                    sched.finish(seq)
                    events.append(f"seq {seq.seq_id} finished")
        work = ", ".join(f"{s.seq_id}:{n}{' (prefill)' if n > 1 else ''}" for s, n in zip(batch.seqs, batch.num_new_tokens))
        table.add_row(str(step), work, str([s.seq_id for s in sched.waiting]), str([s.seq_id for s in sched.running]),
                      str(bm.num_free_blocks), "; ".join(events))
    console.print(table)
    console.print(f"{step} steps, {sched.num_preemptions} preemption(s); all {bm.num_free_blocks} blocks free again.")


if __name__ == "__main__":
    main()
