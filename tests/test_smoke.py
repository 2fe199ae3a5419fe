"""Smoke tests: the command lines a user types, run as a user runs them (a subprocess: the exit code,
stdout's shape, stderr's lines), each on the `tiny` preset with a tiny workload. They catch what
unit tests of the parts cannot: an option that no longer reaches its code, a field a script reads
that went missing, a table that no longer prints. And `resolve_dtype("auto")`, which every run
without --dtype goes through."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, load

B = load("bench")
M = load("02_model")


def run(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """python ARGS in the repository root, presets generated into the tests' throwaway cache:
    exit 0 and no traceback, or the test fails with stderr."""
    environment = {**os.environ, "NANO_VLLM_CACHE": os.environ["NANO_VLLM_CACHE"], **env}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0 and "Traceback" not in done.stderr, f"exit {done.returncode}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def bench_run():
    """One bench run for the tests of its output (each costs ~30 s on 2 cores): --compare-hf and
    --speculative together, on the decode and mixed workloads."""
    done = run("bench.py", "--model", "tiny", "--quick", "--dtype", "float32", "--workloads", "decode,mixed",
               "--compare-hf", "--speculative", "--output", "json")
    return json.loads(done.stdout), done.stderr


def test_bench_compare_hf_json(bench_run):
    """--compare-hf: transformers generates on the same requests; the fields scripts read are there."""
    doc, stderr = bench_run
    assert doc["model"] == "tiny" and doc["device"] == "cpu"
    (r,) = doc["results"]
    assert r["dtype"] == "float32" and r["startup_peak_rss_bytes"] > 0
    assert r["linear_layers"].removeprefix("GEMVLinear + ") in ("SmallBatchLinear", "OneDNNLinear", "nn.Linear")
    assert r["decode"]["decode_tok_s"] > 0
    for name in ("decode", "mixed"):
        w = r[name]
        assert w["output_tok_s"] > 0 and w["hf_output_tok_s"] > 0 and w["peak_rss_bytes"] > 0, name
        assert w["speedup_vs_hf"] == round(w["output_tok_s"] / w["hf_output_tok_s"], 2), name
    assert "prefill" not in r and "prefix" not in r            # only the workloads asked for
    assert "mixed transformers:" in stderr


def test_bench_speculative_json_and_text_table(bench_run, capsys, monkeypatch):
    """--speculative: greedy and T=1 measured against the plain engine, and in the text output
    (print_table, what bench prints without --output json) the table, then one line per mode."""
    doc, _ = bench_run
    spec = doc["results"][0]["speculative"]
    assert list(spec) == ["greedy", "T=1"]
    for sp in spec.values():
        assert sp["k"] == 4 and sp["tok_s"] > 0 and sp["plain_tok_s"] > 0 and 0 <= sp["alpha"] <= 1
        assert sp["measured_speedup"] == pytest.approx(sp["tok_s"] / sp["plain_tok_s"], rel=0.01, abs=2e-3)
    monkeypatch.setenv("COLUMNS", "400")                       # rich wraps at the width it is given
    B.print_table(doc)
    lines = capsys.readouterr().out.splitlines()
    spec_lines = [line for line in lines if line.startswith("speculative (")]
    assert [line.split(":")[0] for line in spec_lines] == ["speculative (float32, greedy, k=4)",
                                                           "speculative (float32, T=1, k=4)"], lines
    for line in spec_lines:
        assert "tok/s vs" in line and "-> expected" in line and "measured" in line, line
    assert any(line.startswith("float32: startup") for line in lines)
    speedup = f"{doc['results'][0]['mixed']['speedup_vs_hf']}x"                # the table's "vs transformers"
    assert any("mixed" in line and speedup in line for line in lines), lines


def test_run_speculative_prints_its_stats():
    done = run("run.py", "--model", "tiny", "--speculative", "--max-tokens", "8", "--dtype", "float32")
    assert done.stdout.strip()
    assert "speculative decoding: draft" in done.stderr
    stats = [line for line in done.stderr.splitlines() if line.startswith("[speculative: ")]
    assert len(stats) == 1 and "draft tokens accepted" in stats[0] and "mean acceptance length" in stats[0], done.stderr


def test_resolve_dtype_auto(monkeypatch):
    """auto: bf16 exactly where the CPU has bf16 units (else fp32: emulated bf16 is ~100x slower),
    bf16 on CUDA; a named dtype is itself."""
    cpu = torch.device("cpu")
    assert M.resolve_dtype("auto", cpu) is (torch.bfloat16 if M.cpu_has_bf16() else torch.float32)
    for has_bf16, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(M, "cpu_has_bf16", lambda: has_bf16)
        assert M.resolve_dtype("auto", cpu) is dtype
        assert M.resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        assert M.resolve_dtype(name, cpu) is dtype
