"""bench.py: the JSON contract scripts read, the roofline inputs, and bad input."""
import json
import shutil

import torch

from conftest import load

B = load("bench")


def test_tiny_run_reports_rooflines_and_cache_identity(capsys):
    assert B.main(["--model", "tiny", "--quick", "--dtype", "float32", "--workloads", "decode,prefill,prefix",
                   "--output", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["machine"]["threads"] == torch.get_num_threads() and doc["device"] == "cpu"
    (r,) = doc["results"]
    assert r["dtype"] == "float32" and r["memory_read_gb_s"] > 0 and r["matmul_gflop_s"] > 0
    assert r["decode_attention"] == ("C++ paged kernel" if shutil.which("c++") else "gather + SDPA")
    assert r["prefill_attention"] == "SDPA"                      # fp32: the prompt kernel is bf16's
    gemv = "GEMVLinear + " if shutil.which("c++") else ""        # the engine's linear modules (eng.fast.linear)
    assert r["linear_layers"] in (gemv + "SmallBatchLinear", gemv + "OneDNNLinear")
    assert len(r["memory_read_gb_s_samples"]) == 2 and r["memory_read_gb_s"] == max(r["memory_read_gb_s_samples"])
    for name in ("decode", "prefill"):
        w = r[name]
        assert w["roofline_tok_s"] > 0 and w["fraction_of_roofline"] == round(
            w[f"{name}_tok_s"] / w["roofline_tok_s"], 3)
    assert r["decode"]["output_tokens"] == 32                  # ignore_eos: every requested token
    # the look-alike rerun: 31 decode steps, a read before, after 16 and after the last 15
    assert len(r["decode"]["memory_read_gb_s_paired"]) == 3 and r["decode"]["fraction_of_roofline_paired"] > 0
    assert r["prefix"]["prefix_cache_hit_tokens"] > 0 and r["prefix"]["identical_with_and_without_cache"]


def test_paired_reads_split_decode_steps_into_stretches_between_reads(monkeypatch):
    reads = iter([10.0, 30.0, 20.0])
    monkeypatch.setattr(B, "read_buffer", lambda device: None)
    monkeypatch.setattr(B, "memory_read_gbps", lambda device, x=None: next(reads))
    watch = B.PairedReads(torch.device("cpu"), every=16)
    watch.on_event("step_done", dict(num_tokens=40, num_seqs=1, seconds=9.0))         # a prefill: not counted
    for seconds in [1 / 16] * 16 + [2 / 16] * 16:
        watch.on_event("sampled", {})
        watch.on_event("step_done", dict(num_tokens=1, num_seqs=1, seconds=seconds))
    watch.close()                                                                       # nothing left: no read
    assert watch.reads == [10.0, 30.0, 20.0] and watch.stretches == [(16, 1.0), (16, 2.0)]
    assert round(B.paired_fraction(watch.reads, watch.stretches, 10**9), 3) == 0.457    # the docstring's example


def test_weight_bytes_count_a_tied_head_once():
    M = load("02_model")
    cfg = M.PRESETS["demo"]
    assert B.weight_bytes(cfg, torch.bfloat16) == 2 * 596_049_920       # Qwen3-0.6B: 0.6B parameters
    assert B.weight_bytes(cfg, torch.float32) == 2 * B.weight_bytes(cfg, torch.bfloat16)


def test_bad_workload_is_exit_2(capsys):
    assert B.main(["--workloads", "decode,typo"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown workload 'typo' (allowed: decode, prefill, mixed, prefix)"


def test_warm_up_leaves_nothing_for_the_timed_run_to_hit():
    """The warm-up builds the shapes the workloads use from look-alike prompts (same lengths, other
    tokens): a timed run after it must find nothing of its own prompts in the prefix cache."""
    import random
    E = load("engine")
    wl = B.workloads(quick=True, seed=0)
    warm = B.lookalike(random.Random(1), wl["mixed"][0])
    assert [len(p) for p in warm] == [len(p) for p in wl["mixed"][0]] and warm != wl["mixed"][0]
    eng = E.LLMEngine(E.EngineConfig(model="tiny", dtype="float32", device="cpu", max_num_seqs=16,
                                     max_num_batched_tokens=512, max_model_len=1024))
    B.warm_up_compiled(eng, wl, ["mixed"], random.Random(1))
    assert B.run_ours(eng, *wl["mixed"])["prefix_cache_hit_tokens"] == 0


def test_freeing_compiled_code_lets_the_frozen_weights_go():
    """Inductor's generated modules hold frozen weights as globals; torch._dynamo.reset() alone
    leaves them alive, and bench would load transformers next to a dead engine's weights."""
    import weakref
    E = load("engine")
    eng = E.LLMEngine(E.EngineConfig(model="tiny", dtype="float32", device="cpu", compile=True,
                                     max_num_seqs=1, max_model_len=64))
    eng.generate([[1, 2, 3]], E.SamplingConfig(max_tokens=2, ignore_eos=True))
    weight = weakref.ref(eng.model.model.embed_tokens.weight)
    del eng
    B.free_compiled_code()
    assert weight() is None


def test_llama_cpp_takes_turns_with_ours_on_the_decode_workload(tmp_path, capsys):
    """--llama-bench runs llama.cpp's own benchmark (here a stand-in that records its arguments and
    answers as llama-bench's JSON does) on the GGUF given for the run's dtype, once a round."""
    import sys
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "llama-bench"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
                    "n = int(sys.argv[sys.argv.index('-n') + 1])\n"
                    "print(json.dumps([{'n_prompt': 0, 'n_gen': n, 'avg_ts': 10.0}]))\n")
    fake.chmod(0o755)
    gguf = tmp_path / "tiny-f32.gguf"
    gguf.write_bytes(b"GGUF")
    assert B.main(["--model", "tiny", "--quick", "--dtype", "float32", "--workloads", "decode", "--output", "json",
                   "--llama-bench", str(fake), "--gguf", f"float32={gguf}"]) == 0
    lc = json.loads(capsys.readouterr().out)["results"][0]["decode"]["llama_cpp"]
    assert calls.read_text().splitlines() == [f"-m {gguf} -t {torch.get_num_threads()} -p 0 -n 32 -r 1 -o json"] * 2
    assert lc["rounds"] == 2 and lc["llama_cpp_decode_tok_s"] == 10.0 and lc["ours_decode_tok_s"] > 0
    assert lc["speedup_vs_llama_cpp"] == round(lc["ours_decode_tok_s"] / 10.0, 3)
    assert 0 < lc["llama_cpp_fraction_of_roofline"] and 0 < lc["ours_fraction_of_roofline"]


def test_llama_cpp_needs_a_gguf_per_dtype_given_right(tmp_path, capsys):
    assert B.main(["--gguf", "bf16"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --gguf 'bf16': expected DTYPE=FILE, DTYPE one of float32, "
                                               "bfloat16, float16")
    assert B.main(["--gguf", f"bfloat16={tmp_path / 'none.gguf'}"]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "weights.safetensors").write_bytes(b"{}")
    assert B.main(["--gguf", f"bfloat16={tmp_path / 'weights.safetensors'}"]) == 2
    assert capsys.readouterr().err.strip().endswith("is not a GGUF file")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert B.main(["--gguf", f"bfloat16={tmp_path / 'm.gguf'}"]) == 2          # no --llama-bench to run it
    assert capsys.readouterr().err.startswith("error: --llama-bench None")
