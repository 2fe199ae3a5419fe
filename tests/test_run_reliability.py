"""run.py under bad input and faults (issue 25), driven as a user would: a real process, its exit code,
one `error:` line per bad value, no traceback, and the other requests still served."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, load

M = load("02_model")
run = load("run")

RUN = os.path.join(ROOT, "run.py")
TINY = ("--model", "tiny", "--dtype", "float32")


@pytest.fixture(scope="module")
def tiny():
    return M.preset_checkpoint("tiny")     # written once, before the processes that use it


def cli(*argv, timeout=300, **kwargs):
    """run.py as a process; argv items may be bytes (argv that is not UTF-8)."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([sys.executable, RUN, *argv], stderr=subprocess.PIPE, cwd=ROOT, timeout=timeout, **kwargs)


def errors(stderr) -> list[str]:
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    assert "Traceback" not in text and "Exception ignored" not in text, text
    return [line for line in text.splitlines() if line.startswith("error:")]


def closing(fd):
    return lambda: os.close(fd)   # preexec_fn: the process starts with this standard stream closed


# ----------------------------------------------------------------------------- every flag, before loading anything

@pytest.mark.parametrize("argv, needle", [
    (["--seed", "18446744073709551615", "--prompt", "a", "--prompt", "b"],
     "--seed must be between 0 and 18446744073709551614 (request i samples with the 64-bit seed seed + i, here for "
     "2 prompts), got 18446744073709551615"),
    (["--seed", "-1"], "--seed must be between 0 and 18446744073709551615"),
    (["--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
    (["--top-k", str(10**20)], f"--top-k must be between 0 and 2147483647, got {10**20}"),
    (["--top-k", "-1"], "--top-k must be between 0 and 2147483647, got -1"),
    (["--kv-cache-memory-gb", "inf"], "--kv-cache-memory-gb must be a finite positive number, got inf"),
    (["--kv-cache-memory-gb", "nan"], "--kv-cache-memory-gb must be a finite positive number, got nan"),
    (["--kv-cache-memory-gb", "0"], "--kv-cache-memory-gb must be a finite positive number, got 0.0"),
    (["--block-size", str(10**8)], "--block-size must be between 1 and 1024, got 100000000"),
    (["--block-size", str(10**30)], f"--block-size must be between 1 and 1024, got {10**30}"),
    (["--block-size", "0"], "--block-size must be a positive integer, got 0"),
    (["--num-kv-blocks", str(10**12)], "--num-kv-blocks must be between 1 and 2147483647, got 1000000000000"),
    (["--max-model-len", "1"], "--max-model-len must be between 2 and 2147483647, got 1"),
    (["--max-model-len", str(2**31)], "--max-model-len must be between 2 and 2147483647, got 2147483648"),
    (["--max-num-seqs", str(2**40)], "--max-num-seqs must be between 1 and 2147483647"),
    (["--max-num-batched-tokens", str(2**40)], "--max-num-batched-tokens must be between 1 and 2147483647"),
    (["--max-tokens", str(2**40)], "--max-tokens must be between 1 and 2147483647"),
    (["--num-speculative-tokens", "65"], "--num-speculative-tokens must be between 1 and 64, got 65"),
    (["--xray-every", "0"], "--xray-every must be a positive integer, got 0"),
    (["--xray-layer", "-1"], "--xray-layer must be between 0 and 2147483647, got -1"),
    (["--temperature", "nan"], "temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "temperature must be a finite number >= 0"),
    (["--top-p", "0"], "top_p must be a number in (0, 1]"),
    (["--top-p", "nan"], "top_p must be a number in (0, 1]"),
    (["--min-p", "1.5"], "min_p must be a number in [0, 1]"),
    (["--min-p", "nan"], "min_p must be a number in [0, 1]"),
    (["--stop", "\udcff"], "--stop #1: b'\\xff' is not valid UTF-8 (at byte 0): give UTF-8 text"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_every_flag_is_checked_before_loading_anything(capsys, monkeypatch, argv, needle):
    def must_not_load(*a, **k):
        raise AssertionError("a bad flag must be refused before anything is loaded")
    monkeypatch.setattr(run.engine_mod.qwen3, "resolve_model", must_not_load)
    monkeypatch.setattr(run.engine_mod, "LLMEngine", must_not_load)
    try:
        code = run.main(["--model", "tiny", *argv])
    except SystemExit as e:       # argparse's own refusals (now one `error:` line too)
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = errors(err)
    assert len(lines) == 1 and needle in lines[0], err


def test_flag_errors_from_a_real_process():
    proc = cli("--kv-cache-memory-gb", "inf")
    assert proc.returncode == 2 and proc.stdout == b""
    assert errors(proc.stderr) == [b"error: --kv-cache-memory-gb must be a finite positive number, got inf".decode()]
    proc = cli("--seed", "1.5")
    assert proc.returncode == 2 and len(errors(proc.stderr)) == 1 and b"usage:" not in proc.stderr


def test_largest_seeds_and_top_k_beyond_the_vocabulary(capsys, tiny):
    seed = 2**64 - 2           # request 2 samples with 2**64 - 1: the largest seed a torch.Generator takes
    code = run.main([*TINY, "--prompt", "a", "--prompt", "b", "--seed", str(seed), "--temperature", "1",
                     "--max-tokens", "2", "--ignore-eos", "--output", "json"])
    out, err = capsys.readouterr()
    assert code == 0 and [len(r["token_ids"]) for r in json.loads(out)["requests"]] == [2, 2], err
    code = run.main([*TINY, "--top-k", "151937", "--max-tokens", "2"])      # the vocabulary is known once loaded
    out, err = capsys.readouterr()
    assert code == 2 and errors(err) == [
        "error: --top-k must be between 0 and 151936 (the vocabulary of tiny), got 151937"]


def test_num_speculative_tokens_implies_speculative(tiny):
    proc = cli(*TINY, "--num-speculative-tokens", "2", "--max-tokens", "6", "--ignore-eos", "--output", "json")
    err = proc.stderr.decode()
    assert proc.returncode == 0 and errors(err) == [], err
    assert "speculative decoding (implied by --num-speculative-tokens): draft built-in" in err and "k = 2" in err
    stats = json.loads(proc.stdout)["stats"]
    assert stats["spec_num_drafts"] > 0 and len(stats["spec_acceptance_per_position"]) == 2


# ----------------------------------------------------------------------------- a bad prompt fails alone

def test_prompts_that_are_not_utf8_or_empty_fail_alone(tiny):
    argv = (*TINY, "--max-tokens", "3", "--ignore-eos", "--prompt", b"\xff\xfe", "--prompt", "Hi", "--prompt", " ")
    proc = cli(*argv, "--output", "json")
    assert proc.returncode == 2
    assert errors(proc.stderr) == ["error: prompt #1: b'\\xff\\xfe' is not valid UTF-8 (at byte 0): give UTF-8 text",
                                   "error: prompt #3: the prompt is empty: give some text"]
    bad, served, empty = json.loads(proc.stdout)["requests"]       # every prompt keeps its place
    assert bad == {"prompt": "\ufffd\ufffd", "prompt_token_ids": [], "token_ids": [], "text": "",
                   "finish_reason": None, "error": "b'\\xff\\xfe' is not valid UTF-8 (at byte 0): give UTF-8 text"}
    assert empty["prompt"] == " " and empty["error"] == "the prompt is empty: give some text"
    assert empty["token_ids"] == [] and empty["finish_reason"] is None
    assert served["prompt"] == "Hi" and len(served["token_ids"]) == 3 and served["finish_reason"] == "length"
    assert "error" not in served
    proc = cli(*argv, "--raw")                                     # text mode: the good prompt's text on stdout
    assert proc.returncode == 2 and len(errors(proc.stderr)) == 2 and proc.stdout.strip()


# ----------------------------------------------------------------------------- Ctrl-C

@pytest.mark.parametrize("output", ["json", "text"])
def test_ctrl_c_during_generation(tiny, output):
    """--output json: still one object, the requests not finished "abort" with their tokens so far; exit 130."""
    argv = [sys.executable, RUN, *TINY, "--prompt", "a", "--prompt", "b", "--prompt", "c", "--max-num-seqs", "1",
            "--max-tokens", "4000", "--ignore-eos", "--stream", "--output", output]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    seen = bytearray()
    streamed = seen if output == "json" else bytearray()          # json: the stream goes to stderr

    def drain(pipe, into):
        for chunk in iter(lambda: pipe.read1(4096), b""):
            into.extend(chunk)
    readers = [threading.Thread(target=drain, args=(proc.stderr, seen), daemon=True)]
    if output == "text":
        readers.append(threading.Thread(target=drain, args=(proc.stdout, streamed), daemon=True))
    for t in readers:
        t.start()
    deadline = time.monotonic() + 240
    while b"[0] " not in streamed or len(streamed) < streamed.find(b"[0] ") + 20:   # request 0 is generating
        assert proc.poll() is None and time.monotonic() < deadline, seen.decode(errors="replace")
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    if output == "json":
        out = proc.stdout.read()
    proc.wait(timeout=60)
    for t in readers:
        t.join(timeout=10)
    err = seen.decode(errors="replace")
    assert proc.returncode == 130 and errors(err) == [] and "interrupted" in err, err
    if output == "text":
        return
    doc = json.loads(out)                                           # exactly one JSON object
    reqs = doc["requests"]
    assert [r["prompt"] for r in reqs] == ["a", "b", "c"] and reqs[-1]["finish_reason"] == "abort"
    assert len(reqs[0]["token_ids"]) > 0 and doc["stats"]["generated_tokens"] >= len(reqs[0]["token_ids"])
    for r in reqs:
        assert r["finish_reason"] in ("length", "abort") and len(r["token_ids"]) <= 4000
        assert r["prompt_token_ids"][:3] == [151644, 872, 198]      # even a request that never started
    assert reqs[-1]["token_ids"] == [] and reqs[-1]["text"] == ""   # one seq at a time: c never started


# ----------------------------------------------------------------------------- where the output goes

@pytest.mark.parametrize("mode", [("--output", "json"), ("--stream",)])
def test_stdout_on_a_full_disk(tiny, mode):
    with open("/dev/full", "wb") as full:
        proc = cli(*TINY, "--prompt", "Hi", "--max-tokens", "3", *mode, stdout=full)
    assert proc.returncode == 1
    assert errors(proc.stderr) == ["error: cannot write the output to stdout: No space left on device"]


def test_stdout_closed():
    proc = cli(*TINY, "--prompt", "Hi", stdout=None, preexec_fn=closing(1))
    assert proc.returncode == 1 and errors(proc.stderr) == ["error: cannot write the output: stdout is closed"]


def test_stderr_closed_leaves_the_json_alone(tiny):
    proc = subprocess.run([sys.executable, RUN, *TINY, "--prompt", "Hi", "--max-tokens", "2", "--output", "json"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, cwd=ROOT, timeout=300,
                          preexec_fn=closing(2))
    assert proc.returncode == 0 and len(json.loads(proc.stdout)["requests"][0]["token_ids"]) == 2


def test_stream_into_a_pipe_closed_early(tiny):
    """`run.py --stream | head -c 5`: the reader goes away; the run ends quietly with exit 1."""
    proc = subprocess.Popen([sys.executable, RUN, *TINY, "--prompt", "Hi", "--max-tokens", "2000", "--ignore-eos",
                             "--stream"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT)
    assert len(proc.stdout.read(5)) == 5
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1 and errors(err) == [], err
    assert b"generated" not in err                                  # it stopped at once, no stats line


def test_tutorial_with_stdin_closed(tmp_path, tiny):
    proc = cli("--tutorial", "--model", "tiny", "--dtype", "float32", "--progress-file", str(tmp_path / "p.json"),
               stdin=None, preexec_fn=closing(0))
    assert proc.returncode == 0 and errors(proc.stderr) == [], proc.stderr.decode()


@pytest.mark.parametrize("output", ["json", "text"])
def test_stdout_that_cannot_take_utf8(tiny, output):
    """PYTHONIOENCODING=ascii: the JSON in \\u escapes, the text with backslash escapes; never a crash."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    proc = cli(*TINY, "--prompt", "héllo", "--prompt", "日本", "--max-tokens", "4", "--ignore-eos",
               "--output", output, env=env)
    assert proc.returncode == 0 and errors(proc.stderr) == [], proc.stderr.decode()
    proc.stdout.decode("ascii")
    if output == "json":
        assert [r["prompt"] for r in json.loads(proc.stdout)["requests"]] == ["héllo", "日本"]
    else:
        assert b"=== [0] h\\xe9llo" in proc.stdout and b"=== [1] \\u65e5\\u672c" in proc.stdout
