"""modes/narrator.py and modes/xray.py: the figures they print are the run's real figures (checked
against values computed here from the config, the checkpoint and the engine's state), decode
narration is throttled, and with the modes off no hook code runs."""
import io
import json
import math
import os
import re
import shutil

import pytest
import torch
from rich.console import Console

from conftest import load

M = load("02_model")
T = load("01_tokenize")
E = load("engine")
run = load("run")
from modes.narrator import Narrator  # noqa: E402
from modes.xray import XRay  # noqa: E402

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matmuls are too small to share between threads: with 2 threads on a busy
    2-core machine a decode step takes ~30x longer (threads wait on each other), with 1 it stays ~4 ms."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return M.make_random_checkpoint(str(tmp_path_factory.mktemp("modes") / "tiny"), "tiny", seed=3, dtype="float32")


def make_engine(folder, **kw):
    cfg = dict(model=folder, dtype="float32", device="cpu", max_model_len=256, num_kv_blocks=64)
    cfg.update(kw)
    return E.LLMEngine(E.EngineConfig(**cfg))


def recorder():
    return Console(record=True, width=120, file=io.StringIO())


def flat(console) -> str:
    """The printed text with no-break spaces as spaces and wrapped narration joined back into one line."""
    text = console.file.getvalue().replace("\u00a0", " ")
    return re.sub(r"\n {2}(?=\S)", " ", text)


def chat(tok, prompt):
    return tok.apply_chat_template([{"role": "user", "content": prompt}])


def kib(n_bytes) -> str:
    """Bytes the way people write them: KiB below a MiB, then MiB with at most two decimals."""
    if n_bytes < 2**20:
        return f"{n_bytes / 1024:g} KiB"
    return f"{n_bytes / 2**20:.2f}".rstrip("0").rstrip(".") + " MiB"


def config_json(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def hooks_on(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ----------------------------------------------------------------------------- narrator


def test_narration_carries_the_real_figures(tiny):
    cfg = config_json(tiny)
    L, n_kv, d = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]
    kv = 2 * L * n_kv * d * 4                                      # fp32 bytes one token leaves in the cache
    tok = T.load_tokenizer(tiny)
    text = chat(tok, "Hi")
    n = len(tok.encode(text))
    engine = make_engine(tiny)
    con = recorder()
    narrator = Narrator(engine, con)
    engine.observers.append(narrator)
    out = engine.generate([text], E.SamplingConfig(max_tokens=4, **GREEDY))[0]
    s = flat(con)

    assert f"split by byte-level BPE into {n} tokens" in s
    assert "2 turns (user, assistant)" in s and "empty <think></think> block is pre-filled" in s
    assert f"It needs ceil({n} / 16) = 1 block of 16 slots: block table [0]" in s
    assert "63 of 64 blocks are free" in s
    assert (f"request 0's {n} prompt tokens (positions 0..{n - 1}) go through all {L} layers at once; their keys and "
            f"values — {n} × {kib(kv)} = {kib(n * kv)} — are written to block 0.") in s
    assert f"Request 0 -> token {out.token_ids[0]} " in s and f"position {n} (its first generated token)" in s
    # the first decode step: the newest token at position n, its K/V to block 0 slot n
    assert f"request 0 feeds its newest token (position {n}) through all {L} layers" in s
    assert f"attends to {n + 1} keys" in s and f"are written to block 0 slot {n}." in s
    assert "KV pool: 1 of 64 blocks in use" in s
    assert "finishes (length: max_tokens = 4 reached) after 4 generated tokens" in s
    assert f"{engine.stats['steps']} steps" in s
    # the generated text streams on its own marked lines, and joined back it is the output's text
    streamed = "".join(line.split(": ", 1)[1] for line in con.file.getvalue().splitlines()
                       if line.startswith("│ text [0]: "))
    assert streamed == out.text.replace("\n", "↵")
    assert all(line.startswith(("» ", "  ", "── ", "│ ")) for line in con.file.getvalue().splitlines())


def test_prefix_hits_and_preemption_are_narrated_with_the_block_ids(tiny):
    engine = make_engine(tiny, block_size=4, num_kv_blocks=16, max_model_len=64, max_num_seqs=2)
    con = recorder()
    engine.observers.append(Narrator(engine, con))
    prompt = list(range(1000, 1013))                              # 13 tokens: 3 full blocks before the last
    engine.generate([prompt, prompt + [7], prompt + [8]], E.SamplingConfig(max_tokens=24, **GREEDY))
    s = flat(con)
    hits = re.findall(r"Prefix-cache lookup: (\d+) blocks? \[([\d, ]+)\] hit = (\d+) tokens", s)
    assert hits, "the third request reuses the cached prompt blocks"
    for count, ids, tokens in hits:
        assert int(count) == len(ids.split(",")) and int(tokens) == 4 * int(count)
    assert engine.scheduler.num_preemptions > 0
    assert s.count("Preemption: ") == engine.scheduler.num_preemptions
    assert re.search(rf"; {engine.scheduler.num_preemptions} preemptions?\.", s)


def test_decode_narration_is_throttled(tiny):
    engine = make_engine(tiny)
    narrator = Narrator(engine, recorder(), full_steps=3, every=16)

    class LineCounter:                       # narrator.lines after each step
        def __init__(self):
            self.after = []

        def on_event(self, event, data):
            if event == "step_done":
                self.after.append(narrator.lines)
    counter = LineCounter()
    engine.observers += [narrator, counter]
    engine.generate(["<|im_start|>user\nHi<|im_end|>\n"], E.SamplingConfig(max_tokens=100, **GREEDY))
    text = narrator.console.file.getvalue()
    assert text.count("── step") == 1 + 3                       # the prefill and 3 decode steps in full
    assert len(re.findall(r"^» steps \d+\.\.\d+: 16 decode steps", text, re.M)) == (99 - 3) // 16
    assert narrator.lines < 100                                  # never a line per token
    full = counter.after[2] - counter.after[1]                   # decode step 2, told in full
    grown = counter.after[99] - counter.after[35]                # 64 more tokens, throttled
    assert full >= 4 and grown <= 6 * (64 // 16)                 # a paragraph per step, then ~5 lines per 16


# ----------------------------------------------------------------------------- x-ray


def test_xray_figures_match_an_independent_computation(tiny):
    cfg = config_json(tiny)
    L, H, n_kv, d, hidden = (cfg[k] for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                               "head_dim", "hidden_size"))
    tok = T.load_tokenizer(tiny)
    ids = tok.encode(chat(tok, "Hello there"))
    n = len(ids)
    engine = make_engine(tiny)
    con = recorder()
    xray = XRay(engine, con, every=2, layer=1)
    engine.observers.append(xray)
    engine.generate([ids], E.SamplingConfig(max_tokens=4, **GREEDY))
    s = flat(con)
    blocks = s.split("┏━ x-ray")[1:]
    assert xray.xrayed_steps == [1, 2, 4] and len(blocks) == 3   # prefill, decode 1, decode 3 (every 2nd)
    prefill, decode = blocks[0], blocks[1]

    assert f"· step 1 · prefill · {n} packed tokens: [0] 0..{n - 1} · layer 1 of {L} · float32" in prefill
    for name, shape in [("embed_tokens(ids)", (n, hidden)), ("L1 q = q_norm(q_proj)", (n, H, d)),
                        ("L1 k = k_norm(k_proj)", (n, n_kv, d)), ("L1 v = v_proj", (n, n_kv, d)),
                        ("L1 q after RoPE", (n, H, d)), ("L1 k after RoPE", (n, n_kv, d)),
                        ("L1 mlp", (n, hidden)), ("final norm", (n, hidden)), ("logits (lm_head)", (1, 151936))]:
        assert re.search(rf"┃ {re.escape(name)}\s+{re.escape(str(shape))}\s+float32", prefill), name
    assert f"L1 q = q_norm(q_proj)    {(1, H, d)}" in decode     # a decode step: one token

    # embedding stats, from the checkpoint itself
    from safetensors.torch import load_file     # the safetensors library's own reader, not 02's
    emb = load_file(os.path.join(tiny, "model.safetensors"))["model.embed_tokens.weight"][ids].float()
    row = re.search(r"┃ embed_tokens\(ids\)\s+\S+ \S+\s+float32\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", prefill)
    assert [float(x) for x in row.groups()] == pytest.approx(
        [emb.min().item(), emb.max().item(), emb.mean().item(), emb.std().item(), emb.norm(dim=-1).mean().item()],
        rel=1e-3, abs=1e-6)
    # top-5 candidates: the no-cache reference model's softmax
    model = M.load_model(tiny, torch.float32)
    with torch.inference_mode():
        probs = model.compute_logits(model(torch.tensor(ids), torch.arange(n))[-1]).softmax(-1)
    want = probs.topk(5)
    line = re.search(r"next token \[0\] \(softmax of 151,936 logits\): (.*) -> (\d+)", prefill)
    shown = [float(p) for p in re.findall(r" (\d\.\d{3})(?= ·|$)", line.group(1))]
    assert shown == pytest.approx(want.values.tolist(), abs=2e-3)
    assert int(line.group(2)) == want.indices[0].item()
    # attention recomputed from q and the cached k: over every position, and it reproduces the model's output
    assert f"attention [0] pos {n - 1} " in prefill and f"over {n} keys ({n} new, 0 from the cache)" in prefill
    assert f"over {n + 1} keys (1 new, {n} from the cache)" in decode
    for delta in re.findall(r"max \|Δ\| = (\S+)", s):
        assert float(delta) < 1e-4
    assert s.count("their slots: identical") == 3
    assert f"RoPE: positions [0] 0..{n - 1}; cos/sin ({n}, {d})" in prefill
    assert f"RoPE: positions [0] {n};" in decode
    assert f"GQA: {H} query heads share {n_kv} KV heads ({H // n_kv} query heads per KV head), head_dim {d}" in s
    # KV pool: bytes from the config, blocks from the block manager
    per_token = 2 * L * n_kv * d * 4
    assert (f"kv_cache {(L, 2, 64, n_kv, 16, d)} float32 = {kib(per_token * 64 * 16)}; 1 of 64 blocks used "
            f"({kib(16 * per_token)}), {kib(per_token)} per token, {kib(16 * per_token)} per 16-token block") in prefill
    assert f"[0] block table [0]: {n} of 16 slots filled" in prefill


def test_xray_demo_model_has_qwen3_0_6b_shapes(tmp_path, monkeypatch):
    """The `demo` preset's config, so Qwen3-0.6B's shapes: 16 query heads, 8 KV heads of 128 dims
    (not the 4 KV heads x 64 nano-vllm-rs printed), hidden 1024, 28 layers, 224 KiB per token in fp32.
    Its weights are drawn in memory (writing and reading back the 1.2 GB checkpoint takes ~20 s on
    2 cores and is tested elsewhere); every shape and size comes from the config."""
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(M.hf_config_dict(M.PRESETS["demo"], "float32")))
    shutil.copy(os.path.join(T.ASSETS, "tokenizer.json"), folder / "tokenizer.json")

    def random_model(path, dtype=torch.float32, device="cpu", allocate=None):
        c = M.load_config(path)
        with torch.device("meta"):
            model = M.Qwen3ForCausalLM(c)
        model = model.to_empty(device=device)
        model.lm_head.weight = model.model.embed_tokens.weight
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.8, 1.2, generator=g)
                else:
                    a = 0.035 if "embed" in name else (3 / p.shape[1]) ** 0.5   # std 0.02, and 1/sqrt(fan_in)
                    p.uniform_(-a, a, generator=g)
        return model.to(dtype).eval()
    monkeypatch.setattr(E.qwen3, "load_model", random_model)

    engine = make_engine(str(folder), num_kv_blocks=16)
    cfg = engine.model_config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers) == (16, 8, 128, 28)
    con = recorder()
    engine.observers += [Narrator(engine, con), XRay(engine, con, layer=27)]
    n = len(engine.tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n"))
    engine.generate(["<|im_start|>user\nHi<|im_end|>\n"], E.SamplingConfig(max_tokens=2, **GREEDY))
    s = flat(con)
    for shape in [(n, 1024), (n, 16, 128), (n, 8, 128), (1, 16, 128), (1, 8, 128), (1, 151936)]:
        assert f" {shape} " in s, shape
    assert ("GQA: 16 query heads share 8 KV heads (2 query heads per KV head), head_dim 128; "
            "q_proj 1024 -> 16 × 128 = 2048") in s
    per_token = 2 * 28 * 8 * 128 * 4                              # 229376 bytes = 224 KiB
    assert f"go through all 28 layers at once; their keys and values — {n} × 224 KiB = {kib(n * per_token)} —" in s
    assert "224 KiB per token, 3.5 MiB per 16-token block" in s            # 16 x 224 KiB
    assert f"kv_cache (28, 2, 16, 8, 16, 128) float32 = {kib(16 * 16 * per_token)}" in s
    assert "layer 27 of 28" in s


def test_xray_layer_out_of_range_is_refused(tiny, capsys):
    engine = make_engine(tiny)
    for bad in (3, -1):
        with pytest.raises(ValueError, match=rf"--xray-layer {bad} is out of range: .* between 0 and 2\.$"):
            XRay(engine, recorder(), layer=bad)
    assert run.main(["--model", tiny, "--xray", "--xray-layer", "3", "--prompt", "Hi", "--dtype", "float32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: --xray-layer 3 is out of range: this model has 3 layers, so the layer must be "
                       "between 0 and 2.")


def test_speculative_steps_are_narrated_and_xrayed(tiny):
    class Spy:
        def __init__(self):
            self.events = []

        def on_event(self, event, data):
            self.events.append((event, data))

    engine = make_engine(tiny, speculative=True)
    k = engine.config.num_speculative_tokens
    ids = list(range(2000, 2011))
    n = len(ids)
    con, spy = recorder(), Spy()
    xray = XRay(engine, con, every=2)
    engine.observers += [Narrator(engine, con), xray, spy]
    engine.generate([ids], E.SamplingConfig(max_tokens=10, **GREEDY))
    s = flat(con)
    verified = [d for e, d in spy.events if e == "spec_verified"]
    assert verified and verified[0]["num_draft_tokens"] == k
    first = verified[0]
    assert (f"Speculative decoding, request 0: the draft model guessed {k} tokens" in s
            and f"single forward over {k + 1} positions" in s)
    prefill = s.split("┏━ x-ray")[1]
    assert f"· {n + k} packed tokens: [0] 0..{n - 1} + {k} guesses ·" in prefill
    assert f"logits (lm_head)         {(k + 1, 151936)}" in prefill
    assert f"verify [0]: {k + 1} logits rows (the last token + {k} guesses)" in prefill
    assert f"-> {first['num_accepted']} of {k} accepted" in prefill
    assert s.count("their slots: identical") == len(xray.xrayed_steps)
    drafted = sum(d["num_draft_tokens"] for d in verified)
    accepted = sum(d["num_accepted"] for d in verified)
    steps = sum(1 for e, _ in spy.events if e == "step_done")
    assert f"Speculation for request 0: {accepted} of {drafted} guesses accepted" in s
    assert f"so its 10 tokens took {steps} target forwards instead of 10." in s


# ----------------------------------------------------------------------------- cost when off, and the CLI


def test_with_the_modes_off_no_hook_code_runs(tiny, monkeypatch):
    calls = {"emit": 0, "narrator": 0, "xray": 0}

    def counting(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper
    monkeypatch.setattr(E.LLMEngine, "_emit", counting("emit", E.LLMEngine._emit))
    monkeypatch.setattr(Narrator, "on_event", counting("narrator", Narrator.on_event))
    monkeypatch.setattr(XRay, "on_event", counting("xray", XRay.on_event))

    def run_and_watch(engine):
        """Hooks registered on the model's modules at each forward pass."""
        seen, forward = [], engine.model.forward

        def watched(*a, **k):
            seen.append(hooks_on(engine.model))
            return forward(*a, **k)
        monkeypatch.setattr(engine.model, "forward", watched)
        engine.generate([[5, 6, 7], [8, 9]], E.SamplingConfig(max_tokens=12, **GREEDY))
        return seen

    engine = make_engine(tiny)
    assert run_and_watch(engine) == [0] * engine.stats["steps"]
    assert calls == {"emit": 0, "narrator": 0, "xray": 0}         # no event built, nothing observed

    engine = make_engine(tiny)
    xray = XRay(engine, recorder(), every=5)
    engine.observers.append(xray)
    seen = run_and_watch(engine)
    assert xray.xrayed_steps == [1, 2, 7, 12]                    # prefill, decode 1, 6, 11
    assert [i + 1 for i, h in enumerate(seen) if h] == xray.xrayed_steps   # hooks only on those steps
    assert hooks_on(engine.model) == 0                           # and none left behind
    assert calls["emit"] > 0 and xray.hook_calls == 11 * len(xray.xrayed_steps)


def test_cli_narrate_xray_with_json_output_keeps_stdout_one_object(tiny, capsys):
    code = run.main(["--model", tiny, "--narrate", "--xray", "--output", "json", "--prompt", "Hi", "--prompt",
                     "Hello there", "--max-tokens", "5", "--dtype", "float32", "--num-kv-blocks", "64",
                     "--max-model-len", "256"])
    out, err = capsys.readouterr()
    assert code == 0
    doc = json.loads(out)                                        # exactly one JSON document, nothing else
    assert [len(r["token_ids"]) for r in doc["requests"]] == [5, 5]
    assert "» Step 1 runs a prefill of" in err and "from 2 requests" in err
    assert "┏━ x-ray · step 1 · prefill" in err and "│ text [1]: " in err
    # interleaved coherently: each x-ray block follows its step's narration
    order = [err.index(s) for s in ("── step 1 · prefill", "┏━ x-ray · step 1", "── step 2 · decode 1",
                                    "┏━ x-ray · step 2")]
    assert order == sorted(order)
