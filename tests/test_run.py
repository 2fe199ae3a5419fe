"""run.py: the CLI contract (flags, --output json, exit code 2 with one `error:` line for bad input)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, load

M = load("02_model")
run = load("run")


def cli(capsys, *argv):
    code = run.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny():
    return M.preset_checkpoint("tiny")


def test_json_output_is_one_object_with_the_contract_fields(capsys, tiny):
    code, out, err = cli(capsys, "--model", "tiny", "--prompt", "Hello", "--prompt", "Why is the sky blue?",
                         "--max-tokens", "5", "--ignore-eos", "--output", "json", "--dtype", "float32")
    assert code == 0
    doc = json.loads(out)                     # exactly one JSON document on stdout
    assert set(doc) == {"model", "requests", "stats"} and doc["model"] == "tiny"
    assert [r["prompt"] for r in doc["requests"]] == ["Hello", "Why is the sky blue?"]
    for r in doc["requests"]:
        assert set(r) == {"prompt", "prompt_token_ids", "token_ids", "text", "finish_reason"}
        assert len(r["token_ids"]) == 5 and r["finish_reason"] == "length"
        assert r["prompt_token_ids"][:3] == [151644, 872, 198]     # <|im_start|>user\n: the chat template
    for key in ("prompt_tokens", "generated_tokens", "prefill_tokens_per_s", "decode_tokens_per_s",
                "prefix_cache_hit_tokens", "preemptions", "kv_blocks_total", "kv_blocks_peak"):
        assert key in doc["stats"]
    assert doc["stats"]["generated_tokens"] == 10
    assert "prompt tokens" in err             # humans' text goes to stderr


def test_raw_and_think_change_the_prompt(capsys, tiny):
    def ids(*flags):
        code, out, _ = cli(capsys, "--model", "tiny", "--prompt", "Hi", "--max-tokens", "1", "--output", "json", *flags)
        return json.loads(out)["requests"][0]["prompt_token_ids"]
    assert ids("--raw") == [13048]                                   # "Hi"
    assert ids()[-4:] == [151667, 271, 151668, 271]                 # <think>\n\n</think>\n\n: thinking off
    assert ids("--think")[-3:] == [151644, 77091, 198]              # ends at <|im_start|>assistant\n


def test_request_i_uses_seed_plus_i(capsys, tiny):
    def tokens(*flags):
        code, out, _ = cli(capsys, "--model", "tiny", "--temperature", "1", "--max-tokens", "6", "--ignore-eos",
                           "--output", "json", *flags)
        return [r["token_ids"] for r in json.loads(out)["requests"]]
    two = tokens("--prompt", "a", "--prompt", "a", "--seed", "5")
    assert two[1] == tokens("--prompt", "a", "--seed", "6")[0]
    assert two[0] == tokens("--prompt", "a", "--seed", "5")[0]


def test_stream_prints_the_same_text(capsys, tiny):
    code, out, _ = cli(capsys, "--model", "tiny", "--prompt", "Hello", "--max-tokens", "8", "--ignore-eos",
                       "--stream", "--output", "json")
    doc = json.loads(out)
    code, streamed, _ = cli(capsys, "--model", "tiny", "--prompt", "Hello", "--max-tokens", "8", "--ignore-eos", "--stream")
    assert streamed.startswith(doc["requests"][0]["text"])


def test_offline_default_falls_back_to_demo_with_a_banner(capsys, monkeypatch, tiny):
    def unreachable(repo_id, *a, **k):
        raise M.CheckpointError(f"model {repo_id!r} could not be downloaded")
    monkeypatch.setattr(M, "download_model", unreachable)
    monkeypatch.setitem(M.PRESETS, "demo", M.PRESETS["tiny"])        # keep the test fast: demo-sized is not the point
    monkeypatch.setenv("NANO_VLLM_CACHE", os.path.join(os.environ["NANO_VLLM_CACHE"], "fallback"))
    code, out, err = cli(capsys, "--max-tokens", "2", "--output", "json")
    assert code == 0 and json.loads(out)["model"] == "demo"
    assert "Qwen/Qwen3-0.6B is not in the local Hugging Face cache" in err and "RANDOM weights" in err
    code, out, err = cli(capsys, "--model", "someone/other-model", "--max-tokens", "2")
    assert code == 2 and err.strip().startswith("error:") and "someone/other-model" in err


def broken_folder(tmp_path, tiny, kind):
    folder = tmp_path / kind
    shutil.copytree(tiny, folder)
    if kind == "no-config":
        os.remove(folder / "config.json")
    elif kind == "not-qwen3":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["model_type"] = "llama"
        (folder / "config.json").write_text(json.dumps(cfg))
    elif kind == "broken-weights":
        with open(folder / "model.safetensors", "r+b") as f:
            f.write(b"garbage!" * 8)
    return str(folder)


@pytest.mark.parametrize("argv, needle", [
    (["--prompt", ""], "prompt #1: the prompt is empty"),
    (["--max-tokens", "0"], "--max-tokens must be a positive integer, got 0"),
    (["--max-tokens", "-3"], "got -3"),
    (["--temperature", "-0.5"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--model", "/no/such/folder"], "/no/such/folder"),
    (["--model", "tiny", "--max-model-len", "8", "--prompt", "a long prompt " * 10], "max_model_len"),
])
def test_bad_input_exits_2_with_one_error_line(capsys, tiny, argv, needle):
    code, out, err = cli(capsys, "--model", "tiny", *argv) if "--model" not in argv else cli(capsys, *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("kind, needle", [("no-config", "no config.json"), ("not-qwen3", "only 'qwen3'"),
                                          ("broken-weights", "not a readable safetensors")])
def test_bad_model_folder_exits_2(capsys, tmp_path, tiny, kind, needle):
    code, out, err = cli(capsys, "--model", broken_folder(tmp_path, tiny, kind))
    assert code == 2 and err.count("error:") == 1 and needle in err


def test_too_long_prompt_is_rejected_alone(capsys, tiny):
    code, out, err = cli(capsys, "--model", "tiny", "--raw", "--max-model-len", "16", "--max-tokens", "3",
                         "--prompt", "x " * 40, "--prompt", "short", "--output", "json", "--ignore-eos")
    assert code == 2 and "prompt #1" in err
    doc = json.loads(out)                     # the refused prompt keeps its place, with its error and no tokens
    assert [r["prompt"] for r in doc["requests"]] == ["x " * 40, "short"]
    refused, served = doc["requests"]
    assert refused == {"prompt": "x " * 40, "prompt_token_ids": [], "token_ids": [], "text": "",
                       "finish_reason": None, "error": refused["error"]}
    assert "max_model_len is 16" in refused["error"] and "error" not in served
    assert len(served["token_ids"]) == 3 and served["finish_reason"] == "length"


def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and "Traceback" not in proc.stderr


def test_kv_pool_sized_in_gib(capsys, tiny):
    code, out, _ = cli(capsys, "--model", "tiny", "--dtype", "float32", "--max-tokens", "1", "--output", "json",
                       "--kv-cache-memory-gb", "0.01")
    cfg = M.PRESETS["tiny"]
    assert code == 0
    assert json.loads(out)["stats"]["kv_blocks_total"] == int(0.01 * 2**30 // (cfg.kv_bytes_per_token(torch.float32) * 16))
    code, _, err = cli(capsys, "--model", "tiny", "--kv-cache-memory-gb", "-1")
    assert code == 2 and "--kv-cache-memory-gb must be a finite positive number, got -1.0" in err
