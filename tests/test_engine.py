"""engine.py: continuous batching, paging, preemption, prefix caching and chunked prefill must all give
exactly the tokens of the simplest path (02_model.naive_generate: no cache, batch of one); and which
of nano_kernels' fast paths the engine plugs in (the kernels themselves: test_kernels.py)."""
import mmap
import random

import pytest
import torch

from conftest import HAS_COMPILER, built_cpu_extension, hf_saved_checkpoint, load
from nano_kernels.linear import GEMVLinear, OneDNNLinear, PackedLinear, SmallBatchLinear
from nano_kernels.memory import HUGE_PAGE
from nano_kernels.norm import FusedNormRoPEAttention, FusedRMSNorm

M = load("02_model")
E = load("engine")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    return {"tiny": M.make_random_checkpoint(str(root / "tiny"), "tiny", seed=7, dtype="float32"),
            "hf-saved": hf_saved_checkpoint(str(root / "hf"), "tiny-untied", seed=11)}


def prompts(n=9, seed=0):
    rng = random.Random(seed)
    lengths = [1, 3, 16, 17, 40, 5, 33, 64, 9, 2, 24][:n]
    return [[rng.randrange(151643) for _ in range(k)] for k in lengths]


def engine(folder, **kw):
    cfg = dict(model=folder, dtype="float32", device="cpu", max_model_len=256, num_kv_blocks=128)
    cfg.update(kw)
    return E.LLMEngine(E.EngineConfig(**cfg))


GREEDY = E.SamplingConfig(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(folders):
    """naive_generate, one prompt at a time: the tokens every configuration must reproduce."""
    out = {}
    for name, folder in folders.items():
        model = M.load_model(folder, torch.float32)
        out[name] = [M.naive_generate(model, p, 12) for p in prompts()]
    return out


@pytest.mark.parametrize("name", ["tiny", "hf-saved"])
@pytest.mark.parametrize("setting", [
    dict(),                                                     # continuous batching, all at once
    dict(block_size=4, num_kv_blocks=30, max_model_len=96),       # tiny pool: preemption
    dict(max_num_batched_tokens=7),                             # chunked prefill
    dict(enable_prefix_caching=False),
    dict(max_num_seqs=1),                                       # one at a time through the engine
], ids=["batched", "preemption", "chunked", "no-prefix-cache", "serial"])
def test_engine_equals_naive_generate(folders, reference, name, setting):
    eng = engine(folders[name], **setting)
    if HAS_COMPILER:
        built_cpu_extension()                                         # a compiler: it must have built
    assert eng.fast.decode_kernel == HAS_COMPILER                     # decode rows in the C++ kernel
    assert eng.runner.backend is (eng.fast.attention or load("04_paged_attention").TORCH_SDPA)
    outs = eng.generate(prompts(), GREEDY)
    assert [o.token_ids for o in outs] == reference[name]
    assert all(o.finish_reason == "length" for o in outs)
    if "num_kv_blocks" in setting:
        assert eng.stats_summary()["preemptions"] > 0
    assert eng.block_manager.num_free_blocks == eng.num_kv_blocks       # everything given back


@pytest.mark.parametrize("name", ["tiny", "hf-saved"])
def test_engine_without_the_decode_kernel_equals_naive_generate(folders, reference, name, no_extension):
    """Where the kernels cannot be built, decode rows gather and run SDPA: the same tokens."""
    eng = engine(folders[name], max_num_batched_tokens=7)
    assert not eng.fast.decode_kernel and eng.fast.attention is None
    assert eng.runner.backend is load("04_paged_attention").TORCH_SDPA and not eng.runner.decode_op
    assert [o.token_ids for o in eng.generate(prompts(), GREEDY)] == reference[name]


@pytest.mark.skipif(not HAS_COMPILER, reason="inductor compiles C++: needs a compiler")
@pytest.mark.parametrize("name, n, max_num_seqs", [("tiny", 3, 4), ("hf-saved", 3, 4), ("tiny", 6, 8)])
def test_compiled_engine_equals_naive_generate(folders, reference, name, n, max_num_seqs):
    """--compile (inductor, weights frozen into the graph, the paged attention an opaque op, decode
    steps of 3 padded to a bucket of 4): a real compile. Guards the compiled path itself, e.g.
    against weights that freezing would read wrongly or padding rows that leak; and, the second
    checkpoint compiled in the same process with the same shapes, that an engine never runs another
    engine's graph (the compiled model skips its guards on modules: only its own cache may hold it).
    Buckets of up to 4 rows run the GEMV kernel as an op in the graph; the bucket of 8, inductor's
    GEMM on frozen weights (each on huge pages of its own: the tiny embedding, the tied lm_head,
    is one, and a shared buffer or an offset into one made freezing read the wrong numbers)."""
    eng = engine(folders[name], compile=True, max_num_batched_tokens=64, max_num_seqs=max_num_seqs)
    outs = eng.generate(prompts()[:n], GREEDY)
    assert [o.token_ids for o in outs] == reference[name][:n]
    assert eng.runner.step_attention.ctx is not None             # the compiled graph did run
    built_cpu_extension()                                        # a compiler is here: the C++ built
    assert eng.fast.linear == "GEMVLinear" and isinstance(eng.model.lm_head.batched, torch.nn.Linear)
    assert not eng.fast.norms and eng.fast.decode_kernel         # inductor fuses the norms; decode: the C++ op


ON_EACH_DEVICE = pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])


@ON_EACH_DEVICE
def test_prefix_caching_hits_and_is_identical(folders, device):
    system = list(range(500, 540))                       # a 40-token shared "system prompt"
    ps = [system + [7, 8, 9], system + [1], system + [2, 3, 4, 5, 6], system + [2, 3, 4, 5, 6]]
    on = engine(folders["tiny"], block_size=8, device=device)
    off = engine(folders["tiny"], block_size=8, enable_prefix_caching=False, device=device)
    a = [o.token_ids for o in on.generate(ps[:1], GREEDY)] + [o.token_ids for o in on.generate(ps[1:], GREEDY)]
    b = [o.token_ids for o in off.generate(ps, GREEDY)]
    assert a == b
    assert on.stats_summary()["prefix_cache_hit_tokens"] >= 3 * 40
    assert off.stats_summary()["prefix_cache_hit_tokens"] == 0


@ON_EACH_DEVICE
def test_seeded_sampling_is_reproducible_whatever_the_batch(folders, device):
    p = E.SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, seed=1234, max_tokens=10, ignore_eos=True)
    alone = engine(folders["tiny"], device=device).generate([prompts()[4]], p)[0].token_ids
    others = [E.SamplingConfig(temperature=0.8, max_tokens=7, ignore_eos=True),
              p, E.SamplingConfig(temperature=0.0, max_tokens=3, ignore_eos=True),
              E.SamplingConfig(temperature=1.3, seed=5, max_tokens=12, ignore_eos=True)]
    mixed = engine(folders["tiny"], device=device).generate([prompts()[0], prompts()[4], prompts()[2], prompts()[7]],
                                                            others)
    assert mixed[1].token_ids == alone
    assert len(set(alone)) > 1


def test_bad_request_is_rejected_alone(folders):
    eng = engine(folders["tiny"])
    eng.add_request(prompts()[2], GREEDY)
    for bad_prompt, bad_params in [([], GREEDY), (list(range(300)), GREEDY), ([151936], GREEDY),
                                   ([1, 2], E.SamplingConfig(temperature=-1.0)),
                                   ([1, 2], E.SamplingConfig(max_tokens=0))]:
        with pytest.raises(ValueError):
            eng.add_request(bad_prompt, bad_params)
    outs = []
    while eng.has_unfinished_requests():
        outs += [o for o in eng.step() if o.finished]
    assert len(outs) == 1 and len(outs[0].token_ids) == 12


def test_stop_rules(folders):
    eng = engine(folders["tiny"])
    full = eng.generate([prompts()[3]], GREEDY)[0]
    stop_id = full.token_ids[4]
    o = eng.generate([prompts()[3]], E.SamplingConfig(temperature=0, max_tokens=12, stop_token_ids=[stop_id]))[0]
    assert o.finish_reason == "stop" and o.token_ids == full.token_ids[:full.token_ids.index(stop_id) + 1]
    stop_text = full.text[len(full.text) // 2:][:3]
    if stop_text:
        o = eng.generate([prompts()[3]], E.SamplingConfig(temperature=0, max_tokens=12, stop=[stop_text]))[0]
        assert o.finish_reason == "stop" and o.text == full.text[:full.text.find(stop_text)]
    o = eng.generate([prompts()[3]], E.SamplingConfig(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert o.finish_reason == "length" and len(o.token_ids) == 5


def test_stream_deltas_add_up_to_the_text(folders):
    eng = engine(folders["tiny"])
    texts, finals = {}, {}
    for delta, out in eng.stream([prompts()[1], prompts()[5]], GREEDY):
        texts[out.request_id] = texts.get(out.request_id, "") + delta
        if out.finished:
            finals[out.request_id] = out.text
    assert texts == finals


def test_hooks_cost_nothing_when_off_and_see_every_step(folders):
    eng = engine(folders["tiny"])
    events = []

    class Recorder:
        def on_event(self, event, data):
            events.append(event)

    eng.generate([prompts()[0]], GREEDY)
    assert events == []
    eng.observers.append(Recorder())
    eng.generate([prompts()[0]], GREEDY)
    assert events.count("step_done") == eng.stats["steps"] // 2 and "finished" in events


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.skipif(
    not HAS_COMPILER, reason="inductor compiles C++: needs a compiler"))], ids=["model", "compiled"])
def test_cuda_graph_decoder_padding_without_a_gpu(folders, compiled):
    """The CUDA-graph decode path minus the capture: static buffers, batch padded to a bucket with
    rows that only touch the scratch block. Same hidden states as eager, real blocks untouched.
    compiled: what --compile on CUDA captures, the compiled step (attention its opaque op)."""
    P = load("04_paged_attention")
    model = M.load_model(folders["tiny"], torch.float32)
    cfg, bs, nb = model.config, 4, 40
    bm = P.BlockManager(nb, bs, enable_prefix_caching=False)
    kv = P.allocate_kv_cache(cfg, nb + 1, bs, torch.float32, "cpu")
    ps = prompts(3)
    with torch.inference_mode():
        for sid, p in enumerate(ps):                      # prefill each, then reserve a decode slot
            bm.allocate(sid, p)
            model(torch.tensor(p), torch.arange(len(p)), P.PagedContext.from_spans(kv, bm, [(sid, 0, len(p))]))
            bm.append_slots(sid, 1)
        spans = [(sid, len(p), len(p) + 1) for sid, p in enumerate(ps)]
        ids, pos = torch.tensor([5, 6, 7]), torch.tensor([len(p) for p in ps])
        kv_eager = kv.clone()
        ctx = P.PagedContext.from_spans(kv_eager, bm, spans)
        eager = model(ids, pos, ctx)
        runner = E.ModelRunner(model, bm, kv, torch.device("cpu"), 32, 8, compile=True) if compiled else None
        dec = E.CUDAGraphDecoder(model, kv, bs, max_blocks_per_seq=32, max_batch=8, scratch_block=nb, capture=False,
                                 forward=runner.run_compiled if compiled else None)
        ctx = P.PagedContext.from_spans(kv, bm, spans)
        graphed = dec.run(ids, pos, ctx.slot_mapping, ctx.block_tables, ctx.context_lens)   # padded to 4 rows
    # eager decode attends per sequence, the graph path over padded tables: the same sums in another order,
    # so rounding differs (both are ~1e-4 from a float64 run, where hidden states reach ~100)
    torch.testing.assert_close(graphed, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kv[:, :, :nb], kv_eager[:, :, :nb], atol=1e-5, rtol=1e-5)  # same K/V written
    assert kv[:, :, nb].abs().sum() > 0 and kv_eager[:, :, nb].abs().sum() == 0   # padding wrote only scratch
    assert E.bucket(3, 8) == 4 and E.bucket(9, 12) == 12 and E.bucket(1, 8) == 1
    if compiled:
        assert runner.step_attention.num_tokens == 4                  # the compiled step ran, on 4 rows


def test_eager_cpu_engine_runs_the_fused_attention_and_norms():
    eng = E.LLMEngine(E.EngineConfig(model="tiny", dtype="float32", device="cpu", max_model_len=64))
    if HAS_COMPILER:
        built_cpu_extension()                                         # a compiler: it must have built
    assert eng.fast.norms == HAS_COMPILER
    kinds = {type(layer.self_attn) for layer in eng.model.model.layers}
    assert kinds == ({FusedNormRoPEAttention} if HAS_COMPILER else {M.Qwen3Attention})
    norms = {type(m) for m in eng.model.modules() if isinstance(m, M.RMSNorm)}
    assert norms == ({FusedRMSNorm} if HAS_COMPILER else {M.RMSNorm})


def test_without_the_gemv_kernel_the_engine_keeps_torch_s_kernels(folders, reference, no_extension):
    """No compiler: one warning at build time (no_extension checks it), then the batched kernels do
    all, and nothing else of the C++ is plugged in."""
    eng = engine(folders["tiny"], dtype="float32")
    assert eng.fast.linear in ("OneDNNLinear", "SmallBatchLinear")
    assert not eng.fast.norms and eng.fast.attention is None
    assert not any(isinstance(m, (GEMVLinear, FusedRMSNorm, FusedNormRoPEAttention)) for m in eng.model.modules())
    assert [o.token_ids for o in eng.generate(prompts(), GREEDY)] == reference["tiny"]


def batched(module):
    """The module that takes a GEMVLinear's larger batches (itself for any other module)."""
    return module.batched if isinstance(module, GEMVLinear) else module


def test_fp32_engine_on_intel_uses_small_batch_linear_and_keeps_the_tie(folders, reference, monkeypatch):
    monkeypatch.setattr(load("nano_kernels.linear"), "cpu_vendor", lambda: "GenuineIntel")
    eng = engine(folders["tiny"], dtype="float32")
    assert eng.fast.linear.endswith("SmallBatchLinear") and isinstance(batched(eng.model.lm_head), SmallBatchLinear)
    assert (eng.fast.linear == "GEMVLinear + SmallBatchLinear") == HAS_COMPILER
    assert eng.model.lm_head.weight is eng.model.model.embed_tokens.weight
    assert [o.token_ids for o in eng.generate(prompts(), GREEDY)] == reference["tiny"]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_fp32_engine_on_amd_uses_onednn(folders, reference, monkeypatch):
    """MKL is slow on AMD CPUs, so fp32 weights go to oneDNN there (the same Parameters, no packed
    copy: the tie stays); the tokens stay naive_generate's."""
    monkeypatch.setattr(load("nano_kernels.linear"), "cpu_vendor", lambda: "AuthenticAMD")
    eng = engine(folders["tiny"], dtype="float32")
    assert eng.fast.linear.endswith("OneDNNLinear") and isinstance(batched(eng.model.lm_head), OneDNNLinear)
    assert (eng.fast.linear == "GEMVLinear + OneDNNLinear") == HAS_COMPILER
    assert eng.model.lm_head.weight is eng.model.model.embed_tokens.weight
    assert [o.token_ids for o in eng.generate(prompts(), GREEDY)] == reference["tiny"]


@pytest.mark.skipif(not (M.cpu_has_bf16() and torch.backends.mkldnn.is_available()), reason="needs CPU bf16 units")
def test_bf16_engine_uses_onednn_and_keeps_the_model_s_predictions(folders):
    """bf16 rounding depends on the kernels (their order of summation), so the check is against the
    fp32 model: the engine's bf16 logits are as close to it as the plain bf16 model's (on average,
    within 25%), and give its top-1 token as often (give or take one position)."""
    eng = engine(folders["tiny"], dtype="bfloat16")
    assert isinstance(batched(eng.model.model.layers[0].mlp.up_proj), PackedLinear)     # oneDNN, its packed copy
    assert isinstance(batched(eng.model.lm_head), OneDNNLinear)                          # the lm_head: no copy
    plain, exact = M.load_model(folders["tiny"], torch.bfloat16), M.load_model(folders["tiny"], torch.float32)
    logits = lambda model, ids: model.compute_logits(model(ids, torch.arange(len(ids)))).float()   # noqa: E731
    for ids in (torch.tensor(prompts()[6]), torch.tensor(prompts()[6][:2])):     # 33 rows: oneDNN; 2: the GEMV kernel
        with torch.inference_mode():
            a, b, r = logits(eng.model, ids), logits(plain, ids), logits(exact, ids)
        assert (a - r).abs().mean() <= 1.25 * (b - r).abs().mean()
        top1 = r.argmax(-1)
        assert (a.argmax(-1) == top1).sum() >= (b.argmax(-1) == top1).sum() - 1


def test_engine_weights_and_kv_pool_on_huge_pages(folders):
    """On a CPU the weights are loaded straight into one huge-page buffer (eager; --compile: a
    buffer per big matrix, test_kernels.py) and the KV pool is zeroed huge-page memory; the sizes
    the engine reports are theirs (a tied lm_head counted once)."""
    eng = engine(folders["tiny"], dtype="float32")
    assert not eng.kv_cache.any() and eng.kv_cache.shape[2] == eng.num_kv_blocks
    assert eng.kv_cache_bytes == eng.kv_cache.nbytes
    params = list(eng.model.parameters())
    assert eng.weights_bytes == sum(p.nbytes for p in params) and any(p is eng.model.lm_head.weight for p in params)
    assert eng.model.lm_head.weight is eng.model.model.embed_tokens.weight
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1                  # one buffer
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert eng.kv_cache.data_ptr() % HUGE_PAGE == 0
        assert params[0].untyped_storage().data_ptr() % HUGE_PAGE == 0
