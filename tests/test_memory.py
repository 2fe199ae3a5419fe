"""Memory: loading holds one copy of the weights, the KV pool's default suits a laptop, and a pool
too small for one sequence is a clear error. Peak memory is measured in a fresh process (its
resident-set high-water mark), so nothing else in the test session counts."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, load

M = load("02_model")

# A few hundred MB in fp32: Qwen3's vocabulary, a narrower and shallower stack.
MID = M.ModelConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=64)

MEASURE = r"""
import importlib, json, sys, torch
sys.path.insert(0, sys.argv[1])
import engine
from nano_kernels.memory import peak_rss_bytes, reset_peak_rss
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
import numpy                                          # what loading imports, before the baseline
torch.empty(1) + 1                                    # torch's own first-use allocations too
base = rss()
reset_peak_rss()
if sys.argv[3] == "load":
    model = engine.qwen3.load_model(sys.argv[2], torch.float32, "cpu",
                                    allocate=engine.nano_kernels.weight_allocator(torch.device("cpu")))
    weights, pool = sum(p.nbytes for p in model.parameters()), 0
else:
    eng = engine.LLMEngine(engine.EngineConfig(model=sys.argv[2], dtype="float32", kv_cache_memory_gb=0.25,
                                               max_model_len=1024))
    eng.generate([[1, 2, 3]], engine.SamplingConfig(max_tokens=4))
    weights, pool = eng.weights_bytes, eng.kv_cache_bytes
print(json.dumps({"weights": weights, "pool": pool, "growth": peak_rss_bytes() - base}))
"""


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def mid_checkpoint(request, tmp_path_factory):
    """The same weights stored in fp32 (read straight into place) and in bf16 (converted on the way)."""
    folder = str(tmp_path_factory.mktemp("mid") / request.param)
    M.PRESETS["mid"] = MID
    try:
        return M.make_random_checkpoint(folder, "mid", seed=0, dtype=request.param)
    finally:
        del M.PRESETS["mid"]


def measure(folder: str, what: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, ROOT, folder, what], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
def test_loading_holds_one_copy_of_the_weights(mid_checkpoint):
    """Two copies (the checkpoint's tensors and the model's, a dtype conversion's, a move to huge
    pages, the file's mapped pages) would grow the process by 2x the weights or more."""
    r = measure(mid_checkpoint, "load")
    assert r["weights"] > 300 * 2**20
    assert r["growth"] <= 1.25 * r["weights"] + 64 * 2**20, r


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
def test_engine_holds_weights_pool_and_little_else(mid_checkpoint):
    """The engine's start and a first request: weights + KV pool + working memory (the C++ build
    is already loaded by the other tests; activations of a small step)."""
    r = measure(mid_checkpoint, "engine")
    assert r["growth"] <= r["weights"] + r["pool"] + 512 * 2**20, r


def test_default_pool_is_small_on_a_cpu(tmp_path):
    """1 GiB by default (a laptop's share), less where every sequence slot at max length needs less."""
    E = load("engine")
    eng = E.LLMEngine(E.EngineConfig(model="tiny", dtype="float32", device="cpu", max_model_len=4096))
    per_block = eng.model_config.kv_bytes_per_token(torch.float32) * 16
    want = 16 * 4096 // 16 * per_block                      # every slot at max length: tiny needs less than 1 GiB
    assert eng.kv_cache_bytes == min(want, int(E.CPU_KV_CACHE_GB * 2**30 // per_block) * per_block)
    demo = M.PRESETS["demo"].kv_bytes_per_token(torch.float32) * 16
    assert E.CPU_KV_CACHE_GB * 2**30 // demo >= 4096 // 16   # demo in fp32: one sequence at max length fits


def test_a_pool_too_small_for_one_sequence_names_the_flags():
    out = subprocess.run([sys.executable, "run.py", "--model", "tiny", "--dtype", "float32", "--num-kv-blocks", "4",
                          "--max-model-len", "1024"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "--kv-cache-memory-gb" in error[0] and "--max-model-len" in error[0], out.stderr


def test_banner_names_the_weights_and_the_pool():
    out = subprocess.run([sys.executable, "run.py", "--model", "tiny", "--dtype", "float32", "--max-tokens", "2",
                          "--kv-cache-memory-gb", "0.5"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    banner = next(line for line in out.stderr.splitlines() if line.startswith("model tiny"))
    cfg, fmt = M.PRESETS["tiny"], load("03_kv_cache").fmt_bytes
    with torch.device("meta"):
        weights = sum(p.numel() * 4 for p in M.Qwen3ForCausalLM(cfg).parameters())
    per_block = cfg.kv_bytes_per_token(torch.float32) * 16
    blocks = int(0.5 * 2**30 // per_block)
    assert f"weights {fmt(weights)}, KV pool {fmt(blocks * per_block)} ({blocks} blocks of 16 tokens" in banner, banner


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo (Linux)")
@pytest.mark.parametrize("flags", [["--kv-cache-memory-gb", "1e6"], ["--num-kv-blocks", str(2**31 - 1)]])
def test_a_pool_larger_than_the_memory_is_refused_before_allocating(flags):
    out = subprocess.run([sys.executable, "run.py", "--model", "tiny", "--dtype", "float32", *flags],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "the KV pool would take" in error[0] and "--kv-cache-memory-gb" in error[0], out.stderr


def test_weights_larger_than_the_memory_are_refused_before_allocating(monkeypatch):
    memory = load("nano_kernels.memory")
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 2**20)
    with pytest.raises(ValueError, match="the model.s weights would take .* GiB of memory is available"):
        memory.huge_page_allocator()({"w": torch.Size([1024, 1024])}, torch.float32)
