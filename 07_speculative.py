"""
07 - Speculative decoding: a small draft model guesses, the target model checks all guesses at once.

Decoding one token per forward is wasteful on a GPU: a batch-1 decode step reads every weight of the
model to do one row of arithmetic, and checking five tokens costs about what checking one does. So
let a cheap *draft* model propose k tokens autoregressively, then run the *target* once over the
last token plus the k guesses: its logits at those k+1 positions say, for each guess, what the
target itself would have produced there. Keep the guesses it agrees with; at the first it does not,
take the target's own choice instead. One target forward now yields between 1 and k+1 tokens.

"Agrees with" has to be defined so the output is *exactly* what the target alone would sample
(Leviathan et al. 2023, Chen et al. 2023). With q the draft's distribution and p the target's at
the same position, and x ~ q the draft's token:

    accept x with probability min(1, p(x) / q(x))
    on rejection, sample instead from  normalize(max(p - q, 0))    (the "residual")

Why the result is distributed as p: P(out = x) = q(x) min(1, p(x)/q(x)) + P(reject) r(x)
= min(q(x), p(x)) + (p(x) - q(x))^+ = p(x), because P(reject) = sum_y (p(y) - q(y))^+ is exactly
the normaliser of the residual r. Position i+1 is only looked at when position i was accepted, so
the argument repeats along the run. When all k pass, the target's logits at the last position
give one more token for free (the "bonus" token, sampled from p). Worked example, 4 tokens:

    token            A     B     C     D
    target p        .50   .30   .15   .05
    draft  q        .30   .50   .10   .10
    min(p, q)       .30   .30   .10   .05      sum .75: a draft token passes 75% of the time
    residual        .80   0     .20   0        normalize(max(p - q, 0)) = [.2 0 .05 0] / .25

    the draft says B (q = .5):  accepted with probability p/q = .6, else A (80%) or C (20%)
    P(out = A) = .30 x 1 + .25 x .8 = .50      P(out = B) = .50 x .6 = .30
    P(out = C) = .10 x 1 + .25 x .2 = .15      P(out = D) = .10 x .5 = .05     ... that is p.

Greedy decoding (temperature 0) is the limit of the same rule: p and q become one-hots on their
argmaxes, so a guess is accepted iff it is the target's argmax, and the residual is the target's
argmax. The output ids are the target's greedy ids. Temperature, top-k, top-p and min-p shape p
and q the same way (06's Sampler.probs), so a request samples what it would without a draft.

What it costs: with alpha the chance that a guess passes (assumed the same at every position) and
c the draft's cost per forward relative to the target's, one step produces on average
(1 - alpha^(k+1)) / (1 - alpha) tokens for c*k + 1 target-forwards of time, so

    expected speedup = (1 - alpha^(k+1)) / ((1 - alpha) (c k + 1))         (expected_speedup)

alpha = 0.8, c = 0.1, k = 4: 3.36 tokens per step for 1.4 forwards: 2.4x. A draft that is rarely
right (alpha -> 0) makes things slower by c k + 1: speculation is a bet on the draft.

In the engine: draft and target each keep their own paged KV cache (04), keyed by the same
sequence ids. Each step, every sequence that samples (the end of its prefill, or a decode) gets
up to k guesses: the draft first catches up on the tokens it has not computed (the prompt, the
last step's replacement/bonus token, everything after a preemption) in one packed forward, then
proposes one token per forward. The target computes the scheduled prefill chunks and each
sequence's last token + guesses in ONE forward (a verify span is just a prefill chunk of k+1
tokens), `rejection_sample` decides for the whole batch at once, and both caches are rolled back
past the accepted length (`BlockManager.truncate`: no block leaks). Only verified tokens are
committed to the prefix cache. k is capped so a step never goes past max_tokens or max_model_len.

The built-in draft when no --draft-model is given: the target's own first layers, embeddings,
final norm and lm_head (shared, no copy: `early_exit_draft`, the "early exit" of LayerSkip).
With real weights, the last layers mostly refine what the earlier ones already predict. With the
random `demo` weights they do not: every random layer moves the residual stream as much as the
embedding does, so the argmax over 151,936 tokens only survives if almost every layer is kept.
Greedy acceptance of the first N of 28 layers, measured on `demo` (48 positions):

    N       1-12    14    18    21    23    24    25    26    27
    alpha   0.00   .02   .04   .13   .23   .27   .44   .48   .73

so the built-in draft keeps 7/8 of the layers (25 of 28; in the engine, bf16, k = 4: alpha 0.32
greedy and 0.53 at T = 1): enough to watch guesses being accepted and rejected, far too expensive
to speed anything up (c ~ 0.9, expected speedup ~0.3-0.45x, and that is what it measures). It
shows the mechanism; for speed use a real small draft (`--draft-model Qwen/Qwen3-0.6B` for a
1.7B or larger target).

Seeds: per step a seeded request draws its k guesses, k uniforms and one race for the last token,
all from its own generator, so it is reproducible for a given (seed, draft, k) whatever else is
batched; only a full KV pool, which makes it guess fewer tokens that step, changes the draws (the
result is still exactly distributed, just another sample). Precision: greedy ids equal the
target's bit for bit in fp32. In bf16 a (k+1)-token verify pass rounds differently from a 1-token
decode, so where the top two logits are within rounding the argmax can flip, exactly as it does
in the plain engine when chunked prefill changes the shapes; for the same reason the target as
its own draft accepts 100% of its guesses in fp32 but ~80-90% in bf16.

Metrics, named as vLLM names them: drafts (steps where a sequence guessed), draft tokens, accepted
tokens, acceptance rate = accepted / draft tokens, mean acceptance length = 1 + accepted / drafts
(the bonus or replacement token included), and the acceptance per position.

    python 07_speculative.py     # accept/reject step by step on a toy p and q, the histogram, a draft/target run
"""
from __future__ import annotations

import dataclasses
import importlib
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    """One token per row of probs (B, V), as 06's Sampler draws it: greedy rows take the argmax, the
    others win an exponential race with V draws from their own generator (or the global RNG)."""
    tokens = probs.argmax(dim=1)                                                     # (B,)
    for r, gen in enumerate(generators):
        if not greedy[r]:
            tokens[r] = (probs[r] / _race_noise(probs.shape[1], gen, probs.device)).argmax()
    return tokens


def rejection_sample(draft_token_ids: torch.Tensor, num_draft_tokens: torch.Tensor, draft_probs: torch.Tensor,
                     target_probs: torch.Tensor, greedy: list[bool],
                     generators: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Decide a batch of guesses at once (vLLM's RejectionSampler).

    draft_token_ids (B, k): row r's first num_draft_tokens[r] entries are its guesses x_1..x_n (n may be
        0: then the row just samples from p_0, which is plain decoding);
    draft_probs (B, k, V): q_i, the distribution guess i was drawn from;
    target_probs (B, k+1, V): p_i, the target's distribution at each position (p_n for the bonus).
    Row r draws, from its own generator and in this order: n uniforms, then V exponentials for the
    last token (greedy rows draw nothing), so a seeded request's draws never depend on the batch.

    Returns output_token_ids (B, k+1): the accepted guesses, then the replacement or bonus token,
    then -1; and num_accepted (B,). A row's new tokens are output_token_ids[r, :num_accepted[r] + 1].
    """
    B, k, V = draft_probs.shape
    device = target_probs.device
    in_draft = torch.arange(k, device=device)[None, :] < num_draft_tokens[:, None]  # (B, k)
    x = (draft_token_ids * in_draft)[..., None]                                     # (B, k, 1) padding -> token 0
    q_x = draft_probs.gather(2, x)[..., 0].double()                                 # (B, k) q_i(x_i)
    p_x = target_probs[:, :k].gather(2, x)[..., 0].double()                         # (B, k) p_i(x_i)
    u = torch.zeros(B, k, dtype=torch.float64, device=device)                       # (B, k) greedy rows: 0
    noise = {}                                                                      # row -> (V,) race noise
    for r, gen in enumerate(generators):
        if not greedy[r]:
            n = int(num_draft_tokens[r])
            u[r, :n] = torch.rand(n, dtype=torch.float64, generator=gen, device=device)
            noise[r] = _race_noise(V, gen, device)
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
    for r, e in noise.items():
        last[r] = (residual[r] / e).argmax()
    out = F.pad(torch.where(run.bool(), draft_token_ids, -1), (0, 1), value=-1)     # (B, k+1)
    out[rows, num_accepted] = last
    return out, num_accepted


def expected_speedup(alpha: float, k: int, c: float) -> float:
    """Leviathan et al.'s expected walltime improvement: tokens per step / cost per step in target
    forwards, (1 - alpha^(k+1)) / ((1 - alpha)(c k + 1)). alpha = 1 is the limit (k+1) / (c k + 1)."""
    tokens = k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens / (c * k + 1)


@dataclass
class SpecDecodingStats:
    """Counts of one run (vLLM's SpecDecodingStats). Position i of a draft is *checked* when guesses
    0..i-1 were all accepted (after a rejection, later guesses are never looked at)."""
    num_spec_tokens: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)
    num_checked_tokens_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self):
        k = self.num_spec_tokens
        self.num_accepted_tokens_per_pos = self.num_accepted_tokens_per_pos or [0] * k
        self.num_checked_tokens_per_pos = self.num_checked_tokens_per_pos or [0] * k

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        for i in range(num_accepted):
            self.num_accepted_tokens_per_pos[i] += 1
        for i in range(min(num_accepted + 1, num_draft_tokens)):
            self.num_checked_tokens_per_pos[i] += 1

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
        """alpha for expected_speedup: accepted / checked over all positions (the maximum-likelihood
        estimate when every position passes with the same chance). Unlike the acceptance rate, it
        does not count guesses that were never checked."""
        checked = sum(self.num_checked_tokens_per_pos)
        return self.num_accepted_tokens / checked if checked else 0.0

    def summary(self) -> dict:
        return {"spec_num_drafts": self.num_drafts, "spec_draft_tokens": self.num_draft_tokens,
                "spec_accepted_tokens": self.num_accepted_tokens,
                "spec_acceptance_rate": round(self.acceptance_rate, 4),
                "spec_mean_acceptance_length": round(self.mean_acceptance_length, 4),
                "spec_acceptance_per_position": [round(a, 4) for a in self.acceptance_per_position]}


# ----------------------------------------------------------------------------- the draft


def default_draft_layers(num_layers: int) -> int:
    """Layers the built-in draft keeps: 7/8 of them and at least one fewer than the target
    (25 of Qwen3-0.6B's 28, 2 of `tiny`'s 3; see the top for why so many)."""
    return max(1, num_layers - max(1, num_layers // 8))


def early_exit_draft(target: M.Qwen3ForCausalLM, num_layers: int) -> M.Qwen3ForCausalLM:
    """A draft made of the target's first num_layers layers, its embeddings, final norm and lm_head.
    Shared modules, not copies: it costs no memory beyond its own (smaller) KV cache."""
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


def forward_spans(model, kv_cache, block_manager, spans, token_ids: list[int],
                  logits_indices: list[int], backend=paged.TORCH_SDPA) -> torch.Tensor:
    """One packed forward over the paged cache: span (seq_id, start, end) computes positions [start, end)
    of its sequence (token_ids holds all spans' tokens back to back). Logits (len(logits_indices), V)
    in fp32 at those packed indices. backend: 04's attention backend (the engine may plug in a faster one)."""
    device = kv_cache.device
    positions = [p for _, start, end in spans for p in range(start, end)]
    ctx = paged.PagedContext.from_spans(kv_cache, block_manager, spans, backend=backend)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    hidden = model(as_tensor(token_ids), as_tensor(positions), ctx)                 # (N, hidden)
    return model.compute_logits(hidden[as_tensor(logits_indices)]).float()          # (L, V)


class DraftRunner:
    """The draft model with its own paged KV cache and BlockManager, keyed by the target's sequence ids.

    It remembers how many tokens of each sequence it has computed (`num_computed_tokens`), which may
    lag the target: it catches up when it next proposes. Prefix caching works as in the target, with
    only verified tokens committed (`rollback`), so equal prompts share the draft's blocks too.
    """

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
        """Up to num_tokens[i] guesses for seqs[i], each drawn from the draft's q shaped by the request's
        sampling parameters. Returns draft_token_ids (B, k_max), draft_probs (B, k_max, V) (zero past a
        row's guesses) and the number each row got (less than asked when the draft's pool is full)."""
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
                                                         [generators[i] for i in rows])
            draft_probs[rows, j] = q
        for seq, k in zip(seqs, ks):
            if k:
                self.num_computed_tokens[seq.seq_id] = seq.num_tokens + k - 1
        return draft_token_ids, draft_probs, ks

    def rollback(self, seq_id: int, verified_token_ids: list[int]) -> None:
        """After verification: keep the draft's KV only for verified tokens (the rejected guesses'
        slots and any block past them go back to the pool) and commit the verified full blocks."""
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
    """One engine step with speculation, given the scheduler's batch and the target's cache.

    `step` computes the scheduled prefill chunks and, for each sequence that samples, its last
    token plus up to k guesses, all in one target forward; it moves num_computed_tokens, rolls both
    caches back past the accepted tokens and commits the verified ones. It does not append the new
    tokens to the sequences: the caller does, one at a time through its stop rules.
    """

    def __init__(self, model, kv_cache, block_manager, draft: DraftRunner, num_speculative_tokens: int,
                 max_model_len: int, backend=paged.TORCH_SDPA):
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.model, self.kv_cache, self.block_manager = model, kv_cache, block_manager
        self.draft, self.backend = draft, backend
        self.num_speculative_tokens = num_speculative_tokens
        self.max_model_len = max_model_len
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
    def step(self, batch, generators: list) -> list[VerifiedTokens]:
        """generators[i]: batch.seqs[i]'s torch.Generator (or None). Returns one VerifiedTokens per
        sequence that sampled this step."""
        for seq in batch.preempted:
            self.draft.free(seq.seq_id)
        bm = self.block_manager
        sampling = [i for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
                    if seq.num_computed_tokens + n == seq.num_tokens]
        # target slots for the guesses (the scheduler reserved the step's own tokens), then the guesses
        wanted = []
        for i in sampling:
            sid, k = batch.seqs[i].seq_id, self.num_to_draft(batch.seqs[i])
            while k and not bm.can_allocate(k, sid):
                k -= 1
            bm.append_slots(sid, k)
            wanted.append(k)
        draft_token_ids, draft_probs, ks = self.draft.propose(
            [batch.seqs[i] for i in sampling], wanted, [generators[i] for i in sampling])
        for i, want, k in zip(sampling, wanted, ks):
            bm.truncate(batch.seqs[i].seq_id, want - k)      # the draft's pool could not hold them all

        # one target forward: prefill chunks, and last token + guesses of every sampling sequence
        row_of = {i: r for r, i in enumerate(sampling)}
        spans, token_ids, logits_indices = [], [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            token_ids += seq.token_ids[start:start + n]
            k = 0
            if i in row_of:
                r = row_of[i]
                k = ks[r]
                token_ids += draft_token_ids[r, :k].tolist()
                logits_indices += range(len(token_ids) - k - 1, len(token_ids))
            spans.append((seq.seq_id, start, start + n + k))
        if not sampling:   # only prefill chunks that do not reach the end: nothing to sample
            forward_spans(self.model, self.kv_cache, bm, spans, token_ids, [], self.backend)
            self._advance(batch)
            return []
        logits = forward_spans(self.model, self.kv_cache, bm, spans, token_ids, logits_indices, self.backend)   # (L, V)
        seqs = [batch.seqs[i] for i in sampling]
        probs = self.sampler.probs(logits, [s.sampling for s, k in zip(seqs, ks) for _ in range(k + 1)])  # (L, V)
        k_max, V = draft_token_ids.shape[1], logits.shape[1]
        row = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(ks) + 1).to(logits.device)  # (L,)
        pos = torch.cat([torch.arange(k + 1) for k in ks]).to(logits.device)                          # (L,)
        target_probs = probs.new_zeros(len(seqs), k_max + 1, V)                            # (S, k_max+1, V)
        target_probs[row, pos] = probs
        num_draft = torch.tensor(ks, device=logits.device)
        out, num_accepted = rejection_sample(draft_token_ids, num_draft, draft_probs, target_probs,
                                             [s.sampling.greedy for s in seqs], [generators[i] for i in sampling])
        x = draft_token_ids[..., None]
        q_x = draft_probs.gather(2, x)[..., 0].tolist()                                   # (S, k_max)
        p_x = target_probs[:, :k_max].gather(2, x)[..., 0].tolist()                       # (S, k_max)

        self._advance(batch, skip=set(sampling))
        results, out, offset = [], out.tolist(), 0
        for r, (seq, k, a) in enumerate(zip(seqs, ks, num_accepted.tolist())):
            new = out[r][:a + 1]
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
    """The smallest loop around SpeculativeDecoder (05's Scheduler, max_tokens as the only stop rule),
    for the demo and the tests; the engine adds eos, stop strings and streaming. params[i] is prompt
    i's SamplingConfig. Returns the generated ids per prompt and the decoder (its stats and pools)."""
    weight = model.model.embed_tokens.weight
    bm = paged.BlockManager(num_blocks, block_size)
    decoder = SpeculativeDecoder(model, paged.allocate_kv_cache(model.config, num_blocks, block_size, weight.dtype,
                                                                weight.device),
                                 bm, DraftRunner(draft_model, num_blocks, block_size), num_speculative_tokens,
                                 max_model_len)
    scheduler = sched.Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=max(512, max_num_seqs))
    seqs = [sched.Sequence(i, list(p), len(p), params[i]) for i, p in enumerate(prompts)]
    generators = {s.seq_id: S.make_generator(s.sampling.seed, weight.device) for s in seqs}
    for seq in seqs:
        scheduler.add(seq)
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        for v in decoder.step(batch, [generators[s.seq_id] for s in batch.seqs]):
            v.seq.token_ids += v.token_ids
            if len(v.seq.completion_token_ids) >= v.seq.sampling.max_tokens:
                scheduler.finish(v.seq)
                decoder.free(v.seq.seq_id)
    return [s.completion_token_ids for s in seqs], decoder


@torch.inference_mode()
def measure_cost_ratio(target, draft, context_len: int = 64, rounds: int = 5, repeats: int = 4) -> float:
    """c for expected_speedup: the draft's time for one single-token decode forward (logits included)
    after context_len cached tokens, over the target's. Measured in alternating rounds of `repeats`
    forwards of each model (after one warm-up forward each), so a machine that gets busier or quieter
    meanwhile slows both alike; the median forward time of each."""
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
    residual = (p - q).clamp(min=0) / (p - q).clamp(min=0).sum()
    table = Table("token", "target p", "draft q", "min(p, q)", "residual", box=None, padding=(0, 2))
    for i, w in enumerate(words):
        table.add_row(w, f"{p[i]:.2f}", f"{q[i]:.2f}", f"{min(p[i], q[i]):.2f}", f"{residual[i]:.2f}")
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
        if u < ratio:
            steps.add_row(str(trial), words[x], f"{ratio:.2f}", f"{u:.2f}", "[green]accept[/]", words[x])
        else:
            y = int(sample_from_probs((p - q).clamp(min=0)[None], [False], [gen])[0])
            steps.add_row(str(trial), words[x], f"{ratio:.2f}", f"{u:.2f}", "[red]reject[/]: residual", words[y])
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

    tokenize = importlib.import_module("01_tokenize")
    with tempfile.TemporaryDirectory() as tmp:
        folder = M.make_random_checkpoint(tmp, "tiny", seed=0, dtype="float32")
        target = M.load_model(folder, torch.float32)
        tok = tokenize.load_tokenizer(folder)
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
                  "Random weights: the truncated draft rarely agrees (the docstring says why), and a draft as "
                  "costly as the target cannot win even when always right. A speedup needs a draft that is "
                  "both cheap and usually right.")
    console.print(f"[dim]done in {time.perf_counter() - t_start:.1f}s[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
