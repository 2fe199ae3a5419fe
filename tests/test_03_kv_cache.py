"""03_kv_cache.py: cached greedy decoding equals the uncached reference, token for token and logit for logit."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import load

M = load("02_model")
C = load("03_kv_cache")

PROMPTS = [
    [9707],                                                   # one token: prefill is a single position
    [785, 6722, 315, 9625, 374],                              # "The capital of France is"
    [151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30, 151645, 198, 151644, 77091, 198],
    list(range(1000, 1037)),
]
N_NEW = 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "tiny": M.load_model(M.make_random_checkpoint(str(root / "tiny"), "tiny", seed=1, dtype="float32")),
        "tiny-untied": M.load_model(M.make_random_checkpoint(str(root / "untied"), "tiny-untied", seed=2,
                                                             dtype="float32")),
    }


@torch.inference_mode()
def full_forward(model, ids):
    """Uncached: the whole sequence through the plain model -> hidden (N, hidden)."""
    return model(torch.tensor(ids), torch.arange(len(ids)))


@torch.inference_mode()
def last_logits(model, ids):
    """Uncached next-token logits (vocab,) after ids."""
    return model.compute_logits(full_forward(model, ids)[-1])


@pytest.mark.parametrize("name", ["tiny", "tiny-untied"])
@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"{len(p)}tok")
def test_greedy_ids_identical_to_naive(models, name, prompt):
    model = models[name]
    ref = M.naive_generate(model, prompt, N_NEW)
    assert len(set(ref)) > 1, "degenerate reference (one token repeated) would prove little"
    assert C.generate_with_cache(model, prompt, N_NEW) == ref


def test_eos_stops_like_naive(models):
    model, prompt = models["tiny"], PROMPTS[1]
    eos = M.naive_generate(model, prompt, N_NEW)[5]
    ref = M.naive_generate(model, prompt, N_NEW, eos_token_ids=(eos,))
    out = C.generate_with_cache(model, prompt, N_NEW, eos_token_ids=(eos,))
    assert out == ref and out[-1] == eos and len(out) <= 6


@pytest.mark.parametrize("name", ["tiny", "tiny-untied"])
def test_logits_match_uncached_forward_at_every_step(models, name):
    model, prompt = models[name], PROMPTS[2]
    steps = list(C.greedy_steps(model, prompt, N_NEW))
    assert len(steps) == N_NEW
    ids = list(prompt)
    for step, (next_id, logits) in enumerate(steps):
        ref = last_logits(model, ids)
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0, msg=f"step {step}")
        assert next_id == int(ref.argmax())
        ids.append(next_id)


def assert_close_hidden(actual, expected):
    """fp32 rounding, relative to the hidden states' scale (the final norm makes them ~100)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


class Recorder:
    """An attention context that records each layer's k/v and otherwise behaves like context=None."""

    def __init__(self):
        self.kv = {}

    def attend(self, layer_idx, q, k, v):
        self.kv[layer_idx] = (k.clone(), v.clone())
        return M.causal_attention(q, k, v)


def test_cache_after_prefill_holds_the_plain_models_kv(models):
    model, prompt = models["tiny-untied"], PROMPTS[3]
    P, cfg = len(prompt), model.config
    rec = Recorder()
    with torch.inference_mode():
        ref_hidden = model(torch.tensor(prompt), torch.arange(P), context=rec)
        cache = C.KVCache(cfg, max_len=P + 8)
        hidden = C.cached_forward(model, cache, torch.tensor(prompt))
    assert cache.length == P and cache.bytes_used == P * cfg.kv_bytes_per_token(torch.float32)
    assert cache.kv.shape == (cfg.num_hidden_layers, 2, P + 8, cfg.num_key_value_heads, cfg.head_dim)
    assert_close_hidden(hidden, ref_hidden)
    for layer in range(cfg.num_hidden_layers):
        k, v = rec.kv[layer]
        torch.testing.assert_close(cache.kv[layer, 0, :P], k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.kv[layer, 1, :P], v, atol=1e-5, rtol=1e-5)
    assert not cache.kv[:, :, P:].any(), "positions past the prompt must be untouched"


@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(1, 36), max_size=5, unique=True))
def test_prompt_fed_in_chunks_equals_one_forward(models, cuts):
    """Several new tokens on top of a non-empty cache: the causal offset (query i sees up to
    position length + i) must be right, or later chunks see the future or miss the past."""
    model, prompt = models["tiny"], PROMPTS[3]
    bounds = [0, *sorted(cuts), len(prompt)]
    cache = C.KVCache(model.config, max_len=len(prompt))
    with torch.inference_mode():
        hidden = torch.cat([C.cached_forward(model, cache, torch.tensor(prompt[a:b]))
                            for a, b in zip(bounds, bounds[1:])])
    assert_close_hidden(hidden, full_forward(model, prompt))


def test_bytes_per_token():
    demo = M.PRESETS["demo"]  # Qwen3-0.6B: 2 x 28 layers x 8 kv heads x 128 dims x 2 bytes
    assert demo.kv_bytes_per_token(torch.bfloat16) == 114688 == 112 * 1024
    assert demo.kv_bytes_per_token(torch.float32) == 2 * 114688
    cache = C.KVCache(demo, max_len=4096, dtype=torch.bfloat16, device="meta")  # shapes only, no memory
    assert cache.bytes_per_token == 114688
    assert cache.bytes_allocated == 4096 * 114688 == 448 * 2**20


def test_exceeding_max_len_raises_a_clear_error(models):
    model, prompt = models["tiny"], PROMPTS[2]  # 15 tokens
    with pytest.raises(C.CacheFullError, match=r"15 tokens \+ 8 new tokens needs 23 .*max_len=20"):
        C.generate_with_cache(model, prompt, 8, max_len=20)
    assert C.generate_with_cache(model, prompt, 8, max_len=23) == M.naive_generate(model, prompt, 8)

    cache = C.KVCache(model.config, max_len=16)
    with torch.inference_mode():
        C.cached_forward(model, cache, torch.tensor(prompt))
        before = cache.kv.clone()
        with pytest.raises(C.CacheFullError, match="max_len=16"):
            C.cached_forward(model, cache, torch.tensor([1, 2]))
    assert cache.length == 15 and torch.equal(cache.kv, before), "a refused forward must leave the cache as it was"


def test_empty_prompt_is_refused(models):
    with pytest.raises(ValueError, match="at least one token"):
        C.generate_with_cache(models["tiny"], [], 4)
