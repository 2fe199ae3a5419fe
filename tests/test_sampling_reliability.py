"""Issue 25's sampling failures, each at its root: a tiny temperature is greedy in the limit (no overflow to
token 0), any top_k >= 0 works, a seeded request's tokens do not depend on the KV pool, preemption, the batch
or k with --speculative, streamed text never shows part of a stop string, and non-finite logits fail their
request alone."""
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import load

M = load("02_model")
S = load("06_sampling")
E = load("engine")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return {"tiny": M.make_random_checkpoint(str(root / "tiny"), "tiny", seed=7, dtype="float32"),
            "untied": M.make_random_checkpoint(str(root / "untied"), "tiny-untied", seed=5, dtype="float32")}


def engine(folder, **kw):
    return E.LLMEngine(E.EngineConfig(**{**dict(model=folder, dtype="float32", device="cpu", max_model_len=256,
                                                num_kv_blocks=128), **kw}))


def prompts(n=12, seed=0):
    rng = random.Random(seed)
    lengths = [1, 3, 16, 17, 40, 5, 33, 64, 9, 2, 24, 11][:n]
    return [[rng.randrange(151643) for _ in range(k)] for k in lengths]


# ----------------------------------------------------------------------------- temperature underflow

@pytest.mark.parametrize("t", [1e-30, 1e-38, 1e-39, 1e-45, 1e-50, 1e-300, 5e-324])
def test_a_tiny_temperature_is_greedy_in_the_limit(t):
    x = torch.randn(4, 151936, generator=torch.Generator().manual_seed(0)) * 3
    x[3] -= 1000                                    # all logits negative: logits / T is -inf everywhere
    cfg = [S.SamplingConfig(temperature=t, seed=1)] * 4
    probs = S.Sampler().probs(x, cfg)
    assert torch.equal(probs, torch.nn.functional.one_hot(x.argmax(-1), x.shape[1]).float())
    gens = [S.make_generator(1, position=i) for i in range(4)]
    assert torch.equal(S.Sampler()(x, cfg, gens), x.argmax(-1))
    assert torch.equal(S.Sampler()(x, [S.SamplingConfig(temperature=t, top_p=0.5, min_p=0.1, top_k=3)] * 4), x.argmax(-1))


def test_a_tiny_temperature_shares_a_tie_at_the_top():
    x = torch.zeros(4000, 50)
    x[:, 7] = x[:, 31] = 2.0                        # a tie at the top: each half the time, nothing else
    tokens = S.Sampler()(x, [S.SamplingConfig(temperature=1e-45)] * 4000, [S.make_generator(3)] * 4000)
    assert set(tokens.tolist()) == {7, 31} and abs((tokens == 7).float().mean().item() - 0.5) < 0.05
    probs = S.Sampler().probs(x[:1], [S.SamplingConfig(temperature=1e-50, top_p=0.9)])[0]
    assert probs[7] + probs[31] == 1 and probs[7] > 0 and probs[31] > 0


def test_engine_with_a_tiny_temperature_gives_the_greedy_tokens(folders):
    eng = engine(folders["tiny"])
    greedy = eng.generate(prompts(4), E.SamplingConfig(temperature=0, max_tokens=8, ignore_eos=True))
    for t in (1e-39, 1e-45, 1e-50):
        tiny = eng.generate(prompts(4), E.SamplingConfig(temperature=t, seed=2, max_tokens=8, ignore_eos=True))
        assert [o.token_ids for o in tiny] == [o.token_ids for o in greedy]
    for bad in (float("inf"), float("nan"), -1e-45):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            E.SamplingConfig(temperature=bad).validate()


# ----------------------------------------------------------------------------- top_k beyond the vocabulary

def test_top_k_beyond_the_vocabulary_is_off(folders):
    for k in (151936, 151937, 2**63, 10**20):
        assert S.SamplingConfig(top_k=k).validate().top_k == k
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(S.Sampler().probs(x, [S.SamplingConfig(top_k=10**20)] * 3),
                       S.Sampler().probs(x, [S.SamplingConfig()] * 3))
    eng = engine(folders["tiny"])
    a, b = [eng.generate(prompts(2), E.SamplingConfig(temperature=0.9, top_k=k, seed=4, max_tokens=6, ignore_eos=True))
            for k in (0, 10**20)]
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


# ----------------------------------------------------------------------------- seeded speculation

def seeded(i, max_tokens=12):
    return E.SamplingConfig(temperature=0.8, top_p=0.9, seed=7 + i, max_tokens=max_tokens, ignore_eos=True)


def test_make_generator_per_position():
    a, b = S.make_generator(7, position=3), S.make_generator(7, position=3)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    draws = {tuple(torch.rand(2, generator=S.make_generator(s, position=p)).tolist())
             for s in (0, 1, 2**32, 2**64 - 1) for p in range(4)}
    assert len(draws) == 16                          # (seed, position) pairs: all different streams
    assert S.make_generator(None, position=3) is None


@pytest.mark.parametrize("speculative", [True, False], ids=["speculative", "plain"])
def test_seeded_tokens_do_not_depend_on_the_pool_the_batch_or_k(folders, speculative):
    ps = prompts()
    params = [seeded(i) for i in range(len(ps))]
    spec = dict(speculative=speculative, num_speculative_tokens=3)
    big = engine(folders["tiny"], **spec)
    reference = [o.token_ids for o in big.generate(ps, params)]
    assert big.stats_summary()["preemptions"] == 0
    small = engine(folders["tiny"], block_size=4, num_kv_blocks=26, max_model_len=96, **spec)   # preempts, cuts k
    assert [o.token_ids for o in small.generate(ps, params)] == reference
    assert small.stats_summary()["preemptions"] > 0
    chunked = engine(folders["tiny"], max_num_batched_tokens=7, max_num_seqs=3, **spec)
    assert [o.token_ids for o in chunked.generate(ps, params)] == reference
    for i in (0, 4, 7):                                                                           # alone
        assert big.generate([ps[i]], params[i])[0].token_ids == reference[i]
    if speculative:                                                                               # another k
        other_k = engine(folders["tiny"], speculative=True, num_speculative_tokens=1)
        assert [o.token_ids for o in other_k.generate(ps[:4], params[:4])] == reference[:4]
        stats = big.stats_summary()
        assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]
    assert big.block_manager.num_free_blocks == big.num_kv_blocks
    assert small.block_manager.num_free_blocks == small.num_kv_blocks


def test_seeded_speculation_with_the_target_as_draft_accepts_and_reproduces(folders):
    """The target as its own draft: every guess, the one past k included, passes; the tokens are still the
    seed's, whatever k."""
    outs = []
    for k in (1, 4):
        eng = engine(folders["tiny"], speculative=True, draft_model=folders["tiny"], num_speculative_tokens=k)
        outs.append([o.token_ids for o in eng.generate(prompts(3), [seeded(i, 20) for i in range(3)])])
        assert eng.stats_summary()["spec_acceptance_rate"] >= 0.99
        assert eng.block_manager.num_free_blocks == eng.num_kv_blocks
        assert eng.speculative.draft.block_manager.num_free_blocks == eng.num_kv_blocks
    assert outs[0] == outs[1]


# ----------------------------------------------------------------------------- streaming and stop strings

@pytest.fixture(scope="module")
def stream_engine(folders):
    eng = engine(folders["tiny"])
    full = eng.generate(prompts(2), E.SamplingConfig(temperature=0, max_tokens=24, ignore_eos=True))
    return eng, [o.text for o in full]


def assert_stream_adds_up(eng, ps, params):
    texts, finals = {}, {}
    for delta, out in eng.stream(ps, params):
        texts[out.request_id] = texts.get(out.request_id, "") + delta
        if out.finished:
            finals[out.request_id] = out.text
        else:
            for stop in out_stops(params):
                assert stop not in texts[out.request_id]
    assert texts == finals
    return finals


def out_stops(params):
    return [s for p in (params if isinstance(params, list) else [params]) for s in p.stop]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_streamed_text_equals_the_final_text(stream_engine, data):
    eng, full = stream_engine
    stops = []
    for _ in range(data.draw(st.integers(1, 3))):
        if data.draw(st.booleans()):                 # a piece of what will be generated: it does stop
            text = full[data.draw(st.integers(0, 1))]
            start = data.draw(st.integers(0, max(0, len(text) - 1)))
            stops.append(text[start:start + data.draw(st.integers(1, 12))] or "x")
        else:
            stops.append(data.draw(st.text(min_size=1, max_size=6)))
    params = E.SamplingConfig(temperature=0, max_tokens=24, ignore_eos=True, stop=stops)
    finals = assert_stream_adds_up(eng, prompts(2), params)
    for text, final in zip(full, [finals[rid] for rid in sorted(finals)]):
        assert text.startswith(final)


def test_stream_holds_back_a_started_stop_string(stream_engine):
    eng, full = stream_engine
    text = full[0]
    stop = text[len(text) // 2:][:6] + "\x00never"   # starts in the text, never completes: held back, then released
    finals = assert_stream_adds_up(eng, prompts(1), E.SamplingConfig(temperature=0, max_tokens=24, ignore_eos=True,
                                                                     stop=[stop]))
    assert list(finals.values()) == [text]


# ----------------------------------------------------------------------------- non-finite logits

@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_non_finite_logits_fail_that_request_alone(folders, speculative):
    eng = engine(folders["untied"], speculative=speculative, num_speculative_tokens=2)
    ps, bad_id = prompts(4), 4242
    params = [seeded(i, 8) if i % 2 else E.SamplingConfig(temperature=0, max_tokens=8, ignore_eos=True) for i in range(4)]
    alone = [eng.generate([p], q)[0].token_ids for p, q in zip(ps, params)]
    for poison in (float("nan"), float("inf")):              # a broken model: one token's embedding
        with torch.no_grad():
            eng.model.model.embed_tokens.weight[bad_id] = poison
        outs = eng.generate(ps[:2] + [ps[2] + [bad_id]] + ps[3:], params)
        bad = outs[2]
        assert bad.finish_reason == "error" and "not finite" in bad.error and bad.token_ids == []
        assert [o.token_ids for o in outs[:2] + outs[3:]] == alone[:2] + alone[3:]
        assert all(o.finish_reason == "length" and o.error is None for o in outs[:2] + outs[3:])
    assert eng.block_manager.num_free_blocks == eng.num_kv_blocks
