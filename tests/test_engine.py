"""engine.py: continuous batching, paging, preemption, prefix caching and chunked prefill must all give
exactly the tokens of the simplest path (02_model.naive_generate: no cache, batch of one)."""
import mmap
import random
import shutil

import pytest
import torch

from conftest import hf_saved_checkpoint, load

M = load("02_model")
E = load("engine")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    pytest.importorskip("transformers")
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
    assert eng.decode_kernel == (shutil.which("c++") is not None)     # decode rows in 04's C++ kernel
    outs = eng.generate(prompts(), GREEDY)
    assert [o.token_ids for o in outs] == reference[name]
    assert all(o.finish_reason == "length" for o in outs)
    if "num_kv_blocks" in setting:
        assert eng.stats_summary()["preemptions"] > 0
    assert eng.block_manager.num_free_blocks == eng.num_kv_blocks       # everything given back


@pytest.mark.parametrize("name", ["tiny", "hf-saved"])
def test_engine_without_the_decode_kernel_equals_naive_generate(folders, reference, name, monkeypatch):
    """Where the kernel cannot be built, decode rows gather and run SDPA: the same tokens."""
    monkeypatch.setattr(load("04_paged_attention"), "DECODE_KERNEL_ON", ())
    eng = engine(folders[name], max_num_batched_tokens=7)
    assert not eng.decode_kernel
    assert [o.token_ids for o in eng.generate(prompts(), GREEDY)] == reference[name]


@pytest.mark.skipif(shutil.which("c++") is None, reason="inductor compiles C++: needs a compiler")
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
    if E.cpu_gemv_kernel() is not None:
        assert eng.linear_kernels == "GEMVLinear" and isinstance(eng.model.lm_head.batched, torch.nn.Linear)


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
    shutil.which("c++") is None, reason="inductor compiles C++: needs a compiler"))], ids=["model", "compiled"])
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


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
def test_packed_linear_matches_nn_linear(dtype, tol):
    if dtype == torch.bfloat16 and not M.cpu_has_bf16():
        pytest.skip("needs CPU bf16 units")
    torch.manual_seed(0)
    for rows in (1, 5, 64):
        lin = torch.nn.Linear(256, 384, bias=False).to(dtype)
        x = torch.randn(rows, 256, dtype=dtype)
        torch.testing.assert_close(E.PackedLinear(lin)(x).float(), lin(x).float(), atol=tol, rtol=tol)


NEEDS_COMPILER = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernel")


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [64, 100, 128, 256, 1024, 1024 + 16 + 3])   # whole blocks only (fp32: 128 on; bf16: 256 on), single registers, a scalar tail
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_gemv_kernel_matches_the_fp32_product(dtype, K, rows):
    """x @ W^T summed in fp32 whatever the dtype, rounded once to it: fp32 to ~1e-6, bf16 to
    within one rounding of the exact product's."""
    assert E.cpu_gemv_kernel() is not None, "a compiler is here, so the kernel must build"
    torch.manual_seed(K + rows)
    x, w = torch.randn(2 * rows, K, dtype=dtype)[::2], torch.randn(300, K, dtype=dtype)   # x not contiguous
    exact = x.double() @ w.double().T                                                      # (rows, 300)
    x_columns = x.T.contiguous().T                                                         # x's columns contiguous
    for out in (E.cpu_gemv_kernel().gemv(x, w), torch.ops.nano_vllm_cpu.gemv(x, w), E.cpu_gemv_kernel().gemv(x_columns, w)):
        assert out.shape == (rows, 300) and out.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(out.double(), exact, atol=1e-4, rtol=1e-5)
        else:
            ulp = exact.abs().to(dtype).double() * 2 ** -7                                 # one bf16 step there
            assert ((out.double() - exact).abs() <= ulp + 1e-3).all()


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_op_stores_then_attends_like_04(dtype):
    """The compiled CPU decode step's attention op: the step's k/v land in their slots exactly as
    04's store_kvcache puts them (a 1-token context attends to its own token only), each real row
    attends like the reference, a padding row (context 0, slot -1) gives zeros and writes nothing."""
    assert E.cpu_decode_step_op() is not None, "a compiler is here, so the op must build"
    torch.manual_seed(0)
    paged = load("04_paged_attention")
    layers, num_blocks, n_kv, bs, d, H = 3, 20, 2, 4, 64, 8
    kv = torch.randn(layers, 2, num_blocks, n_kv, bs, d, dtype=dtype)
    expected_kv = kv.clone()
    tables = torch.tensor([[3, 7, -1, -1], [1, 2, 4, -1], [9, -1, -1, -1]])
    lens = torch.tensor([5, 9, 1])                                           # the new token is each one's last
    slots = torch.stack([tables[b, (n - 1) // bs] * bs + (n - 1) % bs for b, n in enumerate(lens.tolist())])
    q, k = torch.randn(4, H, d, dtype=dtype), torch.randn(4, n_kv, d, dtype=dtype)
    v = torch.randn_like(k)
    out = torch.ops.nano_vllm_cpu.paged_decode_step(
        q, k, v, kv, 1, torch.cat([slots, torch.tensor([-1])]), torch.cat([tables, torch.full((1, 4), -1)]),
        torch.cat([lens, torch.tensor([0])]))
    paged.store_kvcache(k[:3], v[:3], expected_kv[1, 0], expected_kv[1, 1], slots)
    assert torch.equal(kv, expected_kv)
    reference = paged.decode_attention_reference(q[:3], kv[1, 0], kv[1, 1], tables, lens)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out[:3].float(), reference.float(), atol=tol, rtol=tol)
    assert out.shape == q.shape and (out[3] == 0).all()
    before = kv.clone()
    with pytest.raises(RuntimeError, match="slot out of range"):       # the first row's slot is fine: nothing written
        torch.ops.nano_vllm_cpu.paged_decode_step(q[:2], k[:2], v[:2], kv, 1, torch.tensor([slots[0], num_blocks * bs]),
                                                  tables[:2], lens[:2])
    assert torch.equal(kv, before)


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1024), (3, 16, 128), (64, 1024)])     # the last: past MAX_NUMEL, 02's code
def test_fused_rms_norm_equals_02s(dtype, shape):
    """The eager CPU engine's RMSNorm: in bf16 bit for bit 02's (the same two roundings), in fp32
    within a few ulps (another order of summation)."""
    assert E.cpu_rms_norm_kernel() is not None, "a compiler is here, so the kernel must build"
    torch.manual_seed(len(shape))
    norm = load("02_model").RMSNorm(shape[-1], 1e-6)
    norm.weight.data = torch.randn(shape[-1])
    norm = norm.to(dtype)
    fused = E.FusedRMSNorm(norm)
    assert fused.weight is norm.weight
    x = 3 * torch.randn(*shape, dtype=dtype)
    if dtype == torch.bfloat16:
        assert torch.equal(fused(x), norm(x))
    else:
        torch.testing.assert_close(fused(x), norm(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="rms_norm"):
        E.cpu_rms_norm_kernel().rms_norm(x, norm.weight[:-1], 1e-6)


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 2, 16, 300])                           # 300: a prompt, rows over threads
def test_fused_norm_and_rotate_equals_the_norm_kernel_and_02s_rope(dtype, tokens):
    """One C++ call for q_norm, k_norm and RoPE gives bit for bit the engine's RMSNorm kernel
    followed by 02's apply_rope (the same roundings, no fused multiply-add), and within rounding
    what 02's modules give."""
    M = load("02_model")
    cfg = M.PRESETS["demo"]
    torch.manual_seed(tokens)
    attn = M.Qwen3Attention(cfg, 0)
    attn.q_norm.weight.data, attn.k_norm.weight.data = torch.randn(cfg.head_dim), torch.randn(cfg.head_dim)
    attn = attn.to(dtype)
    fused = E.FusedNormRoPEAttention(attn)
    assert fused.q_proj is attn.q_proj and fused.k_norm is attn.k_norm and fused.layer_idx == 0
    q, k, cos, sin = _qk_cos_sin(M, cfg, tokens, dtype)
    kernel, eps = E.cpu_rms_norm_kernel(), attn.q_norm.eps
    one_by_one = (M.apply_rope(kernel.rms_norm(q, attn.q_norm.weight, eps), cos, sin),
                  M.apply_rope(kernel.rms_norm(k, attn.k_norm.weight, eps), cos, sin))
    plain = M.Qwen3Attention.norm_and_rotate(attn, q, k, cos, sin)
    for got, want, close in zip(fused.norm_and_rotate(q, k, cos, sin), one_by_one, plain):
        assert torch.equal(got, want)
        torch.testing.assert_close(got, close, atol=0.05 if dtype == torch.bfloat16 else 1e-5, rtol=0.02)


def _qk_cos_sin(M, cfg, tokens: int, dtype):
    g = torch.Generator().manual_seed(tokens)
    q = 3 * torch.randn(tokens, cfg.num_attention_heads, cfg.head_dim, generator=g)
    k = 3 * torch.randn(tokens, cfg.num_key_value_heads, cfg.head_dim, generator=g)
    cos, sin = M.rope_cos_sin(torch.randint(0, 40000, (tokens,), generator=g), cfg.head_dim, cfg.rope_theta, dtype)
    return q.to(dtype), k.to(dtype), cos, sin


@NEEDS_COMPILER
def test_fused_norm_and_rotate_leaves_hooked_norms_to_02():
    """The x-ray hooks q_norm and k_norm: then they must run (02's path), not the fused call."""
    M = load("02_model")
    cfg = M.PRESETS["tiny"]
    fused = E.FusedNormRoPEAttention(M.Qwen3Attention(cfg, 0))
    seen = []
    fused.q_norm.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    q, k, cos, sin = _qk_cos_sin(M, cfg, 1, torch.float32)
    fused.norm_and_rotate(q, k, cos, sin)
    assert seen == [q.shape]


def test_eager_cpu_engine_runs_the_fused_attention():
    eng = E.LLMEngine(E.EngineConfig(model="tiny", dtype="float32", device="cpu", max_model_len=64))
    kinds = {type(layer.self_attn) for layer in eng.model.model.layers}
    assert kinds == ({E.FusedNormRoPEAttention} if E.cpu_rms_norm_kernel() is not None else {load("02_model").Qwen3Attention})


@NEEDS_COMPILER
def test_gemv_kernel_rejects_what_it_was_not_written_for():
    kernel = E.cpu_gemv_kernel()
    with pytest.raises(RuntimeError, match="gemv"):
        kernel.gemv(torch.randn(1, 64), torch.randn(8, 32))                         # K differs
    with pytest.raises(RuntimeError, match="gemv"):
        kernel.gemv(torch.randn(1, 64), torch.randn(8, 64, dtype=torch.bfloat16))   # dtypes differ
    with pytest.raises(RuntimeError, match="gemv"):
        kernel.gemv(torch.randn(1, 64, dtype=torch.float16), torch.randn(8, 64, dtype=torch.float16))


@NEEDS_COMPILER
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_linear_takes_small_batches_and_hands_larger_ones_on(dtype):
    """Up to max_rows rows the kernel, beyond them the batched module; the same numbers either
    way, and the weight is the nn.Linear's own Parameter."""
    torch.manual_seed(0)
    class Counting(torch.nn.Module):             # nn.Linear, noting the rows it is given
        def __init__(self, lin):
            super().__init__()
            self.lin, self.rows = lin, []

        def forward(self, x):
            self.rows.append(x.shape[0])
            return self.lin(x)
    lin = torch.nn.Linear(256, 384, bias=False).to(dtype)
    gl = E.GEMVLinear(Counting(lin), lin.weight, max_rows=2)
    assert gl.weight is lin.weight
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    with torch.inference_mode():
        for rows in (1, 2, 3, 16):
            x = torch.randn(rows, 256, dtype=dtype)
            torch.testing.assert_close(gl(x).float(), lin(x).float(), atol=tol, rtol=tol)
    assert gl.batched.rows == [3, 16]


def test_without_the_gemv_kernel_the_engine_keeps_torch_s_kernels(folders, reference, monkeypatch):
    """No compiler: one warning at build time (04's builder), then the batched kernels do all."""
    monkeypatch.setattr(E, "cpu_gemv_kernel", lambda: None)
    eng = engine(folders["tiny"], dtype="float32")
    assert eng.linear_kernels in ("PackedLinear", "SmallBatchLinear")
    assert not any(isinstance(m, E.GEMVLinear) for m in eng.model.modules())
    assert [o.token_ids for o in eng.generate(prompts(), GREEDY)] == reference["tiny"]


def batched(module):
    """The module that takes a GEMVLinear's larger batches (itself for any other module)."""
    return module.batched if isinstance(module, E.GEMVLinear) else module


def test_small_batch_fp32_linear_matches_nn_linear_and_keeps_the_tie(folders, monkeypatch):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 384, bias=False)
    for rows in (1, 3, 4, 16, 32, 33, 64):        # both sides of each switch-over
        x = torch.randn(rows, 256)
        out = E.SmallBatchLinear(lin)(x)
        assert out.is_contiguous() and out.shape == (rows, 384)
        torch.testing.assert_close(out, lin(x), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(E, "cpu_vendor", lambda: "GenuineIntel")
    eng = engine(folders["tiny"], dtype="float32")
    assert eng.linear_kernels.endswith("SmallBatchLinear") and isinstance(batched(eng.model.lm_head), E.SmallBatchLinear)
    assert eng.model.lm_head.weight is eng.model.model.embed_tokens.weight


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_fp32_engine_on_amd_packs_its_weights_for_onednn(folders, reference, monkeypatch):
    """MKL is slow on AMD CPUs, so fp32 weights go to oneDNN there; the tokens stay naive_generate's."""
    monkeypatch.setattr(E, "cpu_vendor", lambda: "AuthenticAMD")
    eng = engine(folders["tiny"], dtype="float32")
    assert eng.linear_kernels.endswith("PackedLinear") and isinstance(batched(eng.model.lm_head), E.PackedLinear)
    assert (eng.linear_kernels == "GEMVLinear + PackedLinear") == (E.cpu_gemv_kernel() is not None)
    assert [o.token_ids for o in eng.generate(prompts(), GREEDY)] == reference["tiny"]


@pytest.mark.skipif(not (M.cpu_has_bf16() and torch.backends.mkldnn.is_available()), reason="needs CPU bf16 units")
def test_bf16_engine_packs_its_weights_and_keeps_the_model_s_predictions(folders):
    """bf16 rounding depends on the kernels (their order of summation), so the check is against the
    fp32 model: the engine's bf16 logits are as close to it as the plain bf16 model's (on average,
    within 25%), and give its top-1 token as often (give or take one position)."""
    eng = engine(folders["tiny"], dtype="bfloat16")
    assert isinstance(batched(eng.model.model.layers[0].mlp.up_proj), E.PackedLinear)
    plain, exact = M.load_model(folders["tiny"], torch.bfloat16), M.load_model(folders["tiny"], torch.float32)
    logits = lambda model, ids: model.compute_logits(model(ids, torch.arange(len(ids)))).float()   # noqa: E731
    for ids in (torch.tensor(prompts()[6]), torch.tensor(prompts()[6][:2])):     # 33 rows: oneDNN; 2: the GEMV kernel
        with torch.inference_mode():
            a, b, r = logits(eng.model, ids), logits(plain, ids), logits(exact, ids)
        assert (a - r).abs().mean() <= 1.25 * (b - r).abs().mean()
        top1 = r.argmax(-1)
        assert (a.argmax(-1) == top1).sum() >= (b.argmax(-1) == top1).sum() - 1


def test_huge_pages_keep_values_ties_and_zeroes(folders):
    """The KV pool and the weights move to 2 MiB-aligned anonymous memory: zeroed, writable, the
    same model (tied lm_head still the embedding), the same logits bit for bit."""
    pool = E.huge_page_zeros((3, 5, 7), torch.bfloat16)
    assert pool.shape == (3, 5, 7) and pool.dtype == torch.bfloat16 and not pool.any()
    pool[1, 2, 3] = 4.0
    assert pool.sum().item() == 4.0
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert pool.data_ptr() % E.HUGE_PAGE == 0 and pool.storage_offset() == 0    # the storage starts there
    model = M.load_model(folders["tiny"], torch.float32)
    ids = torch.tensor(prompts()[6])
    with torch.inference_mode():
        before = model.compute_logits(model(ids, torch.arange(len(ids))))
        moved = E.move_to_huge_pages(model)
        after = model.compute_logits(model(ids, torch.arange(len(ids))))
    assert moved >= sum(p.nbytes for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(before, after)
    own = M.load_model(folders["tiny"], torch.float32)        # shared=False (--compile): big matrices alone
    assert E.move_to_huge_pages(own, shared=False) == own.lm_head.weight.nbytes      # the only one of >= 2 MiB
    assert own.lm_head.weight is own.model.embed_tokens.weight and own.lm_head.weight.storage_offset() == 0
    with torch.inference_mode():
        assert torch.equal(before, own.compute_logits(own(ids, torch.arange(len(ids)))))
    eng = engine(folders["tiny"], dtype="float32")
    assert not eng.kv_cache.any() and eng.kv_cache.shape[2] == eng.num_kv_blocks
