"""02_model.py against transformers: layer by layer, RoPE, whole-model logits, greedy tokens, loading."""
import json
import os
import shutil

import pytest
import torch
import transformers   # the oracle: a declared test dependency, so failing to import it is a failure

from conftest import hf_saved_checkpoint, load

M = load("02_model")

PROMPTS = [
    [9707],                                                   # "Hello"
    [785, 6722, 315, 9625, 374],                              # "The capital of France is"
    [151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30, 151645, 198, 151644, 77091, 198],
    list(range(1000, 1037)),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "tiny": M.make_random_checkpoint(str(root / "tiny"), "tiny", seed=1, dtype="float32"),
        "tiny-untied": M.make_random_checkpoint(str(root / "untied"), "tiny-untied", seed=2, dtype="float32"),
        "hf-saved": hf_saved_checkpoint(str(root / "hf")),
    }


def both(folder):
    ours = M.load_model(folder, torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, hf


@pytest.mark.parametrize("name", ["tiny", "tiny-untied", "hf-saved"])
def test_logits_and_every_layer_match_transformers(checkpoints, name):
    ours, hf = both(checkpoints[name])
    for ids in PROMPTS:
        x = torch.tensor(ids)
        captured = []
        hooks = [layer.register_forward_hook(lambda m, i, o: captured.append(o)) for layer in ours.model.layers]
        with torch.no_grad():
            logits = ours.compute_logits(ours(x, torch.arange(len(ids))))
            ref = hf(x[None], output_hidden_states=True)
        for h in hooks:
            h.remove()
        # hidden_states[i + 1] is layer i's output (the last one after the final norm in HF, so skip it)
        for i, h in enumerate(captured[:-1]):
            torch.testing.assert_close(h, ref.hidden_states[i + 1][0], atol=1e-4, rtol=1e-4)
        diff = (logits - ref.logits[0]).abs().max().item()
        assert diff <= 1e-4, f"{name}: max logit difference {diff}"


def test_rope_matches_transformers():
    cfg = M.PRESETS["demo"]
    hf_cfg = transformers.Qwen3Config(**{k: v for k, v in M.hf_config_dict(cfg).items()
                                         if k not in ("architectures", "model_type", "torch_dtype")})
    rope = transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding(hf_cfg)
    positions = torch.tensor([0, 1, 2, 17, 511, 4095, 40959])
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.zeros(1, len(positions), cfg.head_dim, dtype=dtype)
        cos_ref, sin_ref = rope(x, positions[None])
        cos, sin = M.rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, dtype)
        assert torch.equal(cos, cos_ref[0]) and torch.equal(sin, sin_ref[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_bit_equal_to_transformers(dtype):
    """The fused F.rms_norm path rounds exactly as HF's Qwen3RMSNorm (fp32 math, cast, then weight)."""
    torch.manual_seed(0)
    for shape in ((7, 1024), (5, 16, 128)):
        ours, hf = M.RMSNorm(shape[-1], 1e-6), transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm(shape[-1], eps=1e-6)
        weight = 1 + 0.1 * torch.randn(shape[-1])
        ours.weight.data, hf.weight.data = weight.clone(), weight.clone()
        x = (3 * torch.randn(shape)).to(dtype)
        assert torch.equal(ours.to(dtype)(x), hf.to(dtype)(x))


@pytest.mark.parametrize("name", ["tiny", "tiny-untied", "hf-saved"])
def test_greedy_16_tokens_identical_to_transformers(checkpoints, name):
    ours, hf = both(checkpoints[name])
    for ids in PROMPTS[1:3]:
        out = M.naive_generate(ours, ids, 16)
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, min_new_tokens=16,
                          output_logits=True, return_dict_in_generate=True)
        assert out == ref.sequences[0, len(ids):].tolist()
        # The comparison means something only if no step was a near-tie: the top-1 margin of every
        # step must be far above the logit difference between the two implementations.
        full = torch.tensor(ids + out[:-1])
        with torch.no_grad():
            logits = ours.compute_logits(ours(full, torch.arange(len(full))))[len(ids) - 1:]
        ref_logits = torch.cat(ref.logits)
        top2 = logits.topk(2, dim=-1).values
        margin = (top2[:, 0] - top2[:, 1]).min().item()
        diff = (logits - ref_logits).abs().max().item()
        assert margin > 10 * diff, (margin, diff)


def test_sharded_equals_single(tmp_path):
    single = M.make_random_checkpoint(str(tmp_path / "single"), "tiny", seed=5, dtype="float32")
    sharded = M.make_random_checkpoint(str(tmp_path / "sharded"), "tiny", seed=5, dtype="float32", shard_bytes=8_000_000)
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    a, b = M.load_model(single), M.load_model(sharded)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_tied_checkpoint_shares_one_matrix(checkpoints):
    tied = M.load_model(checkpoints["tiny"])
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied = M.load_model(checkpoints["tiny-untied"])
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_demo_preset_is_qwen3_0_6b():
    with torch.device("meta"):
        model = M.Qwen3ForCausalLM(M.PRESETS["demo"])
    rows = dict(M.count_parameters(model))
    assert rows["total"] == 596_049_920                      # Qwen3-0.6B: 0.6B parameters
    assert rows["total"] - rows["embed_tokens"] == 440_467_456  # 0.44B non-embedding
    attn = model.model.layers[0].self_attn
    assert tuple(attn.q_proj.weight.shape) == (2048, 1024)  # 16 heads x head_dim 128, not 1024/16
    assert M.PRESETS["demo"].kv_bytes_per_token(torch.bfloat16) == 112 * 1024


def test_random_logits_are_peaked():
    cfg = M.PRESETS["tiny"]
    model = M.Qwen3ForCausalLM(cfg)
    model.load_state_dict(M.random_state_dict(cfg, 0), strict=False)
    with torch.no_grad():
        logits = model.compute_logits(model(torch.tensor(PROMPTS[3]), torch.arange(37)))
    top2 = logits.topk(2, -1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-2   # far above fp32 rounding (~1e-5 here)


# ----------------------------------------------------------------------------- bad checkpoints


def broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return str(dst)


def rewrite_tensors(folder, change):
    from safetensors.torch import load_file, save_file
    path = os.path.join(folder, "model.safetensors")
    sd = load_file(path)
    change(sd)
    save_file(sd, path)


def edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))


BROKEN = {
    "missing tensor": (lambda f: rewrite_tensors(f, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight")),
                       "missing tensor"),
    "unexpected tensor": (lambda f: rewrite_tensors(f, lambda sd: sd.update(extra=torch.zeros(2))),
                          "unexpected tensor"),
    "shape mismatch": (lambda f: rewrite_tensors(f, lambda sd: sd.update(
        {"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 64)})), "has shape"),
    "corrupt file": (lambda f: open(os.path.join(f, "model.safetensors"), "r+b").write(b"\xff" * 64),
                     "not a readable safetensors"),
    "truncated file": (lambda f: os.truncate(os.path.join(f, "model.safetensors"), 5000),
                       "more weights than its safetensors hold"),   # found from the sizes, before reading
    "not qwen3": (lambda f: edit_config(f, model_type="llama"), "only 'qwen3'"),
    "no config": (lambda f: os.remove(os.path.join(f, "config.json")), "no config.json"),
    "no weights": (lambda f: os.remove(os.path.join(f, "model.safetensors")), "no model.safetensors"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_bad_checkpoint_gives_clear_error(checkpoints, tmp_path, case):
    edit, message = BROKEN[case]
    folder = broken_copy(checkpoints["tiny"], tmp_path / "broken", edit)
    with pytest.raises(M.CheckpointError, match=message):
        M.load_model(folder)


def test_missing_folder_and_unknown_repo():
    with pytest.raises(M.CheckpointError, match="does not exist"):
        M.load_config("/nonexistent/folder")


# ----------------------------------------------------------------------------- the real weights


@pytest.mark.hub
def test_real_qwen3_0_6b_knows_paris():
    try:
        folder = M.download_model("Qwen/Qwen3-0.6B")
    except M.CheckpointError as e:
        pytest.skip(f"real Qwen3-0.6B weights not available: {e}")
    tok = load("01_tokenize").load_tokenizer(folder)
    model = M.load_model(folder, torch.float32)
    ids = tok.encode("The capital of France is")
    out = M.naive_generate(model, ids, 1)
    assert tok.decode(out) == " Paris"
