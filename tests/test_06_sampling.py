"""06_sampling: the filters must give exactly transformers' logits warpers (row by row, with different
parameters per row in one batch), greedy must be torch.argmax, a seeded request must get the same tokens
whatever else is in the batch, and the drawn tokens must follow the final distribution (chi-square)."""
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from conftest import load

S = load("06_sampling")
VOCAB = 151936  # Qwen3


def hf_chain(x: torch.Tensor, cfg) -> torch.Tensor:
    """transformers' generate() warpers for one config, in its order, skipping the ones that are off
    (as GenerationMixin._get_logits_processor does)."""
    if cfg.temperature != 1.0:
        x = TemperatureLogitsWarper(float(cfg.temperature))(None, x)
    if cfg.top_k != 0:
        x = TopKLogitsWarper(cfg.top_k)(None, x)
    if cfg.top_p < 1.0:
        x = TopPLogitsWarper(cfg.top_p)(None, x)
    if cfg.min_p > 0:
        x = MinPLogitsWarper(cfg.min_p)(None, x)
    return x


def random_logits(batch: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=gen) * scale


def assert_same(ours: torch.Tensor, theirs: torch.Tensor):
    """Same dropped set and bit-identical surviving values."""
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), "different tokens dropped"
    assert torch.equal(ours, theirs)


# ---- the transforms against transformers ---------------------------------------------------------

SHAPES = [(1, 7), (5, 50), (8, 1000), (3, 32000), (2, VOCAB)]


@pytest.mark.parametrize("batch,vocab", SHAPES)
def test_temperature_matches_transformers(batch, vocab):
    x = random_logits(batch, vocab, seed=1)
    temps = [0.05, 0.3, 0.7, 1.0, 1.3, 2.0 / 3, 5.0, 0.9][:batch]
    out = S.apply_temperature(x, torch.tensor(temps))
    for r, t in enumerate(temps):
        assert torch.equal(out[r], TemperatureLogitsWarper(t)(None, x)[r])


@pytest.mark.parametrize("batch,vocab", SHAPES)
def test_top_k_matches_transformers(batch, vocab):
    x = random_logits(batch, vocab, seed=2)
    ks = [1, 5, 50, 0, vocab, vocab + 10, 2, 17][:batch]  # 0 = off, >= vocab keeps everything
    out = S.apply_top_k(x, torch.tensor(ks))
    for r, k in enumerate(ks):
        assert_same(out[r], x[r] if k == 0 else TopKLogitsWarper(k)(None, x)[r])


@pytest.mark.parametrize("batch,vocab", SHAPES)
def test_top_p_matches_transformers(batch, vocab):
    x = random_logits(batch, vocab, seed=3)
    ps = [0.9, 0.5, 1.0, 0.95, 0.01, 0.7, 0.99, 0.3][:batch]  # 1.0 = off
    out = S.apply_top_p(x, torch.tensor(ps, dtype=torch.float64))
    for r, p in enumerate(ps):
        assert_same(out[r], x[r] if p == 1.0 else TopPLogitsWarper(p)(None, x)[r])


@pytest.mark.parametrize("batch,vocab", SHAPES)
def test_min_p_matches_transformers(batch, vocab):
    x = random_logits(batch, vocab, seed=4, scale=1.0)
    ms = [0.05, 0.1, 0.0, 0.5, 1.0, 0.01, 0.2, 0.3][:batch]  # 0 = off, 1 keeps only the top
    out = S.apply_min_p(x, torch.tensor(ms))
    for r, m in enumerate(ms):
        assert_same(out[r], MinPLogitsWarper(m)(None, x)[r])


def test_ties_match_transformers():
    """Integer-valued logits: many exact ties, including at the top-k cut-off and top-p boundary."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(-3, 4, (6, 40), generator=gen).float()
    for k in (1, 3, 10):
        assert_same(S.apply_top_k(x, torch.full((6,), k)), TopKLogitsWarper(k)(None, x))
    for p in (0.2, 0.5, 0.9):
        assert_same(S.apply_top_p(x, torch.full((6,), p, dtype=torch.float64)), TopPLogitsWarper(p)(None, x))
    for m in (0.3, 1.0):
        assert_same(S.apply_min_p(x, torch.full((6,), m)), MinPLogitsWarper(m)(None, x))


def test_tiny_top_p_keeps_the_top_token():
    """float32(1 - 1e-9) is 1.0, so every cumulative probability is <= 1 - p: without the keep-one rule
    the whole row would be dropped (and softmax would give NaN)."""
    x = random_logits(4, 1000, seed=10)
    for p in (1e-12, 1e-9, 1e-7):
        out = S.apply_top_p(x, torch.full((4,), p, dtype=torch.float64))
        assert_same(out, TopPLogitsWarper(p)(None, x))
        assert torch.equal(torch.isfinite(out).sum(-1), torch.ones(4, dtype=torch.int64))


def test_top_p_boundary_uses_float64_one_minus_p():
    """transformers compares the cumulative probabilities with the Python float 1 - p, rounded once to
    float32. Computing 1 - p in float32 instead (1 - float32(0.9) = 0.10000002, not 0.1f) moves the
    boundary by a few ulps. Build two-token rows whose smaller cumulative probability falls exactly in
    that gap, where only the float64 version keeps the token, and check we agree with transformers."""
    hits = 0
    for p in (0.9, 0.95, 0.99, 0.8, 0.7):
        right = torch.tensor(1 - p, dtype=torch.float32)          # transformers' threshold
        wrong = 1 - torch.tensor(p, dtype=torch.float32)          # the float32 shortcut
        if right == wrong:
            continue
        for i in range(-2000, 2000):
            x = torch.tensor([[math.log(1 - p) + i * 2e-8, math.log(p)]])
            first = x.sort().values.softmax(-1)[0, 0]             # the cumulative of the smaller token
            if min(right, wrong) < first <= max(right, wrong):
                hits += 1
                assert_same(S.apply_top_p(x, torch.tensor([p], dtype=torch.float64)), TopPLogitsWarper(p)(None, x))
    assert hits > 0


CHAIN_CONFIGS = [
    S.SamplingConfig(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05),
    S.SamplingConfig(),
    S.SamplingConfig(temperature=1.3, top_p=0.8),
    S.SamplingConfig(temperature=0.5, top_k=5),
    S.SamplingConfig(min_p=0.1),
    S.SamplingConfig(temperature=0.9, top_k=1000, min_p=0.02),
    S.SamplingConfig(temperature=2.0, top_k=3, top_p=0.5, min_p=0.5),
    S.SamplingConfig(top_k=20, top_p=0.99),
]


@pytest.mark.parametrize("vocab", [100, 5000, VOCAB])
def test_chain_matches_transformers(vocab):
    """The whole chain, one batch with a different config per row, compared row by row."""
    configs = CHAIN_CONFIGS if vocab < VOCAB else CHAIN_CONFIGS[:3]
    x = random_logits(len(configs), vocab, seed=6)
    out = S.Sampler().process(x, configs)
    probs = S.Sampler().probs(x, configs)
    for r, cfg in enumerate(configs):
        theirs = hf_chain(x[r:r + 1], cfg)[0]
        assert_same(out[r], theirs)
        assert torch.equal(probs[r], theirs.softmax(-1))


# ---- greedy ---------------------------------------------------------------------------------------

def test_greedy_is_argmax_with_ties_to_lowest_index():
    x = random_logits(6, 1000, seed=7)
    x[2, [10, 500, 900]] = 100.0  # a three-way tie at the top: torch.argmax gives the first, 10
    greedy = [S.SamplingConfig(temperature=0)] * 6
    tokens = S.Sampler()(x, greedy)
    assert tokens.dtype == torch.int64 and tokens.shape == (6,)
    assert torch.equal(tokens, torch.argmax(x, dim=-1)) and tokens[2] == 10
    # the greedy rows of a mixed batch, with a seeded generator on a greedy row (it is not used)
    mixed = [S.SamplingConfig(temperature=0), S.SamplingConfig(), S.SamplingConfig(temperature=0, top_k=3),
             S.SamplingConfig(top_p=0.5), S.SamplingConfig(temperature=0, seed=1), S.SamplingConfig(min_p=0.2)]
    gens = [None, None, None, S.make_generator(2), S.make_generator(1), None]
    tokens = S.Sampler()(x, mixed, gens)
    for r in (0, 2, 4):
        assert tokens[r] == torch.argmax(x[r])
    probs = S.Sampler().probs(x, mixed)
    assert probs[2, 10] == 1 and probs[2].sum() == 1  # greedy distribution: a one-hot


def test_greedy_bf16_and_inputs_untouched():
    x = random_logits(3, 2000, seed=8).to(torch.bfloat16)
    keep = x.clone()
    assert torch.equal(S.Sampler()(x, [S.SamplingConfig(temperature=0)] * 3), x.argmax(-1))
    configs = [S.SamplingConfig(top_p=0.9), S.SamplingConfig(temperature=0.5, top_k=7, min_p=0.1),
               S.SamplingConfig()]
    S.Sampler()(x, configs)
    p = S.Sampler().probs(x, configs)
    assert p.dtype == torch.float32 and torch.allclose(p.sum(-1), torch.ones(3))
    x32 = keep.float()
    S.Sampler()(x32, configs)
    assert torch.equal(x, keep) and torch.equal(x32, keep.float())  # the caller's logits are not modified


# ---- seeded reproducibility --------------------------------------------------------------------------

def test_seeded_request_same_tokens_in_any_batch():
    vocab, steps = 3000, 6
    cfg = S.SamplingConfig(temperature=0.9, top_p=0.95, seed=1234)
    mine = [random_logits(1, vocab, seed=100 + s, scale=2.0) for s in range(steps)]

    def run_alone():
        gen = S.make_generator(cfg.seed)
        return [S.Sampler()(mine[s], [cfg], [gen]).item() for s in range(steps)]

    def run_in_batch():
        gen = S.make_generator(cfg.seed)
        others = [(S.SamplingConfig(temperature=0.5, seed=7), S.make_generator(7)),
                  (S.SamplingConfig(), None),
                  (S.SamplingConfig(temperature=0), None),
                  (S.SamplingConfig(temperature=1.5, top_k=10, min_p=0.1, seed=1234), S.make_generator(1234)),
                  (S.SamplingConfig(top_p=0.3), None)]
        tokens = []
        for s in range(steps):
            # batch composition changes every step: a different number of neighbours, our row moving
            n = s % (len(others) + 1)
            pos = (2 * s) % (n + 1)
            rows = others[:n]
            rows = rows[:pos] + [(cfg, gen)] + rows[pos:]
            x = random_logits(len(rows), vocab, seed=200 + s, scale=2.0)
            x[pos] = mine[s][0]
            out = S.Sampler()(x, [c for c, _ in rows], [g for _, g in rows])
            tokens.append(out[pos].item())
        return tokens

    alone = run_alone()
    assert run_alone() == alone
    assert run_in_batch() == alone
    torch.manual_seed(0)  # the global RNG (used by unseeded neighbours) does not matter either
    assert run_in_batch() == alone
    other_seed = S.make_generator(4321)
    assert [S.Sampler()(mine[s], [cfg], [other_seed]).item() for s in range(steps)] != alone


def test_make_generator():
    assert S.make_generator(None) is None
    a, b = S.make_generator(5), S.make_generator(5)
    assert isinstance(a, torch.Generator)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


# ---- the draws follow the distribution -----------------------------------------------------------

def chi2_sf(x: float, df: int) -> float:
    """P(chi-square with df degrees of freedom > x), exact: Q(df/2, x/2), the regularised upper incomplete
    gamma function, from Q(1, y) = exp(-y) or Q(1/2, y) = erfc(sqrt(y)) and Q(a+1, y) = Q(a, y) +
    y^a exp(-y) / Gamma(a+1). (No scipy needed; test_chi2_sf checks it against printed tables.)"""
    y = x / 2
    a, total = (1.0, math.exp(-y)) if df % 2 == 0 else (0.5, math.erfc(math.sqrt(y)))
    while a < df / 2:
        total += math.exp(a * math.log(y) - y - math.lgamma(a + 1))
        a += 1
    return total


def test_chi2_sf():
    # Critical values at p = 1e-3 from the standard chi-square table (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.4,
    # scipy.stats.chi2.isf(1e-3, df)): df 1 -> 10.828, 4 -> 18.467, 9 -> 27.877.
    for df, crit in ((1, 10.828), (4, 18.467), (9, 27.877)):
        assert chi2_sf(crit, df) == pytest.approx(1e-3, rel=1e-3)


def chi_square_p_value(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's goodness of fit over the tokens with probability > 0; tokens outside must never appear."""
    n = len(tokens)
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    support = probs > 0
    assert counts[~support].sum() == 0, "a dropped token was sampled"
    expected = probs.double()[support] * n
    assert expected.min() >= 5, "the chi-square approximation needs >= 5 expected per cell"
    stat = ((counts[support] - expected) ** 2 / expected).sum().item()
    return chi2_sf(stat, int(support.sum()) - 1)


N_DRAWS = 20000
LOGITS10 = torch.tensor([1.2, 0.3, -0.5, 0.8, 0.0, -1.0, 0.6, -0.2, 0.1, -0.7])


@pytest.mark.parametrize("rng", ["seeded", "global"])
def test_frequencies_follow_softmax_over_temperature(rng):
    cfg = S.SamplingConfig(temperature=0.8)
    x = LOGITS10.expand(N_DRAWS, -1)  # N_DRAWS rows of one request = N_DRAWS independent draws
    if rng == "seeded":
        tokens = S.Sampler()(x, [cfg] * N_DRAWS, [S.make_generator(0)] * N_DRAWS)
    else:
        torch.manual_seed(0)
        tokens = S.Sampler()(x, [cfg] * N_DRAWS)
    assert chi_square_p_value(tokens, torch.softmax(LOGITS10 / 0.8, dim=-1)) > 1e-3


@pytest.mark.parametrize("cfg,support", [
    (S.SamplingConfig(temperature=0.8, top_k=4), 4),
    (S.SamplingConfig(temperature=1.2, top_p=0.7), None),
    (S.SamplingConfig(temperature=0.8, min_p=0.3), None),
    (S.SamplingConfig(temperature=1.5, top_k=8, top_p=0.8, min_p=0.2), None),
])
def test_frequencies_follow_truncated_distribution(cfg, support):
    # the expected distribution, from transformers' warpers: survivors renormalised, the rest 0
    expected = hf_chain(LOGITS10.unsqueeze(0), cfg)[0].softmax(-1)
    assert 1 < int((expected > 0).sum()) < 10 and (support is None or int((expected > 0).sum()) == support)
    x = LOGITS10.expand(N_DRAWS, -1)
    tokens = S.Sampler()(x, [cfg] * N_DRAWS, [S.make_generator(1)] * N_DRAWS)
    assert chi_square_p_value(tokens, expected) > 1e-3


def test_dropped_tokens_never_sampled():
    x = random_logits(1, 2000, seed=9, scale=2.0)
    configs = [S.SamplingConfig(top_k=20), S.SamplingConfig(top_p=0.5), S.SamplingConfig(min_p=0.1),
               S.SamplingConfig(temperature=3.0, top_k=100, top_p=0.9, min_p=0.05)]
    for cfg in configs:
        allowed = torch.isfinite(hf_chain(x, cfg)[0])
        torch.manual_seed(1)
        tokens = S.Sampler()(x.expand(1000, -1), [cfg] * 1000)
        assert allowed[tokens].all()
        assert len(tokens.unique()) > 1  # it is sampling, not collapsing onto one token


def test_docstring_worked_example():
    x = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0]])
    cfg = S.SamplingConfig(temperature=0.5, top_k=4, top_p=0.9, min_p=0.2)
    steps = [S.SamplingConfig(temperature=0.5), S.SamplingConfig(temperature=0.5, top_k=4),
             S.SamplingConfig(temperature=0.5, top_k=4, top_p=0.9), cfg]
    printed = [[.656, .241, .089, .012, .002], [.657, .242, .089, .012, 0], [.665, .245, .090, 0, 0],
               [.731, .269, 0, 0, 0]]
    for step, want in zip(steps, printed):
        assert S.Sampler().probs(x, [step])[0].tolist() == pytest.approx(want, abs=6e-4)


# ---- validate() ------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("inf")), ("temperature", float("nan")), ("temperature", "hot"),
    ("top_k", -1), ("top_k", 2.5),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.2), ("top_p", float("nan")),
    ("min_p", -0.01), ("min_p", 1.01),
    ("max_tokens", 0), ("max_tokens", -5),
    ("stop", [""]), ("stop", ["ok", ""]), ("stop", "a string, not a list"),
    ("stop_token_ids", [-1]), ("stop_token_ids", [3, -2]),
    ("seed", -1),
])
def test_validate_rejects(field, value):
    cfg = S.SamplingConfig(**{field: value})
    with pytest.raises(ValueError) as err:
        cfg.validate()
    message = str(err.value)
    assert message.startswith(field) and repr(value) in message  # names the field and the bad value
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence, printable as "error: ..."


def test_validate_accepts():
    assert S.SamplingConfig().validate().temperature == 1.0  # defaults: plain sampling, like vLLM
    good = S.SamplingConfig(temperature=0, top_k=1, top_p=1.0, min_p=1.0, seed=0, max_tokens=1,
                            stop=["\n\n"], stop_token_ids=[0, 151645], ignore_eos=True)
    assert good.validate() is good and good.greedy
    assert S.SamplingConfig(temperature=2, top_p=1e-9, min_p=0).validate()


# ---- property ------------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@example(rows=[([1.401298464324817e-45, 0.0], 2.0, 0, 0.5, 0.0)])   # a tie made by the temperature
@given(
    rows=st.lists(
        st.tuples(
            st.lists(st.one_of(st.floats(-30, 30, width=32), st.sampled_from([0.0, 1.0, 5.0])),
                     min_size=1, max_size=40),
            st.floats(0.05, 5.0), st.integers(0, 45), st.floats(1e-12, 1.0), st.floats(0.0, 1.0)),
        min_size=1, max_size=4),
)
def test_property_probs_normalised_and_top_token_survives(rows):
    vocab = min(len(r[0]) for r in rows)
    x = torch.tensor([r[0][:vocab] for r in rows])
    configs = [S.SamplingConfig(temperature=t, top_k=k, top_p=p, min_p=m).validate() for _, t, k, p, m in rows]
    probs = S.Sampler().probs(x, configs)
    assert torch.allclose(probs.sum(-1), torch.ones(len(rows)), atol=1e-5)
    assert (probs >= 0).all()
    # the filters see the logits after temperature (two logits can become equal there: 1e-45 / 2 == 0 / 2)
    scaled = x / torch.tensor([c.temperature for c in configs])[:, None]
    for r in range(len(rows)):
        top = scaled[r] == scaled[r].max()
        assert (probs[r][top] > 0).any()  # a maximal-logit token survives every filter
        if top.sum() == 1:
            assert probs[r][scaled[r].argmax()] > 0  # ... so a unique argmax always does
        # nothing below the best dropped one survives: the kept set is a top slice of the logits
        kept = probs[r] > 0
        if not kept.all():
            assert scaled[r][kept].min() >= scaled[r][~kept].max()
    tokens = S.Sampler()(x, configs)
    assert (probs.gather(1, tokens.unsqueeze(1)) > 0).all()  # and a sampled token is always a kept one
