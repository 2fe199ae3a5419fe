"""modes/dashboard.py and modes/tutorial.py: the live view rendered from a real run (recording console,
a real pseudo-terminal, a pipe), and the 12-chapter course driven through stdin: answer keys, progress
saved / resumed / recovered, every demo's numbers against a fresh engine."""
import argparse
import fcntl
import io
import json
import math
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from conftest import ROOT, load

M = load("02_model")
E = load("engine")
paged = load("04_paged_attention")
run = load("run")
from modes import dashboard as D  # noqa: E402
from modes import tutorial as T  # noqa: E402

TITLES = ["Welcome", "Model Architecture", "Tokenization", "Embedding Lookup", "Self-Attention", "Prefill",
          "KV Cache", "Decode", "Sampling", "PagedAttention", "Speculative Decoding", "Putting It All Together"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def tiny():
    return M.preset_checkpoint("tiny")


def tiny_engine(**kw):
    cfg = dict(model="tiny", dtype="float32", device="cpu", max_model_len=256, num_kv_blocks=64)
    cfg.update(kw)
    return E.LLMEngine(E.EngineConfig(**cfg))


# ============================================================================= dashboard


def test_dashboard_renders_a_real_run(tiny):
    engine = tiny_engine()
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False)          # not a terminal: no Live
    dash = D.Dashboard(engine, console)
    engine.observers.append(dash)
    params = E.SamplingConfig(temperature=0, max_tokens=8, ignore_eos=True)
    with dash:
        outs = engine.generate(["The sky is blue because", "Paged attention"], params)
    assert dash.live is None and "\x1b" not in out.getvalue()
    summary = out.getvalue()                                                # the plain final summary
    assert "dashboard summary (done): 2 requests, 2 finished, 16 tokens generated" in summary
    assert f"{engine.stats['steps']} steps" in summary
    assert "prefix cache: 0 of" in summary and "0 preemptions" in summary

    rec = Console(record=True, width=120, file=io.StringIO())
    rec.print(dash.render())
    screen = rec.export_text()
    for title in ("throughput", "scheduler queues", "next-token candidates", "KV pool", "requests"):
        assert title in screen
    assert "done: 2/2 finished" in screen and f"step {engine.stats['steps']}" in screen
    assert screen.count("finished (length)") == 2 and screen.count("8/8") == 2
    bm = engine.block_manager
    assert f"used {bm.num_used_blocks} " in screen and f"cached {bm.num_evictable_blocks} " in screen
    free = bm.num_blocks - bm.num_used_blocks - bm.num_evictable_blocks
    assert f"free {free} " in screen
    mib = bm.num_evictable_blocks * engine.model_config.kv_bytes_per_token(engine.dtype) * 16 / 2**20
    assert f"cached {bm.num_evictable_blocks} ({mib:.1f} MiB)" in screen
    assert f"KV pool: {bm.num_blocks} blocks x 16 tokens" in screen
    # the candidates: the last sampled token of the last request, with its probability, marked
    rid, position, chosen, prob, top = dash.top
    assert rid == outs[1].request_id and chosen == outs[1].token_ids[-1] and "✓" in screen
    assert f"{top[0][1]:.1%}" in screen and f"req {rid} · pos {position}" in screen
    # the average rates are the engine's own (same accounting)
    st = engine.stats_summary()
    assert abs(dash.rates()["decode"][1] - st["decode_tokens_per_s"]) < 0.1
    assert abs(dash.rates()["prefill"][1] - st["prefill_tokens_per_s"]) < 0.1
    # the text so far: the end of each output
    for o in outs:
        assert D.one_line(o.text)[-8:] in screen


def test_dashboard_queues_preemption_and_prefix_hits(tiny):
    engine = tiny_engine(block_size=4, num_kv_blocks=16, max_model_len=64, max_num_batched_tokens=16)
    dash = D.Dashboard(engine, Console(file=io.StringIO(), force_terminal=False))
    engine.observers.append(dash)
    shared = list(range(1000, 1012))
    prompts = [shared + [1, 2], [7, 8, 9], [5, 6], shared + [3, 4]]
    with dash:
        engine.generate(prompts, E.SamplingConfig(temperature=0, max_tokens=12, ignore_eos=True))
    st = engine.stats_summary()
    assert st["preemptions"] >= 1 and dash.preemptions == st["preemptions"]
    assert dash.hit_tokens == st["prefix_cache_hit_tokens"] > 0
    assert dash.totals["prefill"][0] + dash.totals["decode"][0] == engine.stats["prefill_tokens"] + engine.stats["decode_tokens"]
    rec = Console(record=True, width=120, file=io.StringIO())
    rec.print(dash.render())
    screen = rec.export_text()
    assert f"{st['preemptions']} total" in screen
    assert f"{dash.hit_tokens}/{dash.admitted_tokens} tokens hit" in screen


def test_block_map_states_and_aggregation():
    """Each cell is a block (or k blocks of a big pool): used by a request, shared, cached, free."""
    cfg = M.PRESETS["tiny"]

    def fake_engine(num_blocks):
        bm = paged.BlockManager(num_blocks, 16)
        return SimpleNamespace(block_manager=bm, model_config=cfg, dtype=torch.float32, device="cpu",
                               config=SimpleNamespace(model="/x/tiny-seed0"), tokenizer=None,
                               scheduler=SimpleNamespace(running=[], waiting=[])), bm

    engine, bm = fake_engine(12)
    a = list(range(40))
    bm.allocate(0, a)
    bm.commit(0, a)                      # blocks 0, 1 hashed
    bm.allocate(1, a[:33])                # shares blocks 0, 1 (hit), new block
    bm.allocate(2, list(range(500, 520)))
    bm.commit(2, list(range(500, 520)))
    bm.free(2)                            # its full block: evictable
    dash = D.Dashboard(engine, Console(file=io.StringIO(), width=120))
    cells = dash.pool["cells"]
    assert dash.pool["per_cell"] == 1 and len(cells) == 12
    assert cells[0] == cells[1] == -2                      # shared by requests 0 and 1
    assert cells[2] == 0 and cells[3] == 1                 # request 0's own, request 1's own
    assert cells[4] == -1 and cells[5] is None             # evictable, free
    assert (dash.pool["used"], dash.pool["cached"], dash.pool["free"]) == (4, 1, 7)

    engine, bm = fake_engine(5000)                         # a big pool: several blocks per cell
    bm.allocate(0, list(range(16 * 100)))
    dash = D.Dashboard(engine, Console(file=io.StringIO(), width=120))
    per_cell = dash.pool["per_cell"]
    assert per_cell == math.ceil(5000 / (D.MAP_WIDTH * D.MAP_ROWS)) and len(dash.pool["cells"]) <= D.MAP_WIDTH * D.MAP_ROWS
    assert sum(c == 0 for c in dash.pool["cells"]) == math.ceil(100 / per_cell)
    rec = Console(record=True, width=120, file=io.StringIO())
    rec.print(dash._pool_panel())
    assert f"1 cell = {per_cell} blocks" in rec.export_text()


def test_dashboard_speculative_acceptance(tiny):
    engine = tiny_engine(speculative=True, num_speculative_tokens=3)
    if "spec_draft_tokens" not in engine.stats_summary():
        pytest.skip("this engine reports no spec_* stats")
    dash = D.Dashboard(engine, Console(file=io.StringIO(), force_terminal=False))
    engine.observers.append(dash)
    with dash:
        engine.generate(["speculate", "again"], E.SamplingConfig(temperature=0, max_tokens=6, ignore_eos=True))
    st = engine.stats_summary()
    acc, prop = dash.spec_rate()
    assert (acc, prop) == (st["spec_accepted_tokens"], st["spec_draft_tokens"]) and prop > 0
    assert dash.spec == {"accepted": acc, "draft_tokens": prop}                # the spec_verified events agree
    assert dash.totals["decode"][0] == engine.stats["decode_tokens"]           # several tokens per step, counted
    assert dash.totals["prefill"][0] == engine.stats["prefill_tokens"]
    rec = Console(record=True, width=120, file=io.StringIO())
    rec.print(dash.render())
    assert f"{acc:.0f}/{prop:.0f}" in rec.export_text()
    assert "speculative:" in dash.summary()


def _pty_run(argv, interrupt_when=None, timeout=240):
    """Run argv in a real pseudo-terminal (120x40); returns (exit code, everything it wrote).
    interrupt_when: a byte string; SIGINT is sent once the output contains it."""
    pid, fd = pty.fork()
    if pid == 0:                                                            # the child: becomes argv
        try:
            os.chdir(ROOT)
            os.execv(sys.executable, [sys.executable, *argv])
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    buf, sent, deadline = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if interrupt_when is not None and not sent and interrupt_when in buf:
                os.kill(pid, signal.SIGINT)
                sent = True
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:                                             # EIO: the child closed the terminal
                    break
                if not data:
                    break
                buf += data
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), buf


def test_dashboard_in_a_real_terminal(tiny):
    code, out = _pty_run(["run.py", "--model", "tiny", "--dtype", "float32", "--dashboard", "--max-tokens", "20",
                          "--prompt", "a", "--prompt", "b"])
    text = ANSI.sub("", out.decode("utf-8", "replace"))
    assert code == 0, text[-3000:]
    assert "Traceback" not in text
    assert "done: 2/2 finished" in text                                    # the final frame stays on screen
    assert "[26 prompt tokens, 40 generated;" in text                      # run.py's summary after it
    assert out.count(b"\x1b[?25l") >= 1                                    # the cursor was hidden ...
    assert out.rfind(b"\x1b[?25h") > out.rfind(b"\x1b[?25l")               # ... and shown again at the end


def test_dashboard_ctrl_c_restores_the_terminal(tiny):
    code, out = _pty_run(["run.py", "--model", "tiny", "--dtype", "float32", "--dashboard", "--max-tokens", "3000",
                          "--ignore-eos", "--prompt", "a"],
                         interrupt_when=b"scheduler queues")
    text = ANSI.sub("", out.decode("utf-8", "replace"))
    assert code == 130, text[-3000:]
    assert "Traceback" not in text and "interrupted" in text
    assert out.rfind(b"\x1b[?25h") > out.rfind(b"\x1b[?25l")


def test_dashboard_piped_prints_a_plain_summary(tiny):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), "--model", "tiny", "--dtype", "float32",
                           "--dashboard", "--max-tokens", "6", "--ignore-eos", "--prompt", "a", "--prompt", "b"],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout + proc.stderr
    assert "dashboard summary (done): 2 requests, 2 finished, 12 tokens generated" in proc.stdout
    assert "=== [0] a" in proc.stdout                                      # run.py's outputs follow


# ============================================================================= tutorial: content


def test_twelve_chapters_in_order_each_with_a_demo_and_a_quiz():
    assert [ch.title for ch in T.CHAPTERS] == TITLES
    assert [ch.number for ch in T.CHAPTERS] == list(range(1, 13))
    for ch in T.CHAPTERS:
        assert ch.read and all(os.path.exists(os.path.join(ROOT, f)) for f, _ in ch.read), ch.title
        # the ladder first: numbered files, then the rest, and nano_kernels/ (after the ladder) last
        rank = [0 if f[:2].isdigit() else 2 if f.startswith("nano_kernels/") else 1 for f, _ in ch.read]
        assert rank == sorted(rank), ch.title


def test_quiz_answer_keys_are_consistent():
    q = T.Qwen3()
    for ch in T.CHAPTERS:
        questions = ch.quiz(q)
        assert len(questions) >= 3, ch.title
        for question in questions:
            question.check()                     # 4 distinct options, answer in 1..4, the 3 wrong ones explained
    # The numbers the course quotes for Qwen3-0.6B come from the config: they are the published ones.
    assert (q.params, q.layers, q.hidden, q.heads, q.kv_heads, q.head_dim, q.vocab) == \
        (596_049_920, 28, 1024, 16, 8, 128, 151_936)
    assert q.kv_bf16 == 114_688 and q.q_width == 2048 and q.tokens == 151_669 and q.added == 26


def test_texts_and_diagrams_quote_the_config():
    q = T.Qwen3()
    assert "596,049,920" in T.text_architecture(q) and "16 x 128 = 2048" in T.text_architecture(q)
    assert "114,688 bytes = 112 KiB" in T.text_kv_cache(q) and "448 MiB" in T.text_kv_cache(q)
    assert "151,643" in T.text_tokenization(q) and "151643-151668" in T.text_tokenization(q)
    assert "26.1%" in T.text_embedding(q)
    L = SimpleNamespace(q=q)
    assert "KV head     0  0  1  1" in T.diagram_attention(L)
    assert "decoder layer, x 28" in T.diagram_architecture(L)


def test_reflow_keeps_items_and_commands():
    text = "A paragraph that\nwraps.\n  - an item\n    continued\n  $ python run.py --a --b --c --d --e --f\n"
    lines = T.reflow(text, 20)
    assert lines[0] == "A paragraph that" and "wraps." in lines[1]
    assert any(line.startswith("  - an item") for line in lines)
    assert "  $ python run.py --a --b --c --d --e --f" in lines


# ============================================================================= tutorial: the whole course


def args_for(tmp_path, *argv):
    return run.build_parser().parse_args(["--tutorial", "--progress-file", str(tmp_path / "progress.json"), *argv])


def mixed_answers(q):
    """Per chapter: Q1 right, Q2 wrong, Q3 right (then Enter for the next chapter)."""
    lines, expected = [], {}
    for ch in T.CHAPTERS:
        correct = 0
        for k, question in enumerate(ch.quiz(q)):
            right = k != 1
            lines.append(str(question.answer if right else question.answer % 4 + 1))
            correct += right
        lines.append("")
        expected[ch.number] = correct
    return "\n".join(lines) + "\n", expected


@pytest.fixture(scope="module")
def whole_course(tmp_path_factory, tiny):
    """All 12 chapters through stdin, right and wrong answers, once for the module."""
    tmp = tmp_path_factory.mktemp("course")
    q = T.Qwen3()
    stdin, expected = mixed_answers(q)
    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    out = io.StringIO()
    try:
        t0 = time.perf_counter()
        code, lesson = T.course(args_for(tmp), Console(file=out, width=100, highlight=False))
        seconds = time.perf_counter() - t0
    finally:
        sys.stdin = old
    return SimpleNamespace(code=code, lesson=lesson, text=out.getvalue(), expected=expected, q=q,
                           path=tmp / "progress.json", seconds=seconds)


def test_all_twelve_chapters_through_stdin(whole_course):
    c = whole_course
    assert c.code == 0 and not c.lesson.errors, c.lesson.errors
    for n, title in enumerate(TITLES, 1):
        assert f"Chapter {n}/12: {title}" in c.text
    assert c.text.index("Chapter 1/12") < c.text.index("Chapter 12/12")
    assert "Course complete: 12/12 chapters, 24/36 answers right." in " ".join(c.text.split())
    # every wrong answer got the explanation of the option chosen, every right one its reason
    flat = " ".join(c.text.split())
    for ch in T.CHAPTERS:
        qs = ch.quiz(c.q)
        wrong = qs[1].answer % 4 + 1
        assert " ".join(f"Not quite: {qs[1].why[wrong]}".split()) in flat
        assert " ".join(f"Right. {qs[0].right}".split()) in flat
    doc = json.loads(c.path.read_text())
    assert doc["finished"] is True and doc["done"] == list(range(1, 13))
    assert {int(k): v["correct"] for k, v in doc["scores"].items()} == c.expected
    assert all(v["total"] == 3 for v in doc["scores"].values())
    print(f"\nthe whole course (12 demos) took {c.seconds:.1f}s")


def fresh(lesson, **kw):
    return lesson.new_engine(**kw)


def test_demo_numbers_match_the_live_engine(whole_course):
    L, f = whole_course.lesson, whole_course.lesson.facts
    assert sorted(f) == list(range(1, 13))
    g = lambda n: E.SamplingConfig(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731

    # 1. one request: its events and steps
    e = fresh(L)
    out = e.generate([f[1]["prompt"]], g(8))[0]
    assert out.token_ids == f[1]["token_ids"] and f[1]["prompt_tokens"] == len(out.prompt_token_ids)
    ev = f[1]["events"]
    assert ev["sampled"] == 8 and ev["decode"] == 7 and ev["prefill"] == 1 and ev["step_done"] == f[1]["steps"] == 8

    # 2. shapes through the layers and the parameter counts
    cfg = e.model_config
    n = f[2]["prompt_tokens"]
    trace = {name: (i, o) for name, i, o in f[2]["trace"]}
    assert trace["embed_tokens"] == ((n,), (n, cfg.hidden_size))
    assert trace["lm_head"] == ((1, cfg.hidden_size), (1, cfg.vocab_size))
    assert f[2]["params"] == dict(M.count_parameters(e.model)) and f[2]["qwen3_params"] == 596_049_920

    # 3. tokens
    tok = e.tokenizer
    assert f[3]["ids"] == tok.encode(f[3]["text"]) == f[3]["event_ids"] and f[3]["roundtrip"]
    assert f[3]["hello_trace"][-1][1] == tok.encode("Hello")[0] and f[3]["digits"] == 5

    # 4. the embedding is a lookup, tied
    assert f[4]["lookup_equal"] and f[4]["matmul_close"] and f[4]["tied"] == cfg.tie_word_embeddings
    assert f[4]["shape"] == (len(f[4]["ids"]), cfg.hidden_size)
    assert f[4]["x0"] == e.model.model.embed_tokens.weight[f[4]["ids"][0], :4].tolist()

    # 5. attention weights: causal, rows of 1, equal to the engine's own output
    w = torch.tensor(f[5]["weights"])
    assert torch.allclose(w.sum(-1), torch.ones(len(w)), atol=1e-5) and torch.all(w.triu(1) == 0)
    assert f[5]["diff"] < 1e-4 and (f[5]["heads"], f[5]["kv_heads"]) == (cfg.num_attention_heads, cfg.num_key_value_heads)

    # 6. chunked prefill: 16-token chunks, logits only at the last position, the same first token
    chunked = f[6]["by_budget"][16]
    P = chunked["prompt_tokens"]
    assert chunked["chunks"] == [(s, min(s + 16, P)) for s in range(0, P, 16)]
    assert chunked["logits_at"] == [[] for _ in range(len(chunked["chunks"]) - 1)] + [[P - 1]]
    assert f[6]["by_budget"][512]["chunks"] == [(0, P)] and f[6]["same_first_token"]

    # 7. the cache: same ids, the work, the bytes
    P, n = f[7]["prompt_tokens"], f[7]["new_tokens"]
    assert f[7]["same"] and f[7]["naive_passes"] == sum(P + t for t in range(n)) and f[7]["cached_passes"] == P + n - 1
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    assert f[7]["bytes_per_token"] == per_token
    assert f[7]["pool_bytes"] == e.num_kv_blocks * e.config.block_size * per_token

    # 8. decode: n - 1 steps, each request one position further
    assert f[8]["decode_steps"] == 4
    for k, (rids, positions) in enumerate(f[8]["decode_rows"]):
        assert positions == [p + k for p in f[8]["prompt_tokens"]]
    assert [o.token_ids for o in fresh(L).generate(["Decode one token at a time", "Many requests share each decode step"],
                                                   g(5))] == f[8]["token_ids"]

    # 9. the sampled event's distribution is the model's softmax; seeds reproduce
    assert f[9]["max_diff"] < 1e-5 and f[9]["seeded"] == f[9]["seeded_batched"]
    assert f[9]["greedy_token"] == f[9]["event_top"][0][0]
    for row in f[9]["reshaped"].values():
        assert all(0 <= p <= 1 for p in row)

    # 10. prefix cache: the full blocks of the common prefix, shared
    bs, common = f[10]["block_size"], f[10]["common"]
    a, b = sorted(f[10]["tables"])
    assert f[10]["cached_tokens"] == (min(common, len(f[10]["ids"][1]) - 1) // bs) * bs > 0
    assert f[10]["hit_blocks"] == f[10]["tables"][a][:f[10]["cached_tokens"] // bs]
    table, p = f[10]["tables"][b], f[10]["position"]
    assert f[10]["slot"] == table[p // bs] * bs + p % bs and f[10]["hit_tokens"] == f[10]["cached_tokens"]

    # 11. the acceptance rule: rate sum min(p, q), output distributed as p; live: same ids as plain greedy
    assert abs(f[11]["toy_rate"] - f[11]["toy_expected"]) < 0.02
    assert max(abs(x - y) for x, y in zip(f[11]["toy_freq"], f[11]["toy_p"])) < 0.02
    if f[11]["engine"] is not None:
        live = f[11]["engine"]
        assert live["same"] and live["stats"]["spec_draft_tokens"] > 0
        assert 0 <= live["stats"]["spec_accepted_tokens"] <= live["stats"]["spec_draft_tokens"]

    # 12. everything at once equals naive_generate; the preemptions are the engine's
    assert all(f[12]["same"]) and f[12]["stats"]["preemptions"] == f[12]["preempted_events"] >= 1
    for ids, got in zip(f[12]["prompt_ids"], f[12]["token_ids"]):
        assert got == M.naive_generate(e.model, ids, 12)


# ============================================================================= tutorial: navigation and progress


def tutorial(monkeypatch, capsys, tmp_path, stdin, *argv):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = run.main(["--tutorial", "--progress-file", str(tmp_path / "progress.json"), *argv])
    out, err = capsys.readouterr()
    return code, out, err, tmp_path / "progress.json"


def answers(chapter, right=True):
    return [str(q.answer if right else q.answer % 4 + 1) for q in T.CHAPTERS[chapter - 1].quiz(T.Qwen3())]


def test_progress_is_saved_and_resumed(monkeypatch, capsys, tmp_path, tiny):
    a3 = answers(3)
    code, out, err, path = tutorial(monkeypatch, capsys, tmp_path, "\n".join([a3[0], "q"]) + "\n", "--chapter", "3")
    assert code == 0 and "Progress saved" in out
    doc = json.loads(path.read_text())
    assert doc["current"] == 3 and doc["done"] == [] and doc["scores"] == {}      # quit in the middle of the quiz

    code, out, err, _ = tutorial(monkeypatch, capsys, tmp_path, "\n".join([*a3, "q"]) + "\n")
    assert code == 0 and "Resuming at chapter 3" in out and "Chapter 3/12: Tokenization" in out
    assert "Chapter 1/12" not in out
    doc = json.loads(path.read_text())
    assert doc["current"] == 4 and doc["done"] == [3] and doc["scores"] == {"3": {"correct": 3, "total": 3}}

    code, out, err, _ = tutorial(monkeypatch, capsys, tmp_path, "")                 # end of input = q
    assert code == 0 and "Resuming at chapter 4 (chapters done: 3)" in out and "Chapter 4/12" in out
    assert json.loads(path.read_text())["current"] == 4
    assert not [p for p in os.listdir(tmp_path) if p != "progress.json"]           # no temporary files left


def test_navigation_back_next_and_jump(monkeypatch, capsys, tmp_path, tiny):
    code, out, err, path = tutorial(monkeypatch, capsys, tmp_path, "x\n7\nb\nn\nq\n", "--chapter", "4")
    assert code == 0
    order = re.findall(r"Chapter (\d+)/12", out)
    assert order == ["4", "3", "4"]                      # b at chapter 4's quiz, n at chapter 3's
    assert out.count("please type 1-4, n, b or q") == 2   # 'x' and '7' are asked again
    assert json.loads(path.read_text())["current"] == 4


def test_finished_course_starts_over_and_keeps_scores(monkeypatch, capsys, tmp_path, tiny):
    path = tmp_path / "progress.json"
    scores = {str(c): {"correct": 3, "total": 3} for c in range(1, 13)}
    path.write_text(json.dumps({"version": 1, "current": 12, "done": list(range(1, 13)), "scores": scores,
                                "finished": True}))
    code, out, err, _ = tutorial(monkeypatch, capsys, tmp_path, "q\n")             # a file from before the marker
    assert code == 0 and "starting again at chapter 1" in out and "Chapter 1/12: Welcome" in out
    doc = json.loads(path.read_text())
    assert doc["current"] == 1 and doc["scores"] == scores and doc["done"] == list(range(1, 13))
    assert doc["format"] == T.PROGRESS_FORMAT                                       # rewritten with the marker


MARK = f'"format": "{T.PROGRESS_FORMAT}", '


@pytest.mark.parametrize("content", ["{" + MARK[:-2] + "}", "{" + MARK + '"version": 1, "current": 99}',
                                     "{" + MARK + '"version": 1}', "{" + MARK + '"version": "1", "current": 2}',
                                     "{" + MARK + '"version": 1, "current": 2, "scores": {"2": {"correct": 5, "total": 3}}}'])
def test_corrupt_progress_file_warns_once_and_starts_fresh(tmp_path, content):
    """A file of ours (it has the marker) that makes no sense: one warning, a fresh start. Anything without
    the marker is not ours and is refused (tests/test_tutorial_progress.py)."""
    path = tmp_path / "p.json"
    path.write_text(content)
    store = T.ProgressStore(str(path))
    err = io.StringIO()
    old, sys.stderr = sys.stderr, err
    try:
        progress, resumed = store.load()
    finally:
        sys.stderr = old
    assert (progress.current, progress.done, progress.scores, resumed) == (1, [], {}, False)
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: cannot use tutorial progress file")
    assert store.can_write                                                          # ours: it may be replaced


def test_corrupt_or_unusable_file_end_to_end(monkeypatch, capsys, tmp_path, tiny):
    (tmp_path / "progress.json").write_text("{" + MARK + '"version": 1, "current": "three"}')
    code, out, err, path = tutorial(monkeypatch, capsys, tmp_path, "q\n")
    assert code == 0 and "Traceback" not in err
    assert err.count("warning:") == 1 and "starting fresh" in err
    assert "Chapter 1/12: Welcome" in out
    assert json.loads(path.read_text())["current"] == 1                            # replaced by a good one
    # a folder where the file should be: not a regular file, refused before anything runs
    monkeypatch.setattr(sys, "stdin", io.StringIO("q\n"))
    folder = tmp_path / "dir.json"
    folder.mkdir()
    code = run.main(["--tutorial", "--progress-file", str(folder), "--chapter", "3"])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err and "Chapter" not in out
    assert err.splitlines() == [err.strip()] and err.startswith("error: --progress-file")
    assert "is not a regular file" in err and os.listdir(folder) == []


def test_progress_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    store = T.ProgressStore(str(path))
    store.save(T.Progress(current=5, done=[1, 2], scores={2: {"correct": 1, "total": 3}}))
    assert T.Progress.from_json(json.loads(path.read_text())) == T.Progress(5, [1, 2], {2: {"correct": 1, "total": 3}})

    def broken_dump(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(T.json, "dump", broken_dump)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    store.save(T.Progress(current=9))
    assert json.loads(path.read_text())["current"] == 5                            # the old file is intact
    assert os.listdir(tmp_path) == ["p.json"] and err.getvalue().count("warning:") == 1
    store.save(T.Progress(current=10))                                             # warned once, then quiet
    assert err.getvalue().count("warning:") == 1


def test_bad_chapter_exits_2(monkeypatch, capsys, tmp_path):
    code, out, err, _ = tutorial(monkeypatch, capsys, tmp_path, "", "--chapter", "13")
    assert code == 2 and err.strip().startswith("error:") and "--chapter" in err


def test_tutorial_demos_with_narrate_and_xray(monkeypatch, capsys, tmp_path, tiny):
    code, out, err, _ = tutorial(monkeypatch, capsys, tmp_path, "q\n", "--chapter", "8", "--narrate", "--xray")
    assert code == 0 and "Traceback" not in err
    demo = out[out.index("Live demo"):]
    assert "» " in demo                                       # the narrator's commentary inside the demo
    assert "Two requests, greedy" in demo


def test_default_progress_path_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert T.default_progress_path() == os.path.join(str(tmp_path), "nano-vllm-py", "tutorial.json")
    monkeypatch.delenv("XDG_DATA_HOME")
    assert T.default_progress_path() == os.path.join(os.path.expanduser("~"), ".local", "share", "nano-vllm-py",
                                                     "tutorial.json")


def test_tutorial_model_is_tiny_unless_named():
    assert T.tutorial_model(argparse.Namespace(model=run.DEFAULT_MODEL)) == "tiny"
    assert T.tutorial_model(argparse.Namespace(model="demo")) == "demo"


def test_next_in_the_last_chapter_ends(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(T.CHAPTERS[11], "demo", lambda L: {})          # the navigation is the point here
    code, out, err, path = tutorial(monkeypatch, capsys, tmp_path, "n\n", "--chapter", "12")
    assert code == 0 and "This is the last chapter" in out
    assert json.loads(path.read_text())["current"] == 12
