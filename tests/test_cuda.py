"""The CUDA paths, on a GPU: decode replayed from CUDA graphs must give the tokens of the simplest path
(naive_generate on the same GPU) and of the eager engine, graphs replayed with new inputs must not
remember old ones, and bf16 decode from a graph must stay within bf16 noise of eager. Skipped where
there is no CUDA GPU (CI): run them on one whenever one is at hand."""
import json

import pytest
import torch

from conftest import load
import test_engine
from test_engine import folders, prompts  # noqa: F401  (the CPU engine tests' checkpoints and prompts)

M = load("02_model")
P = load("04_paged_attention")
E = load("engine")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def engine(folder, **kw):
    return test_engine.engine(folder, **{"device": "cuda", **kw})


GREEDY = E.SamplingConfig(temperature=0.0, max_tokens=20, ignore_eos=True)
# request i stops after 20 - i tokens: the batch shrinks 11 -> 1 (batch buckets 16, 8, 4, 2, 1) and the
# 64-token prompt leaves early, so the widest block table narrows (more than one width bucket)
SHRINKING = [E.SamplingConfig(temperature=0.0, max_tokens=20 - i, ignore_eos=True) for i in range(11)]


@pytest.fixture(scope="module")
def reference(folders):
    out = {}
    for name, folder in folders.items():
        model = M.load_model(folder, torch.float32, torch.device("cuda"))
        out[name] = [M.naive_generate(model, p, 20) for p in prompts(11)]
    return out


@pytest.mark.parametrize("name", ["tiny", "hf-saved"])
@pytest.mark.parametrize("setting", [
    dict(),                                                     # 11 at once
    dict(block_size=4, num_kv_blocks=30, max_model_len=96),       # tiny pool: preemption
    dict(max_num_batched_tokens=7),                             # chunked prefill
    dict(enforce_eager=True),                                   # no graphs at all
    dict(compile=True),                                         # graphs of the compiled step
], ids=["graphs", "graphs-preemption", "graphs-chunked", "eager", "compiled-graphs"])
def test_cuda_engine_equals_naive_generate(folders, reference, name, setting):
    eng = engine(folders[name], **setting)
    outs = eng.generate(prompts(11), SHRINKING)
    assert [o.token_ids for o in outs] == [ref[:20 - i] for i, ref in enumerate(reference[name])]
    decoder = eng.runner.graph_decoder
    if setting.get("enforce_eager"):
        assert decoder is None
    else:   # the graphs really ran, for several batch and width buckets
        assert len({b for b, _ in decoder.graphs}) >= 2 and len({w for _, w in decoder.graphs}) >= 2
    if "num_kv_blocks" in setting:
        assert eng.stats_summary()["preemptions"] > 0
    assert eng.block_manager.num_free_blocks == eng.num_kv_blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replays_follow_new_inputs(folders, dtype):
    """Three decode steps per sequence through one captured graph (same buckets), against eager steps on
    a copy of the pool: new ids, positions, slots and context lengths each replay, padding rows only
    in the scratch block. fp32: the same numbers up to summation order; bf16: within bf16 noise."""
    model = M.load_model(folders["tiny"], dtype, torch.device("cuda"))
    cfg, bs, nb = model.config, 4, 64
    bm = P.BlockManager(nb, bs, enable_prefix_caching=False)
    kv = P.allocate_kv_cache(cfg, nb + 1, bs, dtype, "cuda")
    ps = prompts(3)[1:] + [prompts(11)[4]]                  # 3, 16 and 40 tokens: batch bucket 4
    dec = E.CUDAGraphDecoder(model, kv, bs, max_blocks_per_seq=64, max_batch=8, scratch_block=nb, capture=True)
    with torch.inference_mode():
        for sid, p in enumerate(ps):
            bm.allocate(sid, p)
            model(torch.tensor(p, device="cuda"), torch.arange(len(p), device="cuda"),
                  P.PagedContext.from_spans(kv, bm, [(sid, 0, len(p))]))
        kv_eager = kv.clone()
        ids = torch.tensor([5, 6, 7], device="cuda")
        for step in range(3):
            for sid in range(len(ps)):
                bm.append_slots(sid, 1)
            spans = [(sid, len(p) + step, len(p) + step + 1) for sid, p in enumerate(ps)]
            pos = torch.tensor([s for _, s, _ in spans], device="cuda")
            eager = model(ids, pos, P.PagedContext.from_spans(kv_eager, bm, spans))
            ctx = P.PagedContext.from_spans(kv, bm, spans)
            graphed = dec.run(ids, pos, ctx.slot_mapping, ctx.block_tables, ctx.context_lens).clone()
            if dtype == torch.float32:   # hidden states reach ~100: relative rounding of fp32 sums
                torch.testing.assert_close(graphed, eager, atol=1e-4, rtol=1e-4)
            else:
                torch.testing.assert_close(graphed.float(), eager.float(), atol=0.05 * eager.float().std().item(), rtol=0)
            ids = ids + 100 * (step + 1)
    assert list(dec.graphs) == [(4, 16)]                  # 40 + 3 tokens in blocks of 4: 11 blocks -> 16
    assert kv[:, :, nb].abs().sum() > 0 and kv_eager[:, :, nb].abs().sum() == 0


def test_cuda_paged_prefill_logits_match_transformers(folders):
    """Our model on the GPU (fp32, prefill through the engine's paged pool) against transformers on the GPU."""
    import transformers          # a declared test dependency (requirements-dev.txt): its failing to import is a failure
    hf = transformers.AutoModelForCausalLM.from_pretrained(folders["hf-saved"], dtype=torch.float32).cuda().eval()
    eng = engine(folders["hf-saved"])
    for sid, p in enumerate(prompts(5)):
        eng.block_manager.allocate(sid, p)
        ids = torch.tensor(p, device="cuda")
        with torch.inference_mode():
            ctx = P.PagedContext.from_spans(eng.kv_cache, eng.block_manager, [(sid, 0, len(p))])
            ours = eng.model.compute_logits(eng.model(ids, torch.arange(len(p), device="cuda"), ctx))
            ref = hf(ids[None]).logits[0]
        assert (ours - ref).abs().max().item() < 1e-3


def test_speculative_on_cuda_equals_the_target(folders, reference):
    eng = engine(folders["tiny"], speculative=True, num_speculative_tokens=3)
    outs = eng.generate(prompts(11), GREEDY)
    assert [o.token_ids for o in outs] == reference["tiny"]
    assert eng.stats_summary()["spec_num_drafts"] > 0


def test_cli_on_cuda_bf16(capsys, folders):
    run = load("run")
    assert run.main(["--model", folders["tiny"], "--device", "cuda", "--output", "json", "--max-tokens", "8",
                     "--prompt", "Hi", "--prompt", "Why is the sky blue?", "--num-kv-blocks", "64",
                     "--max-model-len", "256"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert all(len(r["token_ids"]) == 8 or r["finish_reason"] == "stop" for r in doc["requests"])
    assert doc["stats"]["generated_tokens"] == sum(len(r["token_ids"]) for r in doc["requests"])
