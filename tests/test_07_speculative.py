"""07_speculative: speculation must be lossless (greedy ids are the target's; sampled tokens follow the
target's distribution, chi-square), batched, reproducible per seed, rolled back without leaking a block or
caching an unverified token, and wired into the engine (stop rules, events, stats) and the CLI."""
import json
import random
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from conftest import load

M = load("02_model")
kv = load("03_kv_cache")
paged = load("04_paged_attention")
S = load("06_sampling")
P = load("07_speculative")
E = load("engine")
run = load("run")

# A model small enough to enumerate: 16 tokens. The final norm is scaled down so its next-token
# distributions are spread (top token ~0.5) and its one-layer early-exit draft passes ~half the guesses.
SMALL = M.ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=256)


def small_state_dict(seed=3):
    sd = M.random_state_dict(SMALL, seed)
    sd["model.norm.weight"] /= 4
    return sd


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    small = root / "small-vocab"
    small.mkdir()
    save_file(small_state_dict(), str(small / "model.safetensors"))
    (small / "config.json").write_text(json.dumps(M.hf_config_dict(SMALL, "float32")))
    return {"tiny": M.make_random_checkpoint(str(root / "tiny"), "tiny", seed=7, dtype="float32"),
            "other": M.make_random_checkpoint(str(root / "other"), "tiny", seed=8, dtype="float32"),
            "small-vocab": str(small)}


def prompts(n=9, seed=0):
    rng = random.Random(seed)
    lengths = [1, 3, 16, 17, 40, 5, 33, 64, 9][:n]
    return [[rng.randrange(151643) for _ in range(k)] for k in lengths]


def engine(folder, **kw):
    cfg = dict(model=folder, dtype="float32", device="cpu", max_model_len=256, num_kv_blocks=128,
               speculative=True, num_speculative_tokens=3)
    cfg.update(kw)
    return E.LLMEngine(E.EngineConfig(**cfg))


GREEDY = E.SamplingConfig(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(folders):
    model = M.load_model(folders["tiny"], torch.float32)
    return [kv.generate_with_cache(model, p, 12) for p in prompts()]     # == naive_generate (test_03)


# ----------------------------------------------------------------------------- the rule and the formula


def test_expected_speedup_and_the_counts():
    assert P.expected_speedup(0.0, 4, 0.1) == pytest.approx(1 / 1.4)          # never right: pure overhead
    assert P.expected_speedup(1.0, 4, 0.1) == pytest.approx(5 / 1.4)          # always right: k + 1 per step
    assert P.expected_speedup(0.8, 4, 0.1) == pytest.approx((1 - 0.8 ** 5) / 0.2 / 1.4)
    st = P.SpecDecodingStats(4)
    for k, a in [(4, 2), (4, 4), (2, 0)]:
        st.observe(k, a)
    assert st.num_accepted_tokens_per_pos == [2, 2, 1, 1] and st.num_checked_tokens_per_pos == [3, 2, 2, 1]
    assert st.acceptance_rate == pytest.approx(6 / 10) and st.mean_acceptance_length == pytest.approx(1 + 6 / 3)
    assert st.alpha == pytest.approx(6 / 8) and st.alpha_per_position == pytest.approx([2 / 3, 1, 1 / 2, 1])
    assert st.summary()["spec_acceptance_per_position"] == pytest.approx([2 / 3, 2 / 3, 1 / 3, 1 / 3], abs=1e-4)


def test_rejection_sample_greedy_is_argmax_agreement():
    V = 5
    one_hot = lambda ids: torch.nn.functional.one_hot(torch.tensor(ids), V).float()  # noqa: E731
    draft = torch.tensor([[1, 2, 3], [1, 2, 3], [4, 4, 4]])
    q = torch.stack([one_hot([1, 2, 3])] * 3)
    p = torch.stack([one_hot([1, 2, 3, 0]), one_hot([1, 0, 3, 0]), one_hot([2, 2, 2, 2])])
    out, acc = P.rejection_sample(draft, torch.tensor([3, 3, 1]), q, p, [True] * 3, [None] * 3)
    assert acc.tolist() == [3, 1, 0]
    assert out.tolist() == [[1, 2, 3, 0], [1, 0, -1, -1], [2, -1, -1, -1]]   # bonus; replacement = target's argmax


def chi2_sf(x: float, df: int) -> float:
    """P(chi-square with df degrees of freedom > x) = Q(df/2, x/2), the regularised upper incomplete gamma."""
    a, y = torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(a, y))


def chi_square_p_value(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Cells expected < 5 times are pooled into one, as the chi-square approximation needs."""
    n = observed.sum()
    expected = expected_probs.double() * n
    small = expected < 5
    obs = torch.cat([observed[~small].double(), observed[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    assert int(keep.sum()) >= 2, "a chi-square test needs two cells at least"
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return chi2_sf(stat, int(keep.sum()) - 1)


def test_rejection_sample_first_token_follows_p():
    p = torch.tensor([0.50, 0.30, 0.15, 0.05])
    q = torch.tensor([0.30, 0.50, 0.10, 0.10])
    n, gen = 20000, S.make_generator(0)
    draft = P.sample_from_probs(q.expand(n, 4), [False] * n, [gen] * n)[:, None]
    out, acc = P.rejection_sample(draft, torch.ones(n, dtype=torch.int64), q.expand(n, 1, 4), p.expand(n, 2, 4),
                                  [False] * n, [gen] * n)
    assert chi_square_p_value(torch.bincount(out[:, 0], minlength=4), p) > 1e-3
    assert acc.float().mean().item() == pytest.approx(0.75, abs=0.015)       # sum min(p, q)


@torch.inference_mode()
def next_token_probs(model, contexts: list[list[int]], config) -> torch.Tensor:
    """The target's sampling distribution after each context (C, V): all contexts in one packed forward
    over a fresh paged cache (04's prefill path, checked against dense attention there)."""
    bm = paged.BlockManager(len(contexts), block_size=16, enable_prefix_caching=False)
    kv_cache = paged.allocate_kv_cache(model.config, len(contexts), 16)
    for i, c in enumerate(contexts):
        bm.allocate(i, c)
    ends = torch.tensor([len(c) for c in contexts]).cumsum(0) - 1
    logits = P.forward_spans(model, kv_cache, bm, [(i, 0, len(c)) for i, c in enumerate(contexts)],
                             [t for c in contexts for t in c], ends.tolist())
    return S.Sampler().probs(logits, [config] * len(contexts)).double()


def exact_distributions(model, prompt, config):
    """p(t1), p(t2 | t1), p(t3 | t1, t2) of the target with the sampling filters, by enumeration."""
    V = SMALL.vocab_size
    p1 = next_token_probs(model, [prompt], config)[0]                                      # (V,)
    p2 = next_token_probs(model, [prompt + [a] for a in range(V)], config)                 # (V, V)
    p3 = next_token_probs(model, [prompt + [a, b] for a in range(V) for b in range(V)], config).view(V, V, V)
    return p1, p2, p3


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.8, top_k=8, top_p=0.9, min_p=0.05)],
                         ids=["T=1", "filters"])
def test_sampled_tokens_follow_the_target_distribution(params):
    target = M.Qwen3ForCausalLM(SMALL)
    target.load_state_dict(small_state_dict(), strict=False)
    target.eval()
    draft = P.early_exit_draft(target, 1)
    prompt, n = [1, 2, 3], 2000
    configs = [S.SamplingConfig(seed=i, max_tokens=3, **params) for i in range(n)]
    ids, decoder = P.generate(target, draft, [prompt] * n, configs, num_speculative_tokens=2, num_blocks=2 * n,
                              max_num_seqs=n)
    st = decoder.stats
    assert 0.2 < st.acceptance_rate < 0.9 and st.num_accepted_tokens_per_pos[1] > 100   # accept, reject, bonus
    tokens = torch.tensor(ids)                                                              # (n, 3)
    p1, p2, p3 = exact_distributions(target, prompt, configs[0])
    V = SMALL.vocab_size
    joint12 = (p1[:, None] * p2).flatten()                                                  # (V*V,)
    p3_marginal = (p1[:, None, None] * p2[:, :, None] * p3).sum((0, 1))                    # (V,)
    assert chi_square_p_value(torch.bincount(tokens[:, 0] * V + tokens[:, 1], minlength=V * V), joint12) > 1e-3
    assert chi_square_p_value(torch.bincount(tokens[:, 2], minlength=V), p3_marginal) > 1e-3


# ----------------------------------------------------------------------------- in the engine


@pytest.mark.parametrize("setting", [
    dict(),                                                          # continuous batching, all at once
    dict(block_size=4, num_kv_blocks=30, max_model_len=96),          # tiny pools: preemption, fewer guesses
    dict(max_num_batched_tokens=7, enable_prefix_caching=False),     # chunked prefill, no prefix cache
    dict(draft_model="other"),                                       # a different checkpoint as the draft
], ids=["batched", "preemption", "chunked-no-prefix-cache", "other-draft"])
def test_greedy_ids_equal_the_targets(folders, reference, setting):
    if "draft_model" in setting:
        setting = dict(setting, draft_model=folders[setting["draft_model"]])
    eng = engine(folders["tiny"], **setting)
    outs = eng.generate(prompts(), GREEDY)
    assert [o.token_ids for o in outs] == reference
    stats = eng.stats_summary()
    assert stats["spec_num_drafts"] > 0 and stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]
    if "num_kv_blocks" in setting:
        assert stats["preemptions"] > 0
    assert eng.block_manager.num_free_blocks == eng.num_kv_blocks                       # nothing leaked
    draft = eng.speculative.draft
    assert draft.block_manager.num_free_blocks == eng.num_kv_blocks and not draft.num_computed_tokens


def test_draft_equal_to_target_accepts_everything(folders):
    eng = engine(folders["tiny"], draft_model=folders["tiny"])
    eng.generate(prompts(4), GREEDY)
    assert eng.stats_summary()["spec_acceptance_rate"] == 1.0
    eng = engine(folders["tiny"], draft_model=folders["tiny"], num_speculative_tokens=4)
    sampled = [E.SamplingConfig(temperature=1.0, seed=i, max_tokens=64, ignore_eos=True) for i in range(4)]
    eng.generate(prompts(4), sampled)
    stats = eng.stats_summary()
    assert stats["spec_draft_tokens"] > 150 and stats["spec_acceptance_rate"] >= 0.99   # p, q differ by rounding only


def test_seeded_request_is_reproducible_whatever_the_batch(folders):
    p = E.SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, seed=1234, max_tokens=10, ignore_eos=True)
    alone = engine(folders["tiny"]).generate([prompts()[4]], p)[0].token_ids
    others = [E.SamplingConfig(temperature=0.8, max_tokens=7, ignore_eos=True), p,
              E.SamplingConfig(temperature=0.0, max_tokens=3, ignore_eos=True),
              E.SamplingConfig(temperature=1.3, seed=5, max_tokens=12, ignore_eos=True)]
    mixed = engine(folders["tiny"], max_num_batched_tokens=16).generate(
        [prompts()[0], prompts()[4], prompts()[2], prompts()[7]], others)
    assert mixed[1].token_ids == alone and len(set(alone)) > 1


def check_pool(bm, computed: dict, tokens: dict):
    """Every reserved slot is a computed, verified token; refcounts match the block tables; committed
    (prefix-cached) blocks hold exactly the sequence's tokens."""
    assert set(bm.block_tables) == set(computed)
    tables = list(bm.block_tables.values())
    assert sum(bm.ref_count(b) for b in range(bm.num_blocks)) == sum(len(t) for t in tables)
    assert bm.num_used_blocks == len({b for t in tables for b in t})
    for sid, n in computed.items():
        assert bm.num_tokens[sid] == n and len(bm.block_tables[sid]) == -(-n // bm.block_size)
        assert bm.num_committed_tokens(sid) <= n
        for i in range(bm.num_committed_tokens(sid) // bm.block_size):
            b = bm.block_tables[sid][i]
            if bm.is_cached(b):
                assert bm.cached_tokens(b) == tuple(tokens[sid][i * bm.block_size:(i + 1) * bm.block_size])


def test_rollback_leaves_the_pools_exactly_as_accounted(folders):
    eng = engine(folders["tiny"], block_size=4, num_kv_blocks=30, max_model_len=96)
    for p in prompts():
        eng.add_request(p, E.SamplingConfig(temperature=1.0, seed=len(p), max_tokens=12, ignore_eos=True))
    draft = eng.speculative.draft
    while eng.has_unfinished_requests():
        eng.step()
        running = {s.seq_id: s for s in eng.scheduler.running}
        check_pool(eng.block_manager, {i: s.num_computed_tokens for i, s in running.items()},
                   {i: s.token_ids for i, s in running.items()})
        assert set(draft.num_computed_tokens) <= set(running)                    # finished/preempted: freed
        assert all(n <= running[i].num_computed_tokens for i, n in draft.num_computed_tokens.items())
        check_pool(draft.block_manager, draft.num_computed_tokens, {i: s.token_ids for i, s in running.items()})
    stats = eng.stats_summary()
    assert stats["preemptions"] > 0 and stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]
    assert eng.block_manager.num_free_blocks == draft.block_manager.num_free_blocks == 30


def test_stop_rules_and_max_tokens_never_overshoot(folders):
    plain = engine(folders["tiny"], speculative=False)
    spec = engine(folders["tiny"], draft_model=folders["tiny"], num_speculative_tokens=5)  # every guess passes
    full = plain.generate([prompts()[3]], GREEDY)[0]
    cases = [E.SamplingConfig(temperature=0, max_tokens=3, ignore_eos=True),
             E.SamplingConfig(temperature=0, max_tokens=12, stop_token_ids=[full.token_ids[4]]),
             E.SamplingConfig(temperature=0, max_tokens=12, stop=[full.text[len(full.text) // 2:][:3]])]
    for params in cases:
        a, b = plain.generate([prompts()[3]], params)[0], spec.generate([prompts()[3]], params)[0]
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
    assert len(spec.generate([prompts()[3]], cases[0])[0].token_ids) == 3
    assert spec.block_manager.num_free_blocks == spec.num_kv_blocks


def test_events_tell_what_was_proposed_and_kept(folders):
    eng = engine(folders["tiny"])
    events = []

    class Recorder:
        def on_event(self, event, data):
            events.append((event, data))

    eng.observers.append(Recorder())
    outs = eng.generate(prompts(3), GREEDY)
    names = [e for e, _ in events]
    assert {"spec_proposed", "spec_verified", "sampled", "step_done", "finished"} <= set(names)
    for o in outs:
        assert [d["token_id"] for e, d in events if e == "sampled" and d["request_id"] == o.request_id] == o.token_ids
    for e, d in events:
        if e == "spec_verified":
            assert 0 <= d["num_accepted"] <= d["num_draft_tokens"] and len(d["target_probs"]) == d["num_draft_tokens"]
            assert d["bonus"] == (d["rejected_position"] is None)
    assert names.index("spec_proposed") < names.index("spec_verified") < names.index("step_done")


# ----------------------------------------------------------------------------- errors and the CLI


def test_draft_with_another_vocabulary_is_refused(folders, capsys):
    with pytest.raises(ValueError, match="vocab_size 16, the target has 151936"):
        engine(folders["tiny"], draft_model=folders["small-vocab"])
    tok = SimpleNamespace(hf=SimpleNamespace(get_vocab=lambda with_added_tokens: {"a": 0, "b": 1}))
    other = SimpleNamespace(hf=SimpleNamespace(get_vocab=lambda with_added_tokens: {"a": 1, "b": 0}))
    with pytest.raises(ValueError, match="different tokenizer"):
        P.check_same_vocabulary(SMALL, SMALL, tok, other, "x")
    code = run.main(["--model", folders["tiny"], "--draft-model", folders["small-vocab"], "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: draft model {folders['small-vocab']!r} has vocab_size 16, the target has 151936: "
        "speculative decoding needs the same vocabulary"]


def test_cli_json_has_the_spec_stats(capsys):
    code = run.main(["--model", "tiny", "--speculative", "--max-tokens", "20", "--ignore-eos", "--output", "json",
                     "--dtype", "float32"])
    out, err = capsys.readouterr()
    assert code == 0
    stats = json.loads(out)["stats"]
    assert stats["generated_tokens"] == 20 and stats["spec_num_drafts"] > 0
    for key in ("spec_draft_tokens", "spec_accepted_tokens", "spec_acceptance_rate", "spec_mean_acceptance_length",
                "spec_acceptance_per_position"):
        assert key in stats
    assert "speculative decoding: draft built-in" in err
    code = run.main(["--model", "tiny", "--speculative", "--num-speculative-tokens", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "error: --num-speculative-tokens must be a positive integer, got 0" in err
    code, _ = run.main(["--model", "tiny", "--max-tokens", "2", "--output", "json"]), capsys.readouterr()
    assert code == 0                                        # without --speculative: no spec_* keys, as before


# ----------------------------------------------------------------------------- the real weights


@pytest.mark.hub
def test_real_qwen3_draft_for_a_bigger_target():
    try:
        target, draft = M.download_model("Qwen/Qwen3-1.7B"), M.download_model("Qwen/Qwen3-0.6B")
    except M.CheckpointError as e:
        pytest.skip(f"real Qwen3 weights not available: {e}")
    prompt = ["The capital of France is", "def fibonacci(n):"]
    params = E.SamplingConfig(temperature=0, max_tokens=24, ignore_eos=True)
    cfg = dict(model=target, dtype="float32", device="auto", max_model_len=256, num_kv_blocks=64)
    plain = E.LLMEngine(E.EngineConfig(**cfg)).generate(prompt, params)
    eng = E.LLMEngine(E.EngineConfig(**cfg, speculative=True, draft_model=draft, num_speculative_tokens=4))
    spec = eng.generate(prompt, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert eng.stats_summary()["spec_acceptance_rate"] > 0.3                     # a real draft is often right
