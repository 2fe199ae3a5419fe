"""
07 - Speculative decoding: a small draft model guesses, the target model checks all guesses at once.

A batch-1 decode step reads every weight to do one row of arithmetic, so checking five tokens costs
about what checking one does. So a cheap *draft* model proposes k tokens one by one, and the *target*
runs once over the last token plus the k guesses: its logits there say what it would have produced at
each position. Keep the guesses it agrees with; at the first it does not, take the target's own
choice. One target forward now yields between 1 and k+1 tokens.

"Agrees with" is defined so the output is *exactly* what the target alone would sample (Leviathan et
al. 2023, Chen et al. 2023). With q the draft's distribution, p the target's at the same position,
and x ~ q the draft's token:

    accept x with probability min(1, p(x) / q(x))
    on rejection, sample instead from  normalize(max(p - q, 0))    (the "residual" r)

Then P(out = x) = q(x) min(1, p(x)/q(x)) + P(reject) r(x) = min(q(x), p(x)) + (p(x) - q(x))^+ = p(x),
because P(reject) = sum_y (p(y) - q(y))^+ is exactly r's normaliser. Position i+1 is only looked at
when position i was accepted, so this repeats along the run; when all k pass, the target's logits at
the last position give one more token for free (the "bonus" token, sampled from p). For example:

    token            A     B     C     D
    target p        .50   .30   .15   .05
    draft  q        .30   .50   .10   .10
    min(p, q)       .30   .30   .10   .05      sum .75: a draft token passes 75% of the time
    residual r      .80   0     .20   0        normalize(max(p - q, 0)) = [.2 0 .05 0] / .25
    P(out)          .50   .30   .15   .05      min(p, q) + (1 - .75) r: that is p
    (the draft says B: accepted with probability p/q = .6, else replaced by A (80%) or C (20%))

Greedy decoding (temperature 0) is the limit of the same rule: p and q become one-hots, so a guess is
accepted iff it is the target's argmax, and the residual is the target's argmax. Temperature, top-k,
top-p and min-p shape p and q alike (06's Sampler.probs): a request samples what it would alone.

What it costs: with alpha the chance that a guess passes (the same at every position) and c the
draft's cost per forward relative to the target's, a step yields (1 - alpha^(k+1)) / (1 - alpha)
tokens for c k + 1 target forwards of time. A draft that is rarely right (alpha -> 0) makes things
slower by c k + 1: speculation is a bet on the draft.

    expected speedup = (1 - alpha^(k+1)) / ((1 - alpha) (c k + 1))         (expected_speedup)
    alpha = 0.8, c = 0.1, k = 4: 3.36 tokens per step for 1.4 forwards = 2.4x

In the engine: draft and target each keep a paged KV cache (04) keyed by the same sequence ids. Each
sequence that samples this step gets up to k guesses: the draft first catches up on what it has not
computed (the prompt, last step's replacement or bonus token, all after a preemption) in one packed
forward, then proposes one token per forward. ONE target forward computes the prefill chunks and
every last token + guesses (a verify span is just a prefill chunk of k+1 tokens), `rejection_sample`
decides for the whole batch, and both caches roll back past the accepted length (`BlockManager.truncate`:
no block leaks); only verified tokens reach the prefix cache. k is capped by max_tokens and max_model_len.

The built-in draft (no --draft-model) is the target's own first layers, embeddings, final norm and
lm_head, shared (`early_exit_draft`, LayerSkip's "early exit"). With real weights the last layers
mostly refine what earlier ones predict; with the random `demo` weights every layer moves the residual
stream as much as the embedding does: the first 21 of 28 layers pass 13% of greedy guesses, 25 layers
44%, 27 layers 73%. Keeping 7/8 of them shows guesses accepted and rejected but costs too much (c ~ 0.9)
to speed anything up: for speed use a real small draft (`--draft-model Qwen/Qwen3-0.6B`, 1.7B+ target).

A seeded request draws position t's randomness from make_generator(seed, t) (06) and guesses once past k (accepted
or replaced in the bonus's place): its tokens depend on its seed, draft and text, not on k, pool, batch. Greedy ids
equal the target's bit for bit in fp32; in bf16 a (k+1)-token verify pass rounds unlike a 1-token
decode and can flip near-tied argmaxes, as chunked prefill does (so the target as its own draft
accepts ~80-90%, not 100%). Acceptance metrics are named as vLLM names them (SpecDecodingStats).

    python 07_speculative.py     # accept/reject step by step on a toy p and q, the histogram, a draft/target run
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

T = importlib.import_module("01_tokenize")
M = importlib.import_module("02_model")
kv = importlib.import_module("03_kv_cache")
paged = importlib.import_module("04_paged_attention")
sched = importlib.import_module("05_scheduler")
S = importlib.import_module("06_sampling")

# ----------------------------------------------------------------------------- the rule

def _race_noise(vocab: int, generator, device) -> torch.Tensor:
    """(vocab,) Exp(1) draws for 06's exponential race (argmax p / E ~ p), floored so 0/0 never happens."""
    return S.exponential_noise(1, vocab, generator, device)[0].clamp_(min=torch.finfo(torch.float32).tiny)


def sample_from_probs(probs: torch.Tensor, greedy: list[bool], generators: list) -> torch.Tensor:
    """One token per row of probs (B, V) as 06's Sampler draws it: the argmax for greedy rows, else the race."""
    tokens = probs.argmax(dim=1)                                                     # (B,)
    for r, gen in enumerate(generators):
        if not greedy[r]:
            tokens[r] = (probs[r] / _race_noise(probs.shape[1], gen, probs.device)).argmax()
    return tokens


def rejection_sample(draft_token_ids: torch.Tensor, num_draft_tokens: torch.Tensor, draft_probs: torch.Tensor,
                     target_probs: torch.Tensor, greedy: list[bool], generators: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Decide a batch of guesses at once (vLLM's RejectionSampler). Row r's guesses are draft_token_ids[r, :n],
    n = num_draft_tokens[r] (n = 0: plain decoding); guess i was drawn from q_i, draft_probs (B, k, V), and
    target_probs (B, k+1, V) holds p_i (p_n for the bonus). Row r draws n uniforms, then V exponentials for
    the last token from generators[r] (greedy rows nothing): one generator (None: the global RNG), or a list
    of one per position, where n items (none for the bonus) mean the row takes no bonus. Returns
    output_token_ids (B, k+1): accepted guesses, the replacement or bonus token, then -1; and num_accepted (B,)."""
    B, k, V = draft_probs.shape
    device = target_probs.device
    in_draft = torch.arange(k, device=device)[None, :] < num_draft_tokens[:, None]  # (B, k)
    x = (draft_token_ids * in_draft)[..., None]                                     # (B, k, 1) padding -> token 0
    q_x = draft_probs.gather(2, x)[..., 0].double()                                 # (B, k) q_i(x_i)
    p_x = target_probs[:, :k].gather(2, x)[..., 0].double()                         # (B, k) p_i(x_i)
    u = torch.zeros(B, k, dtype=torch.float64, device=device)                       # (B, k) greedy rows: 0
    gens = [g if isinstance(g, list) else [g] * (k + 1) for g in generators]        # row r, position i: gens[r][i]
    for r, n in enumerate(num_draft_tokens.tolist()):
        for i in range(n if not greedy[r] else 0):
            u[r, i] = torch.rand(1, dtype=torch.float64, generator=gens[r][i], device=device)[0]
    # u < p/q, written without the division (q_x > 0: x was drawn from q). Greedy: 0 < p_x, i.e. x is the argmax.
    accepted = (u * q_x < p_x) & in_draft                                           # (B, k)
    run = accepted.long().cumprod(dim=1)                                            # (B, k) 1 until the first rejection
    num_accepted = run.sum(dim=1)                                                   # (B,)
    rows = torch.arange(B, device=device)
    p_a = target_probs[rows, num_accepted]                                          # (B, V) p after the accepted run
    q_a = draft_probs[rows, num_accepted.clamp(max=k - 1)] if k else torch.zeros_like(p_a)   # (B, V)
    rejected = (num_accepted < num_draft_tokens)[:, None]                           # (B, 1)
    # at a rejection the residual max(p - q, 0) (unnormalised: the race does not need it), else the bonus from p
    residual = torch.where(rejected, (p_a - q_a).clamp(min=0), p_a)                 # (B, V)
    # A rejection means p(x) < q(x), so p - q has mass somewhere; only float rounding can empty it.
    residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, p_a)
    last = residual.argmax(dim=1)                                                   # (B,) greedy rows: the argmax
    for r, a in enumerate(num_accepted.tolist()):
        if not greedy[r] and a < len(gens[r]):                                      # a list of n: no bonus
            last[r] = (residual[r] / _race_noise(V, gens[r][a], device)).argmax()
    out = F.pad(torch.where(run.bool(), draft_token_ids, -1), (0, 1), value=-1)     # (B, k+1)
    out[rows, num_accepted] = last
    return out, num_accepted


def expected_speedup(alpha: float, k: int, c: float) -> float:
    """Leviathan et al.'s expected walltime improvement (see the top); alpha = 1 is the limit (k+1) / (c k + 1)."""
    tokens = k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens / (c * k + 1)


@dataclass
class SpecDecodingStats:
    """Counts of one run, named as vLLM's SpecDecodingStats (a draft: one step where a sequence guessed).
    Position i of a draft is *checked* when guesses 0..i-1 were all accepted (later ones are never looked at)."""
    num_spec_tokens: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)
    num_checked_tokens_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.num_accepted_tokens_per_pos = self.num_accepted_tokens_per_pos or [0] * self.num_spec_tokens
        self.num_checked_tokens_per_pos = self.num_checked_tokens_per_pos or [0] * self.num_spec_tokens

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        for i in range(min(num_accepted + 1, num_draft_tokens)):     # guess i was checked, and accepted if i < a
            self.num_checked_tokens_per_pos[i] += 1
            self.num_accepted_tokens_per_pos[i] += i < num_accepted

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        """vLLM's per-position acceptance: the fraction of drafts whose guess i was accepted."""
        return [a / self.num_drafts if self.num_drafts else 0.0 for a in self.num_accepted_tokens_per_pos]

    @property
    def alpha_per_position(self) -> list[float]:
        """The chance guess i passes given it was checked: the per-position alpha of expected_speedup."""
        return [a / c if c else 0.0 for a, c in zip(self.num_accepted_tokens_per_pos, self.num_checked_tokens_per_pos)]

    @property
    def alpha(self) -> float:
        """accepted / checked: the maximum-likelihood alpha for expected_speedup (unchecked guesses don't count)."""
        return self.num_accepted_tokens / max(1, sum(self.num_checked_tokens_per_pos))

    def summary(self) -> dict:
        return {"spec_num_drafts": self.num_drafts, "spec_draft_tokens": self.num_draft_tokens,
                "spec_accepted_tokens": self.num_accepted_tokens,
                "spec_acceptance_rate": round(self.acceptance_rate, 4),
                "spec_mean_acceptance_length": round(self.mean_acceptance_length, 4),
                "spec_acceptance_per_position": [round(a, 4) for a in self.acceptance_per_position]}


# ----------------------------------------------------------------------------- the draft

def default_draft_layers(num_layers: int) -> int:
    """Layers the built-in draft keeps: 7/8, at least one fewer than the target (25 of 28, 2 of `tiny`'s 3)."""
    return max(1, num_layers - max(1, num_layers // 8))


def early_exit_draft(target: M.Qwen3ForCausalLM, num_layers: int) -> M.Qwen3ForCausalLM:
    """A draft of the target's first num_layers layers, embeddings, final norm and lm_head: shared, not copied."""
    if not 1 <= num_layers <= target.config.num_hidden_layers:
        raise ValueError(f"an early-exit draft needs 1..{target.config.num_hidden_layers} layers, got {num_layers}")
    with torch.device("meta"):  # the skeleton only; every module is replaced by the target's
        draft = M.Qwen3ForCausalLM(dataclasses.replace(target.config, num_hidden_layers=num_layers))
    draft.model.embed_tokens = target.model.embed_tokens
    draft.model.layers = nn.ModuleList(target.model.layers[:num_layers])
    draft.model.norm = target.model.norm
    draft.lm_head = target.lm_head
    return draft.eval()


def check_same_vocabulary(target_cfg: M.ModelConfig, draft_cfg: M.ModelConfig, target_tokenizer,
                          draft_tokenizer, draft_name: str) -> None:
    """A draft must speak the target's vocabulary: token id i has to mean the same string in both."""
    if draft_cfg.vocab_size != target_cfg.vocab_size:
        raise ValueError(f"draft model {draft_name!r} has vocab_size {draft_cfg.vocab_size}, the target has "
                         f"{target_cfg.vocab_size}: speculative decoding needs the same vocabulary")
    if draft_tokenizer.hf.get_vocab(with_added_tokens=True) != target_tokenizer.hf.get_vocab(with_added_tokens=True):
        raise ValueError(f"draft model {draft_name!r} has a different tokenizer than the target: "
                         "speculative decoding needs the same vocabulary")


def load_draft(target: M.Qwen3ForCausalLM, target_folder: str, target_tokenizer, name: str | None, load):
    """The draft for `name`: None, the target's own first layers (shared weights, no copy); the
    target's own folder, the target itself (acceptance ~1: a check, not a speedup); else any Qwen3
    checkpoint with the target's vocabulary, loaded by load(folder) (a ValueError if the vocabulary differs)."""
    if name is None:
        return early_exit_draft(target, default_draft_layers(target.config.num_hidden_layers))
    folder = M.resolve_model(name)
    if os.path.realpath(folder) == os.path.realpath(target_folder):
        return target
    check_same_vocabulary(target.config, M.load_config(folder), target_tokenizer, T.load_tokenizer(folder), name)
    return load(folder)


def forward_spans(model, kv_cache, block_manager, spans, token_ids: list[int],
                  logits_indices: list[int], backend=paged.TORCH_SDPA) -> torch.Tensor:
    """One packed forward over the paged cache: span (seq_id, start, end) computes positions [start, end) of its
    sequence, token_ids holds all spans' tokens back to back. fp32 logits (L, V) at logits_indices; backend: 04's."""
    device = kv_cache.device
    positions = [p for _, start, end in spans for p in range(start, end)]
    ctx = paged.PagedContext.from_spans(kv_cache, block_manager, spans, backend=backend)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    hidden = model(as_tensor(token_ids), as_tensor(positions), ctx)                 # (N, hidden)
    return model.compute_logits(hidden[as_tensor(logits_indices)]).float()          # (L, V)


class DraftRunner:
    """The draft model with its own paged KV cache and BlockManager, keyed by the target's sequence ids. Its
    `num_computed_tokens` may lag the target's: it catches up when it next proposes."""

    def __init__(self, model, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 backend=paged.TORCH_SDPA):
        weight = model.model.embed_tokens.weight
        self.model, self.backend = model, backend
        self.kv_cache = paged.allocate_kv_cache(model.config, num_blocks, block_size, weight.dtype, weight.device)
        self.block_manager = paged.BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.num_computed_tokens: dict[int, int] = {}
        self.sampler = S.Sampler()

    def _reserve(self, seq, k: int) -> int:
        """Slots for catching up and for guesses 1..k-1 (guess k is never fed back): n + k - 1 in all.
        Returns the largest k <= the asked one that fits in the pool (0: the sequence skips drafting)."""
        bm, sid = self.block_manager, seq.seq_id
        for j in range(k, 0, -1):
            total = seq.num_tokens + j - 1
            if sid in bm.block_tables:
                if bm.can_allocate(total - bm.num_tokens[sid], sid):
                    bm.append_slots(sid, total - bm.num_tokens[sid])
                    return j
            elif bm.can_allocate(total):
                self.num_computed_tokens[sid] = bm.allocate(sid, seq.token_ids)   # prefix hits count as computed
                bm.append_slots(sid, j - 1)
                return j
        return 0

    @torch.inference_mode()
    def propose(self, seqs, num_tokens: list[int], generators: list) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Up to num_tokens[i] guesses for seqs[i] from the draft's q shaped by the request's knobs, guess j drawn with
        generators[i][j] (generators[i] None: the global RNG). Returns draft_token_ids (B, k_max), draft_probs
        (B, k_max, V) (zero past a row's guesses) and how many each row got."""
        ks = [self._reserve(seq, k) if k else 0 for seq, k in zip(seqs, num_tokens)]
        k_max, V, device = max(ks, default=0), self.model.config.vocab_size, self.kv_cache.device
        draft_token_ids = torch.zeros(len(seqs), k_max, dtype=torch.int64, device=device)   # (B, k_max)
        draft_probs = torch.zeros(len(seqs), k_max, V, device=device)                       # (B, k_max, V)
        for j in range(k_max):
            rows = [i for i, k in enumerate(ks) if k > j]
            spans, token_ids = [], []
            for i in rows:
                seq = seqs[i]
                if j == 0:   # catch up: every token not computed yet, the last one's logits give q_1
                    start = self.num_computed_tokens[seq.seq_id]
                    token_ids += seq.token_ids[start:]
                else:        # feed back guess j at position n - 1 + j
                    start = seq.num_tokens - 1 + j
                    token_ids.append(int(draft_token_ids[i, j - 1]))
                spans.append((seq.seq_id, start, seq.num_tokens + j))
            last = torch.tensor([e - s for _, s, e in spans]).cumsum(0) - 1
            logits = forward_spans(self.model, self.kv_cache, self.block_manager, spans, token_ids, last.tolist(),
                                   self.backend)
            q = self.sampler.probs(logits, [seqs[i].sampling for i in rows])                # (R, V)
            draft_token_ids[rows, j] = sample_from_probs(q, [seqs[i].sampling.greedy for i in rows],
                                                         [generators[i] and generators[i][j] for i in rows])
            draft_probs[rows, j] = q
        for seq, k in zip(seqs, ks):
            if k:
                self.num_computed_tokens[seq.seq_id] = seq.num_tokens + k - 1
        return draft_token_ids, draft_probs, ks

    def rollback(self, seq_id: int, verified_token_ids: list[int]) -> None:
        """After verification: keep the draft's KV for verified tokens only and commit their full blocks."""
        if seq_id not in self.num_computed_tokens:
            return
        bm = self.block_manager
        n = self.num_computed_tokens[seq_id] = min(self.num_computed_tokens[seq_id], len(verified_token_ids))
        bm.truncate(seq_id, bm.num_tokens[seq_id] - n)
        bm.commit(seq_id, verified_token_ids[:n])

    def free(self, seq_id: int) -> None:
        """The sequence finished or was preempted: give its blocks back (cached ones stay evictable)."""
        if seq_id in self.num_computed_tokens:
            self.block_manager.free(seq_id)
            del self.num_computed_tokens[seq_id]


# ----------------------------------------------------------------------------- draft + target

@dataclass
class VerifiedTokens:
    """What one sequence got from one speculative step."""
    seq: object
    token_ids: list[int]            # accepted guesses, then the replacement or bonus token
    draft_token_ids: list[int]      # the guesses ([] when it could not guess this step)
    draft_probs: list[float]        # q(x) of each guess
    target_probs: list[float]       # p(x) of each guess
    num_accepted: int
    target_logits: torch.Tensor     # (len(draft_token_ids) + 1, V): the target's logits at each verified position


class SpeculativeDecoder:
    """One engine step with speculation (see the top). `step` does not append the new tokens to the sequences:
    the caller does, one at a time through its stop rules."""

    def __init__(self, model, kv_cache, block_manager, draft: DraftRunner, num_speculative_tokens: int,
                 max_model_len: int, backend=paged.TORCH_SDPA):
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.model, self.kv_cache, self.block_manager = model, kv_cache, block_manager
        self.draft, self.backend = draft, backend
        self.num_speculative_tokens, self.max_model_len = num_speculative_tokens, max_model_len
        self.sampler = S.Sampler()
        self.stats = SpecDecodingStats(num_speculative_tokens)

    def num_to_draft(self, seq) -> int:
        """k, cut so the step's up to k + 1 new tokens never pass max_tokens or max_model_len."""
        generated = seq.num_tokens - seq.num_prompt_tokens
        room = min(seq.sampling.max_tokens - generated, self.max_model_len - seq.num_tokens)
        return max(0, min(self.num_speculative_tokens, room - 1))

    def free(self, seq_id: int) -> None:
        self.draft.free(seq_id)

    @torch.inference_mode()
    def step(self, batch) -> list[VerifiedTokens]:
        """One VerifiedTokens per sampling sequence (no tokens for one whose logits are not finite: a broken model)."""
        for seq in batch.preempted:
            self.draft.free(seq.seq_id)
        bm = self.block_manager
        sampling = [i for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
                    if seq.num_computed_tokens + n == seq.num_tokens]
        seqs = [batch.seqs[i] for i in sampling]
        # target slots for the guesses (the scheduler reserved the step's own tokens), then the guesses
        wanted = []
        for seq in seqs:
            k = self.num_to_draft(seq)
            while k and not bm.can_allocate(k, seq.seq_id):
                k -= 1
            bm.append_slots(seq.seq_id, k)
            wanted.append(k)
        extra = [int(s.sampling.seed is not None and not s.sampling.greedy) for s in seqs]   # 1: a guess past k
        gens = [[S.make_generator(s.sampling.seed, self.kv_cache.device, s.num_tokens + j) for j in range(k + 1)]
                if e else None for s, k, e in zip(seqs, wanted, extra)]
        draft_token_ids, draft_probs, kd = self.draft.propose(seqs, [k + e for k, e in zip(wanted, extra)], gens)
        ks = [max(0, k - e) for k, e in zip(kd, extra)]                             # the guesses the target checks
        gens = [g and g[:max(k, 1)] for g, k in zip(gens, kd)]                      # no bonus after a guess past k
        for seq, want, k in zip(seqs, wanted, ks):
            bm.truncate(seq.seq_id, want - k)      # the draft's pool could not hold them all

        # one target forward: prefill chunks, and last token + guesses of every sampling sequence
        row_of = {i: r for r, i in enumerate(sampling)}
        spans, token_ids, logits_indices = [], [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            token_ids += seq.token_ids[start:start + n]
            k = ks[row_of[i]] if i in row_of else 0
            if i in row_of:
                token_ids += draft_token_ids[row_of[i], :k].tolist()
                logits_indices += range(len(token_ids) - k - 1, len(token_ids))
            spans.append((seq.seq_id, start, start + n + k))
        logits = forward_spans(self.model, self.kv_cache, bm, spans, token_ids, logits_indices, self.backend)  # (L, V)
        if not sampling:   # only prefill chunks that do not reach the end: nothing to sample
            self._advance(batch)
            return []
        probs = self.sampler.probs(logits, [s.sampling for s, k in zip(seqs, ks) for _ in range(k + 1)])  # (L, V)
        k_max, V = draft_token_ids.shape[1], logits.shape[1]
        row = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(ks) + 1).to(logits.device)  # (L,)
        pos = torch.cat([torch.arange(k + 1) for k in ks]).to(logits.device)                          # (L,)
        target_probs = probs.new_zeros(len(seqs), k_max + 1, V)                            # (S, k_max+1, V)
        target_probs[row, pos] = probs
        out, num_accepted = rejection_sample(draft_token_ids, torch.tensor(kd, device=logits.device), draft_probs,
                                             target_probs, [s.sampling.greedy for s in seqs], gens)
        x = draft_token_ids[..., None]
        q_x = draft_probs.gather(2, x)[..., 0].tolist()                                   # (S, k_max)
        p_x = target_probs[:, :k_max].gather(2, x)[..., 0].tolist()                       # (S, k_max)

        self._advance(batch, skip=set(sampling))
        results, out, offset, finite = [], out.tolist(), 0, logits.isfinite().all(dim=1).tolist()
        for r, (seq, k, a) in enumerate(zip(seqs, ks, num_accepted.tolist())):
            new = out[r][:min(a, k) + 1] if all(finite[offset:offset + k + 1]) else []
            a = min(a, k)                                      # a guess past k is not the target's to count
            verified = seq.token_ids + new[:a]                 # every token whose KV is now right, in both models
            seq.num_computed_tokens = len(verified)
            bm.truncate(seq.seq_id, k - a)
            bm.commit(seq.seq_id, verified)
            self.draft.rollback(seq.seq_id, verified)
            if k:
                self.stats.observe(k, a)
            results.append(VerifiedTokens(seq, new, draft_token_ids[r, :k].tolist(), q_x[r][:k], p_x[r][:k], a,
                                          logits[offset:offset + k + 1]))
            offset += k + 1
        return results

    def _advance(self, batch, skip=frozenset()) -> None:
        """Prefill chunks that do not sample: their tokens are computed, full blocks committed."""
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if i not in skip:
                seq.num_computed_tokens += n
                self.block_manager.commit(seq.seq_id, seq.token_ids[:seq.num_computed_tokens])


def generate(model, draft_model, prompts: list[list[int]], params: list, num_speculative_tokens: int,
             num_blocks: int = 256, block_size: int = 16, max_model_len: int = 1024,
             max_num_seqs: int = 256) -> tuple[list[list[int]], SpeculativeDecoder]:
    """The smallest loop around SpeculativeDecoder (05's Scheduler, max_tokens the only stop rule) for the demo
    and tests; params[i] is prompt i's SamplingConfig. Returns the ids per prompt and the decoder."""
    weight = model.model.embed_tokens.weight
    bm = paged.BlockManager(num_blocks, block_size)
    kv_cache = paged.allocate_kv_cache(model.config, num_blocks, block_size, weight.dtype, weight.device)
    decoder = SpeculativeDecoder(model, kv_cache, bm, DraftRunner(draft_model, num_blocks, block_size),
                                 num_speculative_tokens, max_model_len)
    scheduler = sched.Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=max(512, max_num_seqs))
    seqs = [sched.Sequence(i, list(p), len(p), params[i]) for i, p in enumerate(prompts)]
    for seq in seqs:
        scheduler.add(seq)
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        for v in decoder.step(batch):
            v.seq.token_ids += v.token_ids
            if len(v.seq.completion_token_ids) >= v.seq.sampling.max_tokens:
                scheduler.finish(v.seq)
                decoder.free(v.seq.seq_id)
    return [s.completion_token_ids for s in seqs], decoder


@torch.inference_mode()
def measure_cost_ratio(target, draft, context_len: int = 64, rounds: int = 5, repeats: int = 4) -> float:
    """c for expected_speedup: the draft's median time for a 1-token decode forward after context_len cached tokens,
    over the target's; warmed up, then rounds of `repeats` forwards alternating, so load changes slow both alike."""
    caches, times = [], ([], [])
    for model in (draft, target):
        weight = model.model.embed_tokens.weight
        caches.append(kv.KVCache(model.config, context_len + rounds * repeats + 1, weight.dtype, weight.device))
        kv.cached_forward(model, caches[-1], torch.zeros(context_len, dtype=torch.int64, device=weight.device))
    device = target.model.embed_tokens.weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    token = torch.zeros(1, dtype=torch.int64, device=device)
    for _ in range(rounds):
        for model, cache, log in zip((draft, target), caches, times):
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                model.compute_logits(kv.cached_forward(model, cache, token))
                sync()
                log.append(time.perf_counter() - t0)
    return statistics.median(times[0]) / statistics.median(times[1])


# ----------------------------------------------------------------------------- demo

def main() -> int:
    import tempfile
    from rich.console import Console
    from rich.table import Table
    t_start = time.perf_counter()
    console = Console()
    words = ["A", "B", "C", "D"]
    p = torch.tensor([0.50, 0.30, 0.15, 0.05])
    q = torch.tensor([0.30, 0.50, 0.10, 0.10])
    residual = (p - q).clamp(min=0)   # unnormalised: the race does not need it
    table = Table("token", "target p", "draft q", "min(p, q)", "residual", box=None, padding=(0, 2))
    for i, w in enumerate(words):
        table.add_row(w, f"{p[i]:.2f}", f"{q[i]:.2f}", f"{min(p[i], q[i]):.2f}", f"{residual[i] / residual.sum():.2f}")
    console.print("[bold]One guess, toy distributions[/]: accept x ~ q with probability min(1, p(x)/q(x)), "
                  "else sample the residual normalize(max(p - q, 0))")
    console.print(table)
    console.print(f"a guess passes with probability sum min(p, q) = {torch.minimum(p, q).sum():.2f}\n")

    gen = S.make_generator(0)
    steps = Table("trial", "guess x ~ q", "p(x)/q(x)", "u", "verdict", "output", box=None, padding=(0, 2))
    for trial in range(8):
        x = int(sample_from_probs(q[None], [False], [gen])[0])
        u = float(torch.rand(1, dtype=torch.float64, generator=gen))
        ratio = float(p[x] / q[x])
        verdict, y = "[green]accept[/]", x
        if u >= ratio:
            verdict, y = "[red]reject[/]: residual", int(sample_from_probs(residual[None], [False], [gen])[0])
        steps.add_row(str(trial), words[x], f"{ratio:.2f}", f"{u:.2f}", verdict, words[y])
    console.print(steps)
    n = 20000
    # rejection_sample with one guess per row: the guess must really be drawn from q, so draw it first
    draft_ids = sample_from_probs(q.expand(n, 4), [False] * n, [gen] * n)[:, None]
    out, accepted = rejection_sample(draft_ids, torch.ones(n, dtype=torch.int64), q.expand(n, 1, 4), p.expand(n, 2, 4),
                                     [False] * n, [gen] * n)
    freq = torch.bincount(out[:, 0], minlength=4) / n
    hist = Table("token", "target p", f"first output token, {n:,} trials", "draft q", box=None, padding=(0, 2))
    for i, w in enumerate(words):
        hist.add_row(w, f"{p[i]:.3f}", f"{freq[i]:.3f}", f"{q[i]:.3f}")
    console.print(f"\n[bold]{n:,} trials of rejection_sample[/]: {accepted.float().mean():.3f} of the guesses accepted "
                  f"(expected {torch.minimum(p, q).sum():.2f}), and the output follows p, not q:")
    console.print(hist)
    if (freq - p).abs().max() > 0.02:
        raise SystemExit("the outputs do not follow the target distribution")

    with tempfile.TemporaryDirectory() as tmp:
        folder = M.make_random_checkpoint(tmp, "tiny", seed=0, dtype="float32")
        target = M.load_model(folder, torch.float32)
        tok = T.load_tokenizer(folder)
    prompts = [tok.encode(t) for t in ("The capital of France is", "Speculative decoding")]
    greedy = S.SamplingConfig(temperature=0, max_tokens=16, ignore_eos=True)
    reference = [kv.generate_with_cache(target, p, 16) for p in prompts]
    L, k = target.config.num_hidden_layers, 4
    console.print(f"\n[bold]draft/target runs[/]: the `tiny` preset ({L} layers, random weights) as the target, "
                  f"greedy, {len(prompts)} prompts x 16 tokens, k = {k}")
    runs = Table("draft", "drafts", "guesses", "accepted", "rate", "mean len", "alpha", "c", "expected",
                 box=None, padding=(0, 1))
    for name, draft in ((f"{L - 1} of {L} layers", early_exit_draft(target, L - 1)), ("the target", target)):
        ids, decoder = generate(target, draft, prompts, [greedy] * len(prompts), k)
        if ids != reference:
            raise SystemExit("speculative greedy decoding differs from the target's greedy ids")
        st, c = decoder.stats, 1.0 if draft is target else measure_cost_ratio(target, draft)
        runs.add_row(name, str(st.num_drafts), str(st.num_draft_tokens), str(st.num_accepted_tokens),
                     f"{st.acceptance_rate:.2f}", f"{st.mean_acceptance_length:.2f}", f"{st.alpha:.2f}",
                     f"{c:.2f}", f"{expected_speedup(st.alpha, k, c):.2f}x")
        per_position = ", ".join(f"{a:.2f}" for a in st.acceptance_per_position)
        console.print(f"  {name}: acceptance per position {per_position}; ids == the target's greedy ids")
    console.print(runs)
    console.print("rate = accepted / guesses, mean len = 1 + accepted / drafts, alpha = accepted / checked, "
                  "c = draft/target time per decode forward, expected = expected_speedup(alpha, k, c).\n"
                  "Random weights: the truncated draft rarely agrees; a speedup needs a cheap, usually right draft.")
    console.print(f"[dim]done in {time.perf_counter() - t_start:.1f}s[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
