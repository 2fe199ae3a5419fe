"""
06 - Sampling: turn the model's next-token logits into one chosen token per request.

The model gives a score (logit) for each of the 151,936 vocabulary entries. Picking the largest one
every time ("greedy") is deterministic and good for short factual answers, but long greedy text tends
to loop and sound flat. Sampling draws the token at random from softmax(logits) instead, after a few
knobs reshape that distribution. Each request carries its own knobs (SamplingConfig), so one Sampler
call handles a batch of mixed settings in one vectorised pass. The knobs, in the order of Hugging Face
transformers' generate() (so the same settings mean the same distribution there and here):

    temperature  divide the logits by T. T < 1 sharpens (the top token gets more of the mass),
                 T > 1 flattens, T = 1 leaves them alone, T = 0 means greedy: just take the argmax.
    top_k        keep only the k highest logits (ties with the k-th are kept too). 0 = off.
    top_p        "nucleus": keep the smallest set of top tokens whose probabilities add up to at
                 least p, drop the long tail. Adapts to the shape: 2 tokens when the model is sure,
                 hundreds when it is not. 1.0 = off.
    min_p        drop every token whose probability is below min_p x (probability of the top token).
                 Also adaptive, and cheap (no sort). 0.0 = off.

Dropped tokens get the logit -inf: softmax gives them probability 0 and renormalises the survivors.
Temperature comes first so every filter sees the distribution that will be sampled (top-p and min-p
measure probabilities, and a cold temperature concentrates the mass); then the cheap fixed-size cut
(top-k) before the shape-dependent ones; min-p last, on what the earlier filters left. Every filter
keeps the most likely token, so there is always something to sample.

Worked example, 5 tokens A..E, logits [2, 1.5, 1, 0, -1], temperature 0.5, top_k 4, top_p 0.9, min_p 0.2:

    temperature 0.5  logits / 0.5 = [4, 3, 2, 0, -2]    probs [.656 .241 .089 .012 .002]
    top_k 4          E (the 5th) -> -inf                probs [.657 .242 .089 .012  0  ]
    top_p 0.9        sorted from the bottom the cumulative probability is .012, .101, .343, 1:
                     D alone sums to <= 1 - 0.9, so D goes; A+B+C = .988 >= 0.9 is the nucleus
                                                        probs [.665 .245 .090  0    0  ]
    min_p 0.2        cut at 0.2 x .665 = .133: C goes   probs [.731 .269  0    0    0  ]

so this request samples A 73% of the time and B 27%, never C, D or E; with temperature 0 always A.

Reproducibility: a seeded request draws its token at position t from make_generator(seed, position=t) alone,
so its tokens depend on its seed and text only: not on the batch, a preemption or speculation (07). The draw is the
"exponential race": token = argmax(p_i / E_i), E_i ~ Exp(1) independent. Token i wins with probability
exactly p_i (of independent exponential arrival times E_i / p_i, with rates p_i, arrival i comes first
with probability p_i / sum p); it needs no cumulative sum, and unseeded rows draw their noise together.

Sampler.probs() returns the final distribution itself (greedy rows as a one-hot), because
speculative decoding (07) needs the draft's and the target's distributions shaped by the same knobs.

    python 06_sampling.py     # one toy distribution through each knob, then seeded samples
"""

import hashlib
import math
import sys
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingConfig:
    """One request's knobs and stop rules; defaults sample the model's own distribution, as vLLM's SamplingParams."""
    temperature: float = 1.0      # 0 = greedy (argmax)
    top_k: int = 0                # 0 (or >= the vocabulary size) = off
    top_p: float = 1.0            # 1.0 = off
    min_p: float = 0.0            # 0.0 = off
    seed: int | None = None       # None = use the global torch RNG
    max_tokens: int = 64          # stop after this many generated tokens
    stop: list[str] = field(default_factory=list)           # stop when the text contains one of these
    stop_token_ids: list[int] = field(default_factory=list)  # extra token ids that end the request
    ignore_eos: bool = False      # keep going past the end-of-sequence token (benchmarks)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> "SamplingConfig":
        """Raise ValueError naming the first bad field and what it accepts; return self when all are fine."""
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        def is_real(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        t = self.temperature
        if not is_real(t) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {t!r}.")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 means off), got {self.top_k!r}.")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:  # `not (...)` also catches NaN
            raise ValueError(f"top_p must be a number in (0, 1] (1 means off), got {self.top_p!r}.")
        if not is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be a number in [0, 1] (0 means off), got {self.min_p!r}.")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be None or an integer in [0, 2**64), got {self.seed!r}.")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}.")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}.")
        if isinstance(self.stop_token_ids, int) or not all(is_int(i) and i >= 0 for i in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of integers >= 0, got {self.stop_token_ids!r}.")
        return self


def make_generator(seed: int | None, device: torch.device | str = "cpu", position: int | None = None):
    """A torch.Generator seeded from `seed` (None: use the global RNG), or with a position from a hash of
    (seed, position): the draws of that one token, the same whatever came before (the engine's and 07's way)."""
    if seed is not None and position is not None:
        seed = int.from_bytes(hashlib.blake2b(f"{seed},{position}".encode(), digest_size=8).digest(), "little")
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


# ---- the transforms ---------------------------------------------------------------------------------
# Each takes logits (B, V) and one parameter per row (B,), and returns new logits with dropped tokens at
# -inf. A row whose parameter is "off" comes back unchanged, so one call serves a mixed batch. They
# reproduce transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper and
# MinPLogitsWarper (min_tokens_to_keep=1) bit for bit; tests/test_06_sampling.py checks it.

def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits / T per row (T = 0: greedy, left unchanged). A row where that overflows (T = 1e-39: inf, a NaN softmax)
    gets the same softmax from (logits - max) / T in float64: 0 at the top token(s), -inf below; greedy as T -> 0."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).unsqueeze(1)
    out = logits / t.to(logits.dtype)
    if (bad := ~out.isfinite().all(dim=1)).any():
        out[bad] = ((logits[bad] - logits[bad].amax(dim=1, keepdim=True)).double() / t[bad].double()).to(out.dtype)
    return out


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep the logits >= the k-th largest of their row (so ties with it survive); k = 0 keeps all."""
    vocab = logits.shape[-1]
    k = top_k.clamp(max=vocab)
    k_max = int(k.max())
    if k_max == 0:
        return logits
    # One topk with the batch's largest k gives every row its sorted top values; row r's cut-off is
    # its k-th value. topk is a partial selection: for k << V it is far cheaper than a full sort.
    top_values = torch.topk(logits, k_max, dim=-1).values
    kth = top_values.gather(1, (k.clamp(min=1) - 1).unsqueeze(1))
    kth = torch.where(k.unsqueeze(1) > 0, kth, torch.full_like(kth, -math.inf))  # k = 0: no cut-off
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to >= p; p = 1 keeps all.
    As transformers: sort ascending, drop every token whose cumulative probability from the bottom is
    <= 1 - p (ties: the sort order decides). Pass top_p as float64 (B,): float32 0.9 is 0.899999976."""
    # 1 - p in float64, then rounded, as transformers' `<= (1 - top_p)` with a Python float: 1 - float32(p)
    # can differ in the last bit and flip a boundary token. p = 1 gets -inf: nothing is dropped.
    cut = torch.where(top_p < 1, 1 - top_p.double(), -math.inf).to(logits.dtype).unsqueeze(1)
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= cut
    drop_sorted[:, -1] = False  # min_tokens_to_keep = 1: the most likely token always stays
    drop = drop_sorted.scatter(1, sorted_idx, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, -math.inf)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is < min_p x the row's top probability; min_p = 0 keeps all.
    The probabilities are those of the logits as they arrive, i.e. after the earlier filters."""
    probs = logits.softmax(dim=-1)
    top = probs.amax(dim=-1, keepdim=True)
    drop = probs < min_p.to(probs.dtype).unsqueeze(1) * top
    # keep the top token (min_tokens_to_keep = 1): it already passes, this makes it explicit as transformers does
    drop.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(drop, -math.inf)


def _on_rows(transform, logits: torch.Tensor, param: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """`transform` on the `active` rows only: no call when none is, no sort or softmax of rows it leaves alone."""
    n = int(active.sum())
    if n == 0:
        return logits
    if n == len(active):
        return transform(logits, param)
    rows = active.nonzero().squeeze(1)
    return logits.index_copy(0, rows, transform(logits[rows], param[rows]))


def exponential_noise(rows: int, vocab: int, generator: torch.Generator | None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """(rows, vocab) float32 draws of Exp(1), as -log(1 - U), U in float64: float32 uniforms come in steps
    of 2^-24 = 6e-8, so the smallest draws (the ones that let a rare token win the race) would be as
    coarse as the rare tokens' own probabilities, and with 151,936 of them that adds up."""
    u = torch.rand(rows, vocab, dtype=torch.float64, generator=generator, device=device)
    return u.neg_().log1p_().neg_().float()


class Sampler:
    """Picks one token per row of a batch of logits, each row with its own SamplingConfig."""

    def process(self, logits: torch.Tensor, configs: list[SamplingConfig]) -> torch.Tensor:
        """The logits after temperature, top-k, top-p and min-p (dropped at -inf), in float32; greedy rows unchanged."""
        assert logits.dim() == 2 and logits.shape[0] == len(configs), "one config per row of (B, V) logits"
        dev = logits.device
        # float32 even for bf16 logits: 3 significant digits are too few for a cumsum over 151,936 probabilities
        logits = logits.float()
        temperature = torch.tensor([c.temperature for c in configs], dtype=torch.float64, device=dev)  # 1e-50 > 0
        top_k = torch.tensor([min(c.top_k, logits.shape[1]) for c in configs], dtype=torch.int64, device=dev)
        top_p = torch.tensor([c.top_p for c in configs], dtype=torch.float64, device=dev)
        min_p = torch.tensor([c.min_p for c in configs], dtype=torch.float32, device=dev)
        sampled = temperature > 0
        logits = _on_rows(apply_temperature, logits, temperature, sampled & (temperature != 1))
        logits = _on_rows(apply_top_k, logits, top_k, sampled & (top_k > 0))
        logits = _on_rows(apply_top_p, logits, top_p, sampled & (top_p < 1))
        logits = _on_rows(apply_min_p, logits, min_p, sampled & (min_p > 0))
        return logits

    def probs(self, logits: torch.Tensor, configs: list[SamplingConfig]) -> torch.Tensor:
        """The distribution each row samples from, (B, V) float32 summing to 1 per row. A greedy row
        is a one-hot on torch.argmax(logits) (ties -> lowest index): it picks that token with certainty."""
        processed = self.process(logits, configs)
        probs = processed.softmax(dim=-1)
        greedy = torch.tensor([c.temperature == 0 for c in configs], device=logits.device)
        if greedy.any():
            one_hot = torch.zeros_like(probs).scatter_(1, processed.argmax(dim=-1, keepdim=True), 1.0)
            probs = torch.where(greedy.unsqueeze(1), one_hot, probs)
        return probs

    def __call__(self, logits: torch.Tensor, configs: list[SamplingConfig],
                 generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
        """One token id per row, (B,) int64. generators[r]: row r's make_generator(seed, position=t) (or None)."""
        if all(c.temperature == 0 for c in configs):
            return logits.argmax(dim=-1)  # all greedy: no softmax, no filters, no randomness
        generators = generators if generators is not None else [None] * len(configs)
        assert len(generators) == len(configs), "one generator (or None) per row"
        probs = self.probs(logits, configs)
        tokens = probs.argmax(dim=-1)  # right for greedy rows (one-hot); sampled rows overwritten below
        rows = [r for r, c in enumerate(configs) if c.temperature > 0]
        p = probs[rows] if len(rows) < len(configs) else probs
        # exponential race: unseeded rows draw together from the global RNG, a seeded row V numbers from its own
        noise = torch.empty_like(p)
        seeded = [j for j, r in enumerate(rows) if generators[r] is not None]
        if len(seeded) < len(rows):
            unseeded = [j for j, r in enumerate(rows) if generators[r] is None]
            noise[unseeded] = exponential_noise(len(unseeded), p.shape[1], None, p.device)
        for j in seeded:
            noise[j] = exponential_noise(1, p.shape[1], generators[rows[j]], p.device)[0]
        # A draw of exactly 0 (chance 2^-53) would make 0/0 = NaN for a dropped token: floor it.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        tokens[rows] = (p / noise).argmax(dim=-1)
        return tokens


# ---- demo ---------------------------------------------------------------------------------------------

def _bar(p: float, width: int = 6) -> str:
    """A horizontal bar, 1/8 character resolution, full width = 100%."""
    eighths = round(p * width * 8)
    return "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]


def main() -> int:
    import time
    from rich.console import Console
    from rich.table import Table
    t0 = time.perf_counter()
    console = Console()
    words = ["mat", "sofa", "floor", "bed", "roof", "table", "moon", "piano"]
    logits = torch.tensor([[3.2, 2.6, 2.3, 1.9, 1.2, 0.9, -0.4, -1.2]])
    console.print('[bold]"The cat sat on the ..."[/]: a toy next-token distribution through each knob, '
                  "applied one after the other (each column renormalised):")
    stages = [("softmax", SamplingConfig()),
              ("T 0.7", SamplingConfig(temperature=0.7)),
              ("+top-k 5", SamplingConfig(temperature=0.7, top_k=5)),
              ("+top-p .9", SamplingConfig(temperature=0.7, top_k=5, top_p=0.9)),
              ("+min-p .05", SamplingConfig(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05))]
    sampler = Sampler()
    columns = [sampler.probs(logits, [cfg])[0] for _, cfg in stages]
    table = Table(box=None, padding=(0, 1))
    table.add_column("token", no_wrap=True)
    table.add_column("logit", justify="right", no_wrap=True)
    for name, _ in stages:
        table.add_column(name, no_wrap=True)
    for i, word in enumerate(words):
        cells = [f"{_bar(p[i].item()):<6}{p[i].item():4.0%}" if p[i] > 0 else "[dim]   dropped[/]" for p in columns]
        table.add_row(word, f"{logits[0, i].item():.1f}", *cells)
    console.print(table)
    final = columns[-1]
    console.print(f"min-p 0.05 cuts at 5% of the top probability ({0.05 * final.max().item():.1%}): here top-p "
                  "already removed everything that low; it bites when one token dominates.")

    cfg = stages[-1][1]
    draws = [sampler(logits, [cfg], [make_generator(0, position=t)]).item() for t in range(16)]
    console.print(f"\n[bold]16 steps, seed 0[/]: {' '.join(words[i] for i in draws)}")
    again = [sampler(logits, [cfg], [make_generator(0, position=t)]).item() for t in range(16)]
    console.print(f"same seed again gives the same tokens: {again == draws}; "
                  f"greedy (temperature 0) always gives {words[sampler(logits, [SamplingConfig(temperature=0)]).item()]!r}")

    n = 20000  # one batch of n identical rows sharing one seeded generator: n independent draws
    tokens = sampler(logits.expand(n, -1), [cfg] * n, [make_generator(seed=0)] * n)
    counts = torch.bincount(tokens, minlength=len(words))
    table = Table("token", "probability", f"frequency in {n:,} draws", box=None, padding=(0, 1))
    for i, word in enumerate(words):
        if final[i] > 0 or counts[i] > 0:
            table.add_row(word, f"{final[i].item():.4f}", f"{counts[i].item() / n:.4f}")
    console.print(table)
    console.print(f"[dim]done in {time.perf_counter() - t0:.2f}s[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
