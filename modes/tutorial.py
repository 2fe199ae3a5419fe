"""
modes/tutorial.py - `--tutorial`: a 12-chapter course that runs on the live engine.

    python run.py --tutorial                      # resume where you stopped (chapter 1 the first time)
    python run.py --tutorial --chapter 7          # jump to a chapter
    python run.py --tutorial --narrate --xray     # the demos also narrate / x-ray the engine
    printf '1\\n2\\n3\\nq\\n' | python run.py --tutorial --progress-file /tmp/p.json   # scripted

Every chapter is the same five parts: the idea in a few paragraphs (with Qwen3-0.6B's real
numbers, computed from the `demo` preset's config, never typed in), an ASCII drawing, where to
read it in this repository, a demonstration on the real engine (the `tiny` preset unless --model
names another model: the numbers printed come from that run), and a quiz of three questions
answered 1-4. At every prompt `n` goes to the next chapter, `b` back one, `q` quits; end of input
(or no stdin at all, `<&-`) counts as `q`, so the whole course can be driven from stdin.

Progress (chapters done, quiz scores, where you are) is JSON in the user's data folder
($XDG_DATA_HOME/nano-vllm-py/tutorial.json, else ~/.local/share/nano-vllm-py/tutorial.json) or
--progress-file, marked as ours ("format": "nano-vllm-py tutorial progress") and replaced atomically
on every change, keeping its permission bits. Only a file the tutorial wrote is ever replaced:
anything else at that path (a file of notes, a FIFO, /dev/null, a folder) is refused with one
`error:` line and exit 2, untouched. A file of ours that makes no sense gives one warning and a
fresh start; a folder that cannot be written gives one warning and a course that is not saved.

Chapters are data (`CHAPTERS`): text, diagram and quiz are functions of `Qwen3` (the numbers of
Qwen3-0.6B), the demo a function of the `Lesson` (it creates engines, records what it printed in
`lesson.facts[chapter]` so tests can check every number against a fresh run).
"""
from __future__ import annotations

import importlib
import json
import math
import os
import stat as stat_mod
import sys
import textwrap
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from rich.cells import cell_len
from rich.console import Console
from rich.rule import Rule
from rich.text import Text

from modes.common import fmt_bytes

NAV = "n next chapter · b back · q quit"
PROGRESS_FORMAT = "nano-vllm-py tutorial progress"     # the marker that says a file is the tutorial's own
PROGRESS_VERSION = 1
PROGRESS_MAX_BYTES = 1 << 20                              # ours are ~1 KB: anything bigger is someone else's
DEFAULT_HUB_MODEL = "Qwen/Qwen3-0.6B"     # run.py's default --model: the tutorial uses `tiny` instead


def mod(name: str):
    """A numbered file of this repository, imported by name (as they import each other)."""
    return importlib.import_module(name)


# ----------------------------------------------------------------------------- the numbers of Qwen3-0.6B


class Qwen3:
    """Qwen3-0.6B's numbers, all derived from 02_model.PRESETS["demo"] (its exact config)."""

    def __init__(self):
        M = mod("02_model")
        c = self.cfg = M.PRESETS["demo"]
        self.layers, self.hidden, self.vocab = c.num_hidden_layers, c.hidden_size, c.vocab_size
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.mlp = c.intermediate_size
        self.q_width = self.heads * self.head_dim
        self.kv_width = self.kv_heads * self.head_dim
        self.group = self.heads // self.kv_heads
        self.rope_theta, self.max_pos, self.tied = c.rope_theta, c.max_position_embeddings, c.tie_word_embeddings
        with torch.device("meta"):                               # shapes only: no memory, no time
            model = M.Qwen3ForCausalLM(c)
        self.param_rows = dict(M.count_parameters(model))
        self.params = self.param_rows["total"]
        self.embed_params = self.param_rows["embed_tokens"]
        self.attn_params = next(v for k, v in self.param_rows.items() if k.startswith("attention"))
        self.mlp_params = next(v for k, v in self.param_rows.items() if k.startswith("mlp"))
        self.norm_params = next(v for k, v in self.param_rows.items() if k.startswith("norms"))
        self.kv_bf16 = c.kv_bytes_per_token(torch.bfloat16)
        self.weights_bf16 = self.params * 2
        tok = mod("01_tokenize").load_tokenizer()                  # the real Qwen3 tokenizer (assets/)
        added = sorted(tok.hf.get_added_tokens_decoder())
        self.tokens, self.bpe_tokens, self.added = tok.vocab_size, added[0], len(added)
        self.first_added, self.last_added = added[0], added[-1]
        defaults = mod("engine").EngineConfig()
        self.block_size, self.budget = defaults.block_size, defaults.max_num_batched_tokens
        self.tiny_layers = M.PRESETS["tiny"].num_hidden_layers

    def share(self, n: int) -> str:
        return f"{100 * n / self.params:.1f}%"


def pad(text: str, width: int) -> str:
    """Left-justify by terminal cells (a CJK character takes two)."""
    return text + " " * max(0, width - cell_len(text))


# ----------------------------------------------------------------------------- chapters and quizzes


@dataclass
class Question:
    text: str
    options: list[str]            # exactly 4, answered by number 1-4
    answer: int                   # 1-based index of the right option
    why: dict[int, str]           # explanation for each wrong option (keys: the three wrong numbers)
    right: str = ""               # why the right one is right

    def check(self) -> None:
        """The answer key is consistent: 4 distinct options, answer in 1..4, the 3 wrong ones explained."""
        assert len(self.options) == 4 and len(set(self.options)) == 4, self.text
        assert 1 <= self.answer <= 4, self.text
        assert set(self.why) == {1, 2, 3, 4} - {self.answer} and all(self.why.values()), self.text
        assert self.right, self.text


@dataclass
class Chapter:
    title: str
    text: Callable[[Qwen3], str]
    diagram: Callable[["Lesson"], str]
    read: list[tuple[str, str]]                  # (file, function or class) to read next: the numbered
                                                 # files first, nano_kernels/ last (after the ladder)
    demo: Callable[["Lesson"], dict]
    quiz: Callable[[Qwen3], list[Question]]
    number: int = 0


# ----------------------------------------------------------------------------- the lesson: engines and facts


class EventLog:
    """An observer that keeps every event (the demos count and print them)."""

    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    def on_event(self, event: str, data: dict) -> None:
        # Copy lists: the engine may hand out a list it keeps appending to (a prompt's token ids).
        self.events.append((event, {k: list(v) if isinstance(v, list) else v for k, v in data.items()}))

    def of(self, name: str) -> list[dict]:
        return [d for e, d in self.events if e == name]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e, _ in self.events:
            out[e] = out.get(e, 0) + 1
        return out


def samples_per_step(log: EventLog) -> dict[int, list[dict]]:
    """The `sampled` events of each step (they come between a step's prefill/decode events and its step_done)."""
    out: dict[int, list[dict]] = {}
    step = None
    for event, d in log.events:
        if event in ("prefill", "decode"):
            step = d["step"]
        elif event == "sampled" and step is not None:
            out.setdefault(step, []).append(d)
    return out


def tutorial_model(args) -> str:
    """`tiny` unless --model names something other than run.py's default hub model."""
    model = getattr(args, "model", None)
    return "tiny" if model in (None, DEFAULT_HUB_MODEL) else model


class Lesson:
    """What the chapters share: the console, engines for the demos, Qwen3-0.6B's numbers, and
    `facts` (chapter -> what its demo printed) for the tests."""

    def __init__(self, args, console: Console):
        self.args, self.console = args, console
        self.q = Qwen3()
        self.model = tutorial_model(args)
        dtype = getattr(args, "dtype", "auto")
        self.dtype = "float32" if dtype in (None, "auto") else dtype   # demos: exact numbers over speed
        self.device = getattr(args, "device", "auto") or "auto"
        self.facts: dict[int, dict] = {}
        self.errors: dict[int, str] = {}
        self.chapter = 0
        self._tokenizer = None
        self._engine = None

    # --- engines

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            E = mod("engine")
            self._tokenizer = mod("01_tokenize").load_tokenizer(E.qwen3.resolve_model(self.model))
        return self._tokenizer

    def new_engine(self, **overrides):
        """A fresh engine on the tutorial's model. Small pool and context unless overridden (the demos
        are short); eager (forward hooks must fire: no CUDA graphs, no compilation)."""
        E = mod("engine")
        cfg = dict(model=self.model, dtype=self.dtype, device=self.device, max_model_len=512, num_kv_blocks=64,
                   enforce_eager=True)
        cfg.update(overrides)
        return E.LLMEngine(E.EngineConfig(**cfg), tokenizer=self.tokenizer)

    @property
    def engine(self):
        """The shared engine of the chapters that need no special configuration."""
        if self._engine is None:
            self._engine = self.new_engine()
        return self._engine

    @contextmanager
    def watching(self, engine, log: EventLog | None = None):
        """Attach an event log, and --narrate / --xray when asked for, for the length of a demo."""
        added = [log] if log is not None else []
        if getattr(self.args, "narrate", False):
            try:
                from modes.narrator import Narrator
                added.append(Narrator(engine, self.console))
            except ImportError:
                pass
        if getattr(self.args, "xray", False):
            try:
                from modes.xray import XRay
                added.append(XRay(engine, self.console, every=getattr(self.args, "xray_every", 16),
                                  layer=getattr(self.args, "xray_layer", 0)))
            except ImportError:
                pass
        engine.observers.extend(added)
        try:
            yield log
        finally:
            for obs in added:
                if obs in engine.observers:
                    engine.observers.remove(obs)
                close = getattr(obs, "close", None)
                if callable(close) and obs is not log:
                    close()

    # --- output

    def say(self, text: str, style: str = "") -> None:
        self.console.print(Text(text, style=style))

    def piece(self, token_id: int) -> str:
        """One token as text: quoted, or its bytes when it is part of a UTF-8 character."""
        tok = self.tokenizer
        if token_id >= tok.vocab_size:
            return "<unused id>"
        s = tok.decode([token_id], skip_special_tokens=False)
        if "\ufffd" in s:
            return "b" + repr(tok.token_bytes(token_id))[1:]
        return repr(s)

    def rounding_note(self, engine) -> None:
        """Exact comparisons hold in float32; in 16-bit two correct paths may round differently."""
        if engine.dtype != torch.float32:
            self.say(f"  (in {str(engine.dtype).removeprefix('torch.')} two correct computations round differently, "
                     "so near-ties can flip and differences are ~1e-2; the tutorial runs float32 unless --dtype "
                     "says otherwise)", "dim")

    def model_line(self, engine) -> str:
        c = engine.model_config
        return (f"`{self.model}` model: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                f"{c.num_attention_heads} query / {c.num_key_value_heads} KV heads of {c.head_dim}, "
                f"{str(engine.dtype).removeprefix('torch.')} on {engine.device}")


def greedy(max_tokens: int, **kw):
    return mod("engine").SamplingConfig(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def run_requests(engine, prompts, params) -> list:
    """Run prompts (texts or id lists) to completion, outputs in prompt order."""
    return engine.generate(list(prompts), params)


# ============================================================================= 1. Welcome


def text_welcome(q: Qwen3) -> str:
    return f"""\
This course walks through how a large language model is served, on the engine in this folder:
nano-vllm-py, a small Qwen3 server in plain PyTorch that does what vLLM does (paged KV cache,
continuous batching, chunked prefill, prefix caching, preemption), one idea per file.

A request's life: the text is cut into token ids; the scheduler admits the request; one forward
pass over the whole prompt (prefill) writes every token's keys and values into the KV cache and
gives the first new token; then one token per step (decode) until a stop token or the length
limit; the ids are turned back into text. Everything in this course happens on the real engine.
The demos run on the `tiny` preset (random weights, {q.tiny_layers} layers; `--model demo` gives Qwen3-0.6B's
full shape): the mechanics are real, the words are noise. The numbers quoted for Qwen3-0.6B
({q.params:,} parameters) are computed from its config.

Each chapter: the idea, a drawing, where to read the code, a live demo, three questions.
At every prompt: a number answers, n = next chapter, b = back, q = quit (progress is kept)."""


def diagram_welcome(L: Lesson) -> str:
    ids = L.tokenizer.encode(L.tokenizer.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}]))
    return f"""\
 "Why is the sky blue?"
        │ 01_tokenize.py   byte-level BPE: text -> token ids (chat template around it)
        ▼
 {str(ids[:5])[:-1]}, ...]  ({len(ids)} ids)
        │ 05_scheduler.py  admitted under a token budget, blocks from the pool (04)
        ▼
 PREFILL  all prompt tokens, one forward (02_model.py) ──> K,V into the paged cache (04)
        │                                                       │
        ▼                                                       ▼
 DECODE   one token per request per step  <── attends over ── KV cache
        │ 06_sampling.py   logits -> the next id (greedy or sampled)
        ▼
 stop at <|im_end|> or max_tokens ──> detokenize ──> text     (engine.py ties it together)"""


def demo_welcome(L: Lesson) -> dict:
    engine = L.engine
    L.say(L.model_line(engine), "dim")
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}])
    steps0 = engine.stats["steps"]
    with L.watching(engine, EventLog()) as log:
        t0 = time.perf_counter()
        out = run_requests(engine, [prompt], greedy(8))[0]
        secs = time.perf_counter() - t0
    counts = log.counts()
    steps = engine.stats["steps"] - steps0
    L.say(f"One request, greedy, 8 new tokens: {len(out.prompt_token_ids)} prompt tokens (chat template "
          f"included), {steps} engine steps, {secs * 1000:.0f} ms.")
    L.say("The events the engine emitted on its hook points (engine.observers), in order of first appearance:")
    for name, n in counts.items():
        L.say(f"  {name:<17} x{n}")
    L.say(f"Output ids {out.token_ids} -> {out.text!r}  (random weights: noise, but real mechanics)")
    return dict(prompt=prompt, prompt_tokens=len(out.prompt_token_ids), token_ids=list(out.token_ids),
                steps=steps, events=counts)


def quiz_welcome(q: Qwen3) -> list[Question]:
    return [
        Question("What does the model actually read and predict?",
                 ["Unicode characters, one at a time", "Whole words from a fixed English dictionary",
                  "Token ids: integers, each one a row of the embedding table", "Raw UTF-8 bytes only"],
                 3, {1: "Characters are never seen: the tokenizer turns text into token ids first.",
                     2: "There is no word dictionary: byte-level BPE pieces can be words, parts of words or single bytes.",
                     4: "Every byte is a token, but frequent byte sequences are merged into single tokens."},
                 "The tokenizer maps text to ids; the model embeds ids and predicts the next id."),
        Question("With `--model tiny` or `demo`, why is the generated text noise?",
                 ["The tokenizer is a toy one", "The weights are random: the mechanics are real, nothing was trained",
                  "The sampling temperature is too high", "The KV cache is turned off"],
                 2, {1: f"It is the real Qwen3 tokenizer ({q.tokens:,} tokens), shipped in assets/.",
                     3: "The demos are greedy (temperature 0): the most likely token of a random model is still noise.",
                     4: "The cache changes the speed, never the tokens: it is checked token for token against no cache."},
                 "Random weights with Qwen3's exact shapes: every mechanism runs, the words mean nothing."),
        Question("What is one call to LLMEngine.step()?",
                 ["One token for one request", "A whole request, from prompt to finish",
                  "One layer of the model", "One forward over every token the scheduler picked, from all requests"],
                 4, {1: "A step serves every scheduled request at once: prefill chunks and one token per decoding request.",
                     2: "A request spans many steps: one or more for its prompt, then one per new token.",
                     3: "A step runs all layers: it is a full forward pass."},
                 "Scheduler -> one model forward over the packed tokens -> sampler -> stop checks."),
    ]


# ============================================================================= 2. Model Architecture


def text_architecture(q: Qwen3) -> str:
    return f"""\
Qwen3 is a decoder-only transformer. Token ids become vectors (the embedding), {q.layers} identical
layers each refine every token's vector (the "residual stream", {q.hidden} numbers per token), and a
final projection scores every vocabulary entry: one logit per token of {q.vocab:,}.

Each layer is two residual sub-blocks, each behind an RMSNorm: attention (the only place tokens
look at each other) and a SwiGLU MLP (per token: down(silu(gate(x)) * up(x)), {q.hidden} -> {q.mlp} -> {q.hidden}).
What is particular to Qwen3:
  - grouped-query attention: {q.heads} query heads share {q.kv_heads} key/value heads ({q.group} per group);
  - head_dim = {q.head_dim} comes from the config and is NOT hidden / heads = {q.hidden // q.heads}: q_proj maps
    {q.hidden} -> {q.heads} x {q.head_dim} = {q.q_width}, and o_proj maps {q.q_width} back to {q.hidden};
  - q_norm and k_norm: every head's query and key get their own RMSNorm before RoPE;
  - RoPE with theta = {q.rope_theta:,.0f}; lm_head {'tied to' if q.tied else 'separate from'} the embedding matrix.

Qwen3-0.6B has {q.params:,} parameters: embedding {q.share(q.embed_params)}, attention {q.share(q.attn_params)},
MLP {q.share(q.mlp_params)}, norms {q.share(q.norm_params)} (lm_head shares the embedding: 0 extra).
In bf16 that is {fmt_bytes(q.weights_bf16)} of weights, read in full for every decode step."""


def box(title: str, lines: list[str], indent: str = " ") -> str:
    """A titled box around lines, sized to fit them."""
    width = max([len(line) for line in lines] + [len(title) + 3])
    top = f"{indent}┌─ {title} " + "─" * (width - len(title) - 2) + "┐"
    body = [f"{indent}│ {line:<{width}} │" for line in lines]
    return "\n".join([top, *body, f"{indent}└" + "─" * (width + 2) + "┘"])


def diagram_architecture(L: Lesson) -> str:
    q = L.q
    layer = box(f"decoder layer, x {q.layers}", [
        "x = x + o_proj(attention(RMSNorm(x)))",
        f"    q: {q.heads} heads x {q.head_dim}, k/v: {q.kv_heads} heads x {q.head_dim}, q/k-norm, RoPE",
        "x = x + down_proj(silu(gate_proj(h)) * up_proj(h)),  h = RMSNorm(x)",
        f"    {q.hidden} -> {q.mlp} -> {q.hidden}"])
    return f"""\
 token ids (N,)
     │ embed_tokens  {q.vocab} x {q.hidden}   (a row lookup)
     ▼
 x (N, {q.hidden})   the residual stream, through every layer
{layer}
     ▼ RMSNorm
     ▼ lm_head  {q.hidden} -> {q.vocab}   ({'tied: the embedding matrix again' if q.tied else 'its own matrix'})
 logits (N, {q.vocab})   computed only where a token is sampled"""


def demo_architecture(L: Lesson) -> dict:
    engine = L.engine
    model = engine.model
    L.say(L.model_line(engine), "dim")
    trace: list[tuple[str, tuple, tuple]] = []
    names = [("embed_tokens", model.model.embed_tokens)]
    names += [(f"layers.{i}", layer) for i, layer in enumerate(model.model.layers)]
    names += [("norm", model.model.norm), ("lm_head", model.lm_head)]
    hooks = []
    for name, module in names:
        def hook(m, inputs, output, name=name):
            if len(trace) < len(names):                            # the first step only (the prefill)
                trace.append((name, tuple(inputs[0].shape), tuple(output.shape)))
        hooks.append(module.register_forward_hook(hook))
    try:
        prompt = "The cat sat on the mat"
        out = run_requests(engine, [prompt], greedy(1))[0]
    finally:
        for h in hooks:
            h.remove()
    L.say(f"One prefill of {prompt!r} ({len(out.prompt_token_ids)} tokens) through the live model, "
          "shapes caught by forward hooks:")
    for name, shape_in, shape_out in trace:
        if name.startswith("layers.") and name not in ("layers.0", f"layers.{len(model.model.layers) - 1}"):
            continue
        L.say(f"  {name:<13} in {str(shape_in):<12} out {shape_out}")
    L.say("  (lm_head sees 1 row: logits are computed only at the last prompt position, the one that samples)")
    M = mod("02_model")
    rows = M.count_parameters(model)
    L.say(f"Parameters of this `{L.model}` model: " + ", ".join(f"{k} {v:,}" for k, v in rows))
    L.say(f"Qwen3-0.6B, same code, from its config: {L.q.params:,} parameters.")
    return dict(prompt_tokens=len(out.prompt_token_ids), trace=trace, params=dict(rows), qwen3_params=L.q.params)


def quiz_architecture(q: Qwen3) -> list[Question]:
    shares = {"the embedding table": q.embed_params, "the attention blocks": q.attn_params,
              "the MLP blocks": q.mlp_params, "the RMSNorm weights": q.norm_params}
    biggest = max(shares, key=shares.get)
    order = list(shares)
    return [
        Question(f"In Qwen3-0.6B, q_proj maps the {q.hidden}-dim hidden state to how many dims?",
                 [str(q.hidden), str(q.head_dim), str(q.q_width), str(q.mlp)],
                 3, {1: f"Only if head_dim were hidden / heads = {q.hidden // q.heads}; Qwen3 reads head_dim = {q.head_dim} "
                        f"from its config, so {q.heads} x {q.head_dim} = {q.q_width}.",
                     2: f"{q.head_dim} is one head; q_proj produces all {q.heads} query heads at once.",
                     4: f"{q.mlp} is the MLP's intermediate size (gate_proj and up_proj)."},
                 f"{q.heads} query heads x head_dim {q.head_dim} = {q.q_width}."),
        Question("How many query heads share each key/value head (grouped-query attention)?",
                 [str(1), str(q.group), str(2 * q.group), str(q.heads)],
                 2, {1: f"One KV head per query head is classic multi-head attention; Qwen3-0.6B has {q.heads} query "
                        f"but {q.kv_heads} KV heads.",
                     3: f"{2 * q.group} per group would mean {q.heads // (2 * q.group)} KV heads; the config says {q.kv_heads}.",
                     4: f"All {q.heads} sharing one KV head would be multi-query attention (MQA)."},
                 f"{q.heads} / {q.kv_heads} = {q.group}: the KV cache is {q.group}x smaller than with one KV head per query head."),
        Question("Where are most of Qwen3-0.6B's parameters?",
                 [f"{k} ({q.share(v)})" for k, v in shares.items()],
                 order.index(biggest) + 1,
                 {i + 1: f"{k} hold {q.share(shares[k])}; {biggest} hold {q.share(shares[biggest])}."
                  for i, k in enumerate(order) if k != biggest},
                 f"{biggest}: 3 matrices of {q.hidden} x {q.mlp} per layer, x {q.layers} layers."),
    ]


# ============================================================================= 3. Tokenization


def text_tokenization(q: Qwen3) -> str:
    return f"""\
The model reads integers. Qwen3's tokenizer is byte-level BPE: the text is normalised (NFC), cut
by a regex into chunks (a word with its leading space, every single digit, punctuation runs,
whitespace), each chunk becomes its UTF-8 bytes, and pairs of adjacent pieces are merged, lowest
rank first, for as long as the merged bytes form a token. The {q.bpe_tokens:,} ranks are the merge order
learned in training; all 256 byte values are tokens, so any string can be encoded (nothing is
"unknown"; a rare character may end up split across tokens holding parts of its UTF-8 bytes).

After the BPE tokens come {q.added} added tokens (ids {q.first_added}-{q.last_added}) matched as whole strings, like
<|im_start|> and <|im_end|>: the chat format is written with them, and <|im_end|> (or
<|endoftext|>) ends generation. The embedding has {q.vocab:,} rows, more than the {q.tokens:,} tokens:
the other {q.vocab - q.tokens} rows are padding that text never produces."""


def bpe_trace(tok, word: str) -> list[tuple[str, int]]:
    """BPE on one chunk, step by step, from the tokenizer's own vocabulary: (the pieces after the
    merge, the rank of the merged token). Ranks are token ids below the first added token."""
    T = mod("01_tokenize")
    byte_char = T.bytes_to_unicode()
    spell = lambda b: "".join(byte_char[x] for x in b)  # noqa: E731
    first_added = min(tok.hf.get_added_tokens_decoder())
    parts = [bytes([b]) for b in word.encode("utf-8")]
    steps = []
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = tok.hf.token_to_id(spell(parts[i] + parts[i + 1]))
            if rank is not None and rank < first_added and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return steps
        rank, i = best
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        steps.append((" ".join(p.decode("utf-8", "replace") for p in parts), rank))


def diagram_tokenization(L: Lesson) -> str:
    tok = L.tokenizer
    word = "Hello"
    lines = [f" BPE on {word!r}, live from the tokenizer's vocabulary (lowest rank merges first):",
             f"   {' '.join(word)}"]
    for pieces, rank in bpe_trace(tok, word):
        lines.append(f"   {pieces:<14} merged a token of rank {rank}")
    lines.append(f"   ==> {tok.encode(word)}")
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    lines += ["", " The chat template around a user message \"Hi\" (thinking off):",
              "   " + repr(chat), "   -> " + str(tok.encode(chat))]
    return "\n".join(lines)


def demo_tokenization(L: Lesson) -> dict:
    engine = L.engine
    tok = engine.tokenizer
    text = "Hello world! 12345 東京 👋🏽"
    ids = tok.encode(text)
    L.say(f"The engine's tokenizer on {text!r}: {len(ids)} tokens")
    for i in ids:
        L.say(f"  {i:>6}  {L.piece(i)}")
    back = tok.decode(ids)
    L.say(f"decode(ids) gives the text back exactly: {back == text}")
    with L.watching(engine, EventLog()) as log:
        engine.add_request(text, greedy(1))
        while engine.has_unfinished_requests():
            engine.step()
    event = log.of("tokenized")[0]
    L.say(f"The engine's `tokenized` event for the same text carried the same ids: {event['token_ids'] == ids}")
    return dict(text=text, ids=ids, roundtrip=back == text, event_ids=list(event["token_ids"]),
                hello_trace=bpe_trace(tok, "Hello"), hello_ids=tok.encode("Hello"),
                digits=len(tok.encode("12345")), eos=list(tok.eos_token_ids))


def quiz_tokenization(q: Qwen3) -> list[Question]:
    return [
        Question("Why can byte-level BPE encode any string, emoji and Chinese included?",
                 ["It has a token for every Unicode character", "Unknown characters become an <unk> token",
                  "The text is converted to ASCII first", "All 256 byte values are tokens, so anything falls back to bytes"],
                 4, {1: "There are far more Unicode characters than tokens; rare ones are spelled with byte tokens.",
                     2: "There is no <unk> token: nothing is ever unknown at the byte level.",
                     3: "Only NFC normalisation happens; the bytes are the UTF-8 of the original text."},
                 "Every byte is a token; merges only make common byte sequences shorter."),
        Question("How many tokens is \"12345\" for Qwen3?", ["1", "2", "3", "5"],
                 4, {1: "The pre-tokenizer regex puts every digit in its own chunk, and BPE never merges across chunks.",
                     2: "Digits are never grouped: \\p{N} matches a single digit.",
                     3: "Digits are never grouped in threes either (some tokenizers do, Qwen's does not)."},
                 "One token per digit: numbers get a consistent representation."),
        Question("What does <|im_end|> do when the model generates it?",
                 ["It ends the assistant's turn, so the engine stops the request",
                  "It separates words", "It pads batches to the same length", "It opens a thinking block"],
                 1, {2: "Words are separated by the spaces inside tokens (' Paris' is one token).",
                     3: "The engine packs sequences back to back: there is no padding to add.",
                     4: "That is <think>; its end is </think>."},
                 "It is one of the tokenizer's eos_token_ids, checked after every sampled token."),
    ]


# ============================================================================= 4. Embedding Lookup


def text_embedding(q: Qwen3) -> str:
    return f"""\
The first layer is a table: embed_tokens holds one row of {q.hidden} numbers per vocabulary entry,
{q.vocab:,} x {q.hidden} = {q.embed_params:,} parameters ({q.share(q.embed_params)} of Qwen3-0.6B,
{fmt_bytes(q.embed_params * 2)} in bf16). Embedding token id t is copying row t: no multiplication. (It equals
one_hot(t) @ W, a product with {q.vocab - 1:,} zeros and a single 1 per token, that nobody computes.) The N packed
tokens of a step give x of shape (N, {q.hidden}): the start of the residual stream.

At the other end, lm_head scores the final hidden state against every vocabulary entry,
logits = h @ W_out^T. Qwen3-0.6B ties them: W_out is the embedding matrix itself, so the same
{q.embed_params:,} numbers serve both ends (that is why its lm_head counts 0 parameters)."""


def diagram_embedding(L: Lesson) -> str:
    tok = L.tokenizer
    ids = tok.encode("The sky is blue")
    cols = "   ".join(f"{i:>5}" for i in ids)
    return f"""\
 "The sky is blue" -> ids   {cols}
                              {'      '.join('│' for _ in ids)}  row lookups, no arithmetic
 embed_tokens  ({L.q.vocab} rows x {L.q.hidden})  ▼
   row 0       [ ...  ]
   row {ids[0]:<7} [ {L.q.hidden} numbers ] ──> x[0]
   ...                         ──> x[1], x[2], x[3]
 x: ({len(ids)}, {L.q.hidden})  one row per token; lm_head ({'tied' if L.q.tied else 'untied'}) uses the same matrix at the end"""


def demo_embedding(L: Lesson) -> dict:
    engine = L.engine
    model = engine.model
    L.say(L.model_line(engine), "dim")
    ids = engine.tokenizer.encode("The sky is blue")
    W = model.model.embed_tokens.weight
    captured = {}

    def catch(module, inputs, output):             # returns None: a hook's return value would replace the output
        if "x" not in captured:
            captured["x"] = (inputs[0].detach().clone(), output.detach().clone())
    hook = model.model.embed_tokens.register_forward_hook(catch)
    try:
        run_requests(engine, [ids], greedy(1))
    finally:
        hook.remove()
    ids_seen, x = captured["x"]
    with torch.inference_mode():
        lookup_equal = torch.equal(x, W[ids_seen])
        one_hot = torch.nn.functional.one_hot(ids_seen, W.shape[0]).to(W.dtype) @ W
        matmul_close = torch.allclose(one_hot, x, atol=1e-6)
    L.say(f"embed_tokens.weight is {tuple(W.shape)}; the engine's prefill embedded ids {ids_seen.tolist()} "
          f"into x of shape {tuple(x.shape)}.")
    L.say(f"x[0][:4] = {[round(v, 4) for v in x[0, :4].tolist()]}  =  row {ids[0]}[:4] = "
          f"{[round(v, 4) for v in W[ids[0], :4].tolist()]}")
    L.say(f"x equals the rows W[ids] exactly: {lookup_equal}; equals one_hot(ids) @ W: {matmul_close} "
          f"(that product would cost {len(ids) * W.shape[0] * W.shape[1]:,} multiply-adds)")
    head = getattr(model.lm_head, "weight", None)
    if head is not None:
        tied = head.data_ptr() == W.data_ptr()
        L.say(f"lm_head.weight is the same tensor as embed_tokens.weight (tied): {tied}")
    else:                                   # the engine swapped lm_head for a prepacked matmul (CPU)
        tied = model.config.tie_word_embeddings
        L.say(f"lm_head here is {type(model.lm_head).__name__} (its weight repacked for this CPU); the checkpoint "
              f"ties it to embed_tokens: {tied}")
    return dict(ids=ids, shape=tuple(x.shape), weight_shape=tuple(W.shape), lookup_equal=lookup_equal,
                matmul_close=matmul_close, tied=tied, x0=x[0, :4].tolist())


def quiz_embedding(q: Qwen3) -> list[Question]:
    return [
        Question("What does embed_tokens do with token id 785?",
                 ["Multiplies a one-hot vector by the whole matrix", "Copies row 785 of the table",
                  "Hashes 785 into a vector", "Runs attention over the previous tokens"],
                 2, {1: f"Mathematically equal, but nobody computes a product with {q.vocab - 1:,} zeros: it is an index.",
                     3: "The rows are learned parameters, not hashes.",
                     4: "Attention happens inside the layers, after the embedding."},
                 "An embedding is a lookup: row t is the vector of token t."),
        Question(f"Qwen3-0.6B ties lm_head to embed_tokens. What does that mean?",
                 ["lm_head is skipped at inference", "The two are initialised alike but trained apart",
                  f"The output projection reuses the {q.vocab} x {q.hidden} embedding matrix",
                  "The embedding is frozen while lm_head trains"],
                 3, {1: "Without lm_head there would be no logits: it is computed, with the shared matrix.",
                     2: "Tied means one tensor, not two similar ones: updates to one are updates to the other.",
                     4: "Training is not the point here; tying is about sharing the same parameters."},
                 f"One matrix used twice: {q.embed_params:,} parameters saved."),
        Question(f"N packed tokens go through embed_tokens. What shape comes out (Qwen3-0.6B)?",
                 [f"(N, {q.vocab})", f"(N, {q.hidden})", f"({q.hidden}, N)", f"(N, {q.heads}, {q.head_dim})"],
                 2, {1: f"(N, {q.vocab}) is the shape of logits, after lm_head.",
                     3: "Tokens are rows: one row of hidden numbers per token.",
                     4: f"That is the query after q_proj and the split into {q.heads} heads, inside attention."},
                 f"One row of {q.hidden} numbers per token: the residual stream."),
    ]


# ============================================================================= 5. Self-Attention


def text_attention(q: Qwen3) -> str:
    return f"""\
Attention is where a token reads the others. Each token's hidden vector is projected to a query,
a key and a value per head (Qwen3-0.6B: {q.heads} query heads, {q.kv_heads} key/value heads, {q.head_dim} dims each).
Qwen3 then RMS-normalises every query and key head (q_norm, k_norm) and rotates them by position
(RoPE: pair i of a head turns by angle pos x {q.rope_theta:,.0f}^(-2i/{q.head_dim})), so the dot product of a query
and a key depends on how far apart the two tokens are.

For one head: scores = q . k / sqrt({q.head_dim}) for every earlier key, softmax over them, and the output
is the weighted sum of the values. The causal mask lets token t see tokens 0..t only: it is
trained to predict token t+1, so it must not see it. The {q.heads} heads' outputs are concatenated
({q.q_width}) and o_proj maps them back to {q.hidden}. Grouped-query attention: query head h uses KV head
h // {q.group}, so only {q.kv_heads} keys and values per token are computed and cached."""


def diagram_attention(L: Lesson) -> str:
    q = L.q
    heads = " ".join(f"{h:>2}" for h in range(q.heads))
    kv = " ".join(f"{h // q.group:>2}" for h in range(q.heads))
    return f"""\
 scores of one head, causal mask (· = masked: a token never sees the future)
            key:  t0    t1    t2    t3
 query t0       [ s00   ·     ·     ·  ]      softmax per row,
 query t1       [ s10   s11   ·     ·  ]      then out_t = sum_j w_tj v_j
 query t2       [ s20   s21   s22   ·  ]
 query t3       [ s30   s31   s32   s33]      s_tj = q_t . k_j / sqrt({q.head_dim})

 grouped-query attention in Qwen3-0.6B: which KV head each query head reads
   query head {heads}
   KV head    {kv}"""


def demo_attention(L: Lesson) -> dict:
    M = mod("02_model")
    engine = L.engine
    model = engine.model
    attn = model.model.layers[0].self_attn
    L.say(L.model_line(engine), "dim")
    captured = {}

    def hook(m, args, output):
        if "x" not in captured:                                    # the prefill call only
            captured.update(x=args[0].detach().clone(), cos=args[1], sin=args[2], out=output.detach().clone())
    h = attn.register_forward_hook(hook)
    prompt = "The cat sat on the mat"
    try:
        with L.watching(engine):
            out = run_requests(engine, [prompt], greedy(1))[0]
    finally:
        h.remove()
    x, cos, sin = captured["x"], captured["cos"], captured["sin"]
    N, H, Hk, d = x.shape[0], attn.n_heads, attn.n_kv, attn.head_dim
    with torch.inference_mode():                                   # the same math, written out densely
        qh = M.apply_rope(attn.q_norm(attn.q_proj(x).view(N, H, d)), cos, sin)      # (N, H, d)
        kh = M.apply_rope(attn.k_norm(attn.k_proj(x).view(N, Hk, d)), cos, sin)     # (N, Hk, d)
        vh = attn.v_proj(x).view(N, Hk, d)
        k_rep, v_rep = kh.repeat_interleave(H // Hk, dim=1), vh.repeat_interleave(H // Hk, dim=1)  # GQA
        scores = torch.einsum("qhd,khd->hqk", qh.float(), k_rep.float()) / math.sqrt(d)            # (H, N, N)
        causal = torch.ones(N, N, dtype=torch.bool).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        mine = attn.o_proj(torch.einsum("hqk,khd->qhd", weights, v_rep.float()).reshape(N, H * d).to(x.dtype))
    diff = (mine.float() - captured["out"].float()).abs().max().item()
    pieces = [L.piece(i) for i in out.prompt_token_ids]
    L.say(f"Layer 0, head 0 of the live model on {prompt!r}: the attention weights (rows sum to 1)")
    L.say(" " * 12 + " ".join(" " * max(0, 7 - cell_len(p[:7])) + p[:7] for p in pieces))
    for i, p in enumerate(pieces):
        cells = " ".join(f"{weights[0, i, j].item():7.3f}" if j <= i else f"{'·':>7}" for j in range(N))
        L.say("  " + " " * max(0, 9 - cell_len(p[:9])) + p[:9] + " " + cells)
    L.say(f"GQA here: {H} query heads, {Hk} KV heads, query head h reads KV head h // {H // Hk}.")
    L.say(f"This dense recomputation vs the engine's paged attention output (layer 0, after o_proj): "
          f"max abs diff {diff:.1e}")
    L.rounding_note(engine)
    return dict(prompt_ids=list(out.prompt_token_ids), weights=weights[0].tolist(), diff=diff,
                heads=H, kv_heads=Hk)


def quiz_attention(q: Qwen3) -> list[Question]:
    return [
        Question("What does the causal mask do?",
                 ["Drops low-probability tokens", "Hides padding tokens in a batch",
                  "Lets token t attend to tokens 0..t only, never to later ones", "Removes repeated tokens"],
                 3, {1: "That is top-p / min-p sampling (06_sampling.py), after the model.",
                     2: "Packed batches have no padding; the paged kernel's validity mask is a separate thing.",
                     4: "Nothing removes repeated tokens; attention weighs them like any other."},
                 "The model predicts token t+1 from tokens 0..t: seeing t+1 would be cheating."),
        Question(f"Why are the scores divided by sqrt(head_dim) = sqrt({q.head_dim})?",
                 [f"So that dot products of {q.head_dim}-dim vectors stay near unit scale and softmax does not saturate",
                  "So the weights sum to 1", "To save memory", "To convert them to bf16"],
                 1, {2: "Softmax makes the weights sum to 1, whatever the scale.",
                     3: "Dividing by a constant changes no tensor's size.",
                     4: "Dtypes have nothing to do with it; the engine even computes softmax statistics in fp32."},
                 "A sum of d products grows like sqrt(d); dividing keeps the softmax from becoming one-hot."),
        Question(f"Grouped-query attention in Qwen3-0.6B ({q.heads} query heads, {q.kv_heads} KV heads) shares what?",
                 ["One query among all heads", f"Each KV head's keys and values, between {q.group} query heads",
                  "Keys and values between layers", "Keys and values between requests"],
                 2, {1: "Every query head has its own query; it is keys and values that are shared.",
                     3: f"Each of the {q.layers} layers has its own K and V.",
                     4: "Sharing between requests is prefix caching (chapter 10), a different idea."},
                 f"Only {q.kv_heads} K and V heads per token are computed and cached: half of {q.heads}."),
    ]


# ============================================================================= 6. Prefill


def text_prefill(q: Qwen3) -> str:
    return f"""\
A new request's prompt goes through the model in one forward: all positions at once, in
parallel, causal mask inside. Every layer writes the keys and values of every prompt token into
the KV cache; only the last position's hidden state goes through lm_head (its logits give the
first new token, and the engine computes no others: `logits_indices` in engine.py).

Prefill multiplies each weight matrix by a matrix of N tokens: the weights are read once for N
rows of work, so it is limited by arithmetic and runs many tokens per second. A long prompt is cut
into chunks under the step's token budget (max_num_batched_tokens, {q.budget} by default): chunked
prefill. Each chunk attends to the chunks before it through the cache, and decodes of other
requests ride along in the same steps instead of stalling behind a long prompt.

Attention is the one part of prefill whose work grows with N squared. 02_model.py's
causal_attention is the idea: every position against every earlier one, in one SDPA call.
04_paged_attention.py does the same over the paged cache (PagedContext.attend,
paged_prefill_attention), so a chunk also sees the keys of the chunks before it. After the ladder,
nano_kernels/csrc/paged_prefill.cpp is what a chunk of 32 tokens or more runs in bf16 on a CPU with
bf16 dot-product instructions: a flash kernel, 32 positions' queries against 64 keys at a time,
scores kept in fp32, an online softmax, so the N x N matrix never exists; elsewhere torch's SDPA
does the job."""


def diagram_prefill(L: Lesson) -> str:
    return """\
 one step, prompt of N tokens                     chunked, budget 16 tokens per step (40 tokens):
   t0 t1 t2 ... tN-1   all at once                  step 1  [t0 ........ t15]   K,V -> cache
    │  │  │      │                                  step 2  [t16 ....... t31]   reads t0..t15
 every layer: K,V of all N -> cache                 step 3  [t32 .. t39] ──> logits at t39
                       └──> logits at tN-1 only                           ──> first new token"""


def demo_prefill(L: Lesson) -> dict:
    prompt = ("Prefill runs every prompt token through the model at once. " * 3).strip()
    facts = {}
    for budget in (L.q.budget, 16):
        engine = L.engine if budget == L.q.budget else L.new_engine(max_num_batched_tokens=budget)
        with L.watching(engine, EventLog()) as log:
            out = run_requests(engine, [prompt], greedy(2))[0]
        prefills = log.of("prefill")
        done = {d["step"]: d for d in log.of("step_done")}
        chunks = [(s, e) for d in prefills for _, s, e in d["chunks"]]
        first = prefills[0]["step"]
        secs = sum(done[d["step"]]["seconds"] for d in prefills)
        tokens = sum(d["num_tokens"] for d in prefills)
        per_step = samples_per_step(log)
        logits_at = [[d["position"] - 1 for d in per_step.get(p["step"], [])] for p in prefills]
        if budget == L.q.budget:
            L.say(f"Budget {budget}: {len(out.prompt_token_ids)} prompt tokens in {len(prefills)} step "
                  f"(step {first}), {tokens} tokens in {secs * 1000:.1f} ms = {tokens / secs:,.0f} tok/s.")
        else:
            L.say(f"Budget {budget}: the same prompt in {len(prefills)} chunks (steps {first}..{prefills[-1]['step']}):")
        for (s, e), at in zip(chunks, logits_at):
            L.say(f"  positions {s}..{e - 1}: " + ("logits at " + ", ".join(f"position {a}" for a in at) if at
                                                   else "no logits (K,V into the cache only)"))
        L.say(f"  the first new token: {out.token_ids[0]} {L.piece(out.token_ids[0])}")
        facts[budget] = dict(prompt_tokens=len(out.prompt_token_ids), chunks=chunks, steps=len(prefills),
                             first_token=out.token_ids[0], logits_at=logits_at, tokens_per_s=tokens / secs)
    same = facts[L.q.budget]["first_token"] == facts[16]["first_token"]
    L.say(f"Chunked or not, the first new token is the same: {same} (the cache makes the chunks add up "
          "to one prefill)")
    L.rounding_note(L.engine)
    return dict(by_budget=facts, same_first_token=same)


def quiz_prefill(q: Qwen3) -> list[Question]:
    return [
        Question("A 40-token prompt with a budget of 16 tokens per step: how many steps until its first new token?",
                 ["1", str(math.ceil(40 / 16)), "16", "40"],
                 2, {1: "16 tokens per step cannot hold 40 prompt tokens: the prompt is chunked.",
                     3: "16 is the budget per step, not the number of steps.",
                     4: "That would be one token per step: prefill processes a whole chunk per step."},
                 "16 + 16 + 8: the third chunk reaches the last position, whose logits give the token."),
        Question("During the prefill of a 13-token prompt, at how many positions are logits computed?",
                 ["All 13", "Only the last one", "The first and the last", "None: prefill only fills the cache"],
                 2, {1: "The other positions' next tokens are already known (they are the prompt); their logits would be wasted.",
                     3: "The first position's prediction is the prompt's second token: not needed.",
                     4: "The last position's logits give the first new token, in the same step."},
                 "Only the position that samples: one row through lm_head instead of 13."),
        Question("Why does prefill run many more tokens per second than decode?",
                 ["It skips attention", "It uses a smaller model",
                  "Its tokens come from the prefix cache",
                  "All its tokens go through each weight matrix together: one read of the weights, many rows of work"],
                 4, {1: "Every prompt token attends to the ones before it (causal).",
                     2: "Same model, same weights.",
                     3: "Only on a prefix-cache hit, and then those tokens are skipped, not computed faster."},
                 "Matrix x matrix: arithmetic-bound, where decode is bound by reading the weights."),
    ]


# ============================================================================= 7. KV Cache


def text_kv_cache(q: Qwen3) -> str:
    per_4096 = 4096 * q.kv_bf16
    return f"""\
In a causal model the keys and values of token j depend only on tokens 0..j, so they never change
once computed. Keep them: after the prefill, each decode step runs ONE new token through the model
and its query attends over the cached keys. Without the cache every step reruns the whole sequence:
T new tokens after a P-token prompt cost P + (P+1) + ... + (P+T-1) token passes (quadratic); with
it, P + T - 1 (linear).

The price is memory. Per token, every layer keeps K and V for every KV head:
  2 x {q.layers} layers x {q.kv_heads} KV heads x {q.head_dim} dims x 2 bytes (bf16) = {q.kv_bf16:,} bytes = {fmt_bytes(q.kv_bf16)}
so 4096 tokens of context hold {fmt_bytes(per_4096)}, next to {fmt_bytes(q.weights_bf16)} of bf16 weights. Without GQA
({q.heads} KV heads) it would be twice that. 03_kv_cache.py keeps one contiguous tensor per sequence;
chapter 10 cuts it into blocks."""


def diagram_kv_cache(L: Lesson) -> str:
    return """\
 no cache: every step reruns everything          with a cache: each token runs once
 step 1  ██████████████                          prefill  ██████████████ -> K,V cached
 step 2  ███████████████                         decode                  █ -> +1 K,V
 step 3  ████████████████                        decode                   █ -> +1 K,V
 step 4  █████████████████                       decode                    █
         quadratic: O(T x (P + T))                        linear: P + T - 1 token passes"""


def demo_kv_cache(L: Lesson) -> dict:
    KV, M = mod("03_kv_cache"), mod("02_model")
    engine = L.engine
    model = engine.model
    ids = engine.tokenizer.encode("A KV cache stores the keys and values of every token the model has already seen.")
    n = 12
    t0 = time.perf_counter()
    ref = M.naive_generate(model, ids, n)
    t_naive = time.perf_counter() - t0
    t0 = time.perf_counter()
    cached = KV.generate_with_cache(model, ids, n)
    t_cached = time.perf_counter() - t0
    out = run_requests(engine, [ids], greedy(n))[0]
    P = len(ids)
    naive_tokens, cached_tokens = sum(P + t for t in range(n)), P + n - 1
    L.say(f"{n} greedy tokens after a {P}-token prompt on the live `{L.model}` model:")
    L.say(f"  naive_generate (no cache): {naive_tokens:,} token passes, {t_naive * 1000:.0f} ms")
    L.say(f"  generate_with_cache:       {cached_tokens:,} token passes, {t_cached * 1000:.0f} ms")
    L.say(f"  the engine (paged cache):  same ids as both: {out.token_ids == ref == cached}")
    L.rounding_note(engine)
    if t_naive < 1.5 * t_cached:
        L.say(f"  (the times are close: in this {model.config.num_hidden_layers}-layer model each step's cost is "
              f"mostly lm_head's {model.config.vocab_size:,} logits, paid once per token either way; the "
              "saved work is in the layers, which dominate in a real model: try --model demo)", "dim")
    mc = engine.model_config
    per_token = mc.kv_bytes_per_token(engine.dtype)
    kv = engine.kv_cache
    L.say(f"This engine's cache: 2 x {mc.num_hidden_layers} x {mc.num_key_value_heads} x {mc.head_dim} x "
          f"{kv.element_size()} bytes = {per_token:,} bytes per token; the pool tensor {tuple(kv.shape)} "
          f"(layers, K/V, blocks, KV heads, block size, dims) = {fmt_bytes(kv.nbytes)}.")
    return dict(prompt_tokens=P, new_tokens=n, same=out.token_ids == ref == cached, naive_passes=naive_tokens,
                cached_passes=cached_tokens, bytes_per_token=per_token, pool_shape=tuple(kv.shape),
                pool_bytes=kv.nbytes, speedup=t_naive / t_cached if t_cached else 0.0)


def quiz_kv_cache(q: Qwen3) -> list[Question]:
    one_kind = q.kv_bf16 // 2
    no_gqa = q.kv_bf16 * q.group
    one_layer = q.kv_bf16 // q.layers
    return [
        Question("How many bytes of KV cache does one token take in Qwen3-0.6B, bf16?",
                 [f"{one_layer:,} B", f"{one_kind:,} B", f"{q.kv_bf16:,} B ({fmt_bytes(q.kv_bf16)})", f"{no_gqa:,} B"],
                 3, {1: f"That is one layer; there are {q.layers}.",
                     2: "That counts only K (or only V); both are cached.",
                     4: f"That would be {q.heads} KV heads (no grouped-query attention); Qwen3-0.6B has {q.kv_heads}."},
                 f"2 x {q.layers} x {q.kv_heads} x {q.head_dim} x 2 bytes."),
        Question("Why may the keys and values of token 5 be computed once and kept?",
                 ["K and V are the same for every token", "They are approximations, so staleness is fine",
                  "Causality: they depend only on tokens 0..5, which never change",
                  "Because the weights do not change at inference"],
                 3, {1: "Every token has its own K and V: they are projections of its own hidden state.",
                     2: "They are exact: the cached path gives the same tokens as no cache.",
                     4: "Necessary but not enough: without the causal mask, token 5's deeper-layer K/V would "
                        "change whenever a later token arrived."},
                 "In a causal model nothing after token 5 influences it."),
        Question("Generating T tokens after a P-token prompt WITHOUT a cache pushes how many token passes through the model?",
                 ["P + T", "P + (P+1) + ... + (P+T-1): quadratic", "T", "P"],
                 2, {1: "That is roughly the count with a cache (P + T - 1).",
                     3: "Each step reruns the whole sequence, not just the new token.",
                     4: "The prompt alone is only the first step."},
                 "Step t reruns all P + t tokens."),
    ]


# ============================================================================= 8. Decode


def text_decode(q: Qwen3) -> str:
    return f"""\
After the prefill, each step feeds every running request its last sampled token: one new position
per request, whose query attends over that request's cached keys. A decode step of one request
does a {q.hidden}-wide row of work per weight matrix but still reads all {fmt_bytes(q.weights_bf16)} of weights: it is
limited by memory bandwidth, not arithmetic.

That is why serving batches decodes: B running requests decode in ONE forward of B rows, the
weights are read once for B tokens. Continuous batching (05_scheduler.py) rebuilds the batch every
step: finished requests leave at once, new ones join (their prefill chunks packed in the same
step), so the batch stays full. The first new token comes from the prefill; T tokens take 1
prefill step and T-1 decode steps. The token fed at position p is the one sampled from position
p-1's logits."""


def diagram_decode(L: Lesson) -> str:
    return f"""\
 step   forward rows (request: position)            what is sampled
   1    prefill  A: 0..5    B: 0..8                  A's token 1, B's token 1
   2    decode   A: 6       B: 9                     A's token 2, B's token 2   <- one forward, 2 rows
   3    decode   A: 7       B: 10                    ...
        each row: embed 1 token -> {L.q.layers} layers (Qwen3-0.6B; attend over the cache) -> lm_head -> sample"""


def demo_decode(L: Lesson) -> dict:
    engine = L.engine
    prompts = ["Decode one token at a time", "Many requests share each decode step"]
    n = 5
    with L.watching(engine, EventLog()) as log:
        outs = run_requests(engine, prompts, greedy(n))
    prefill_steps = [d["step"] for d in log.of("prefill")]
    decodes = log.of("decode")
    done = {d["step"]: d for d in log.of("step_done")}
    rows = []
    for d in log.of("prefill"):
        rows.append((d["step"], "prefill", ", ".join(f"req {r}: {s}..{e - 1}" for r, s, e in d["chunks"])))
    for d in decodes:
        rows.append((d["step"], "decode", ", ".join(f"req {r}: {p}" for r, p in zip(d["request_ids"], d["positions"]))))
    L.say(f"Two requests, greedy, {n} tokens each, on the shared engine (its step counter keeps counting):")
    for step, kind, what in sorted(rows):
        L.say(f"  step {step:>3}  {kind:<8} {what:<34} {done[step]['seconds'] * 1000:6.1f} ms")
    dec_tokens = sum(len(d["request_ids"]) for d in decodes)
    dec_secs = sum(done[d["step"]]["seconds"] for d in decodes)
    L.say(f"{len(decodes)} decode steps of {len(prompts)} rows = {dec_tokens} tokens in {dec_secs * 1000:.1f} ms "
          f"({dec_tokens / dec_secs:,.0f} tok/s); prompts of {[len(o.prompt_token_ids) for o in outs]} tokens.")
    return dict(prompt_tokens=[len(o.prompt_token_ids) for o in outs], token_ids=[o.token_ids for o in outs],
                prefill_steps=prefill_steps, decode_steps=len(decodes),
                decode_rows=[(list(d["request_ids"]), list(d["positions"])) for d in decodes])


def quiz_decode(q: Qwen3) -> list[Question]:
    return [
        Question("A request generates 10 tokens. The prefill produced the first. How many decode steps follow?",
                 ["10", "11", "1", "9"],
                 4, {1: "The first token came out of the prefill step, not a decode step.",
                     2: "Nothing runs after the last token is sampled: it is never fed back.",
                     3: "Decode produces one token per request per step."},
                 "Tokens 2..10: one decode step each."),
        Question("Why does a server decode many requests in the same forward?",
                 ["Every step reads all the weights once; with B rows that read makes B tokens instead of 1",
                  "Requests decoded together share one KV cache", "It changes the tokens for the better",
                  "Batched decode skips attention"],
                 1, {2: "Each request reads only its own blocks (its block table); sharing is for identical prefixes only.",
                     3: "Batching never changes the tokens: the engine is checked token for token against one-at-a-time.",
                     4: "Every row attends over its own cache."},
                 "Decode is memory-bound: more rows per weight read is nearly free throughput."),
        Question("A request's prompt has 13 tokens (positions 0..12). At which position is its first decode token fed?",
                 ["12", "13", "14", "0"],
                 2, {1: "Position 12 is the last prompt token, computed in the prefill.",
                     3: "14 is the second decode step's position.",
                     4: "Positions count from the start of the sequence, prompt included."},
                 "The token sampled from position 12's logits sits at position 13."),
    ]


# ============================================================================= 9. Sampling


def text_sampling(q: Qwen3) -> str:
    return f"""\
The model gives one logit per vocabulary entry ({q.vocab:,} of them). Greedy (temperature 0) takes
the argmax. Sampling draws from softmax(logits) after up to four knobs, in transformers' order:
temperature T (divide the logits: T < 1 sharpens, T > 1 flattens), top-k (keep the k highest),
top-p (keep the smallest set of most likely tokens whose probabilities add up to at least p),
min-p (drop tokens below min_p x the top probability). Dropped tokens get -inf, the rest are
renormalised; every filter keeps the most likely token.

Each request carries its own SamplingConfig, so one Sampler call serves a batch with mixed
settings. A seeded request has its own torch.Generator: the same seed gives the same tokens,
whatever else is in the batch. The draw is an "exponential race", argmax(p_i / E_i) with
E_i ~ Exp(1), which picks token i with probability exactly p_i."""


def diagram_sampling(L: Lesson) -> str:
    S = mod("06_sampling")
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0]])
    row = lambda cfg: "  ".join(f"{n} {p:.3f}" for n, p in zip("ABCDE", S.Sampler().probs(logits, [cfg])[0].tolist()))  # noqa: E731
    return f"""\
 logits ─> / temperature ─> top-k ─> top-p ─> min-p ─> softmax ─> draw (seeded per request)
 (V,)      sharpen/flatten  k best   nucleus  relative   renormalised   or argmax if T = 0
 06_sampling.py's example, logits A..E = {logits[0].tolist()}:
   T 0.5                          {row(S.SamplingConfig(temperature=0.5))}
   + top-k 4, top-p 0.9, min-p 0.2 {row(S.SamplingConfig(temperature=0.5, top_k=4, top_p=0.9, min_p=0.2))}"""


def demo_sampling(L: Lesson) -> dict:
    S = mod("06_sampling")
    engine = L.engine
    prompt = "The weather today is"
    with L.watching(engine, EventLog()) as log:
        run_requests(engine, [prompt], greedy(1))
    event = log.of("sampled")[0]
    ids = engine.tokenizer.encode(prompt)
    with torch.inference_mode():                                   # the same logits, straight from the model
        hidden = engine.model(torch.tensor(ids, device=engine.device), torch.arange(len(ids), device=engine.device))
        logits = engine.model.compute_logits(hidden[-1:]).float()
    sampler = S.Sampler()
    configs = [("model softmax", S.SamplingConfig()), ("T 0.7", S.SamplingConfig(temperature=0.7)),
               ("T 0.7 top-k 3", S.SamplingConfig(temperature=0.7, top_k=3)),
               ("+ top-p 0.8", S.SamplingConfig(temperature=0.7, top_k=3, top_p=0.8))]
    top_ids = [i for i, _ in event["top"]]
    L.say(f"The live model's next-token distribution after {prompt!r} (the `sampled` event's top 5), "
          "then reshaped by the knobs (06_sampling.Sampler.probs):")
    L.say("  " + pad("token", 16) + "".join(f"{name:>15}" for name, _ in configs))
    table = {}
    for name, cfg in configs:
        table[name] = sampler.probs(logits, [cfg])[0, top_ids].tolist()
    for k, tid in enumerate(top_ids):
        L.say("  " + pad(L.piece(tid)[:15], 16) + "".join(f"{table[name][k]:>15.3f}" for name, _ in configs))
    recomputed = logits.softmax(-1)[0, top_ids].tolist()
    match = max(abs(a - b) for a, b in zip(recomputed, [p for _, p in event["top"]]))
    L.say(f"Event probabilities vs softmax of logits recomputed without the engine: max diff {match:.1e}")
    L.rounding_note(engine)
    seeded = mod("engine").SamplingConfig(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    a = run_requests(engine, [prompt], seeded)[0].token_ids
    b = run_requests(engine, [prompt, "something else in the batch"], [seeded, seeded])[0].token_ids
    L.say(f"Temperature 1, seed 7, alone: {a}; with another request in the batch: {b}; same: {a == b}")
    return dict(prompt_ids=ids, event_top=[(i, p) for i, p in event["top"]], recomputed=recomputed,
                max_diff=match, reshaped=table, seeded=a, seeded_batched=b, greedy_token=event["token_id"])


def quiz_sampling(q: Qwen3) -> list[Question]:
    return [
        Question("What does temperature 0 mean in this engine?",
                 ["Uniform random choice", "The model's distribution unchanged",
                  "Greedy: always the most likely token", "An error: temperature must be positive"],
                 3, {1: "A very high temperature approaches uniform; 0 is the opposite.",
                     2: "That is temperature 1.",
                     4: "0 is accepted and means greedy (SamplingConfig.validate allows T >= 0)."},
                 "T -> 0 sharpens the distribution onto its argmax; the engine takes the argmax directly."),
        Question("In which order are the knobs applied?",
                 ["top-p, top-k, temperature, min-p", "temperature, top-k, top-p, min-p",
                  "min-p, top-p, top-k, temperature", "All at once; the order does not matter"],
                 2, {1: "Temperature comes first so that every filter sees the distribution that will be sampled.",
                     3: "min-p is last: it measures what the earlier filters left.",
                     4: "Order matters: top-p after a cold temperature keeps fewer tokens than before it."},
                 "transformers' order: the same settings mean the same distribution there and here."),
        Question("What does top_p = 0.9 keep?",
                 ["Tokens whose probability is at least 0.9", "The 90% most likely vocabulary entries",
                  "Tokens whose logit is at least 0.9",
                  "The smallest set of most likely tokens whose probabilities add up to at least 0.9"],
                 4, {1: "Usually no token has 0.9 on its own; top-p sums probabilities.",
                     2: "It counts probability mass, not a fraction of the vocabulary.",
                     3: "Logits are unnormalised scores; top-p works on probabilities."},
                 "The nucleus: 2 tokens when the model is sure, hundreds when it is not."),
    ]


# ============================================================================= 10. PagedAttention


def text_paged(q: Qwen3) -> str:
    b = q.block_size
    per_block = q.kv_bf16 * b
    return f"""\
A server holds many sequences whose final length nobody knows. One contiguous cache per sequence,
sized for the worst case, wastes most of it; sized exactly, it cannot grow. vLLM's answer is
paging: one pool of fixed-size blocks ({b} token slots by default), and each sequence owns a list of
block ids, its block table. Position p lives in block table[p // {b}] at offset p % {b}, so its flat
slot is table[p // {b}] * {b} + p % {b}. A sequence wastes at most {b - 1} slots, and any free block serves
anyone. For Qwen3-0.6B in bf16 a block holds {fmt_bytes(per_block)} of K/V.

Prefix caching: a full block is named by a hash of (its parent block's hash, its {b} token ids), so
equal prefixes have equal hashes. A new request looks its full blocks up before computing anything;
a hit is shared by reference count and its tokens are skipped. When the last user finishes, a
cached block keeps its contents and becomes evictable: reused for new data only when the free list
is empty, least recently used first. Attention then reads K/V through the block table
(04_paged_attention.py gathers a sequence's blocks and runs one attention per sequence; under CUDA
graphs, whose shapes are fixed, it gathers whole padded tables and masks the slots past the end).
After the ladder, nano_kernels/csrc/paged_decode.cpp is what decode runs on a CPU: one small C++ kernel
that follows each table and reads the blocks where they lie."""


def diagram_paged(L: Lesson) -> str:
    return """\
 block tables (block size 4)             the pool: one tensor of blocks
   A: [ 7 | 2 ]                          block  0   1   2   3   4   5   6   7   8
   B: [ 7 | 5 ]  <- shares block 7        ─────  ·   ·   A   ·   ·   B   ·  A,B  ·
 A's position 5: block A[5 // 4] = 2, offset 5 % 4 = 1  ->  slot 2 * 4 + 1 = 9
 states: used (ref > 0) | evictable (ref 0, hashed, kept for hits) | free"""


def demo_paged(L: Lesson) -> dict:
    engine = L.new_engine(num_kv_blocks=48)
    bs = engine.config.block_size
    system = ("You are a careful assistant for a small public library. Answer briefly and politely, always "
              "cite the shelf number of the book, say when a book is on loan, and never invent a book that "
              "is not in the catalogue. ")
    prompts = [system + "Where are the atlases?", system + "Do you lend audio books?"]
    tables, admitted = {}, {}
    with L.watching(engine, EventLog()) as log:
        outs = [run_requests(engine, [p], greedy(3))[0] for p in prompts]   # one after the other
    for d in log.of("blocks_allocated"):
        tables[d["request_id"]] = list(d["block_table"])
    for d in log.of("admitted"):
        admitted[d["request_id"]] = d
    a, b = outs
    ids_a, ids_b = a.prompt_token_ids, b.prompt_token_ids
    common = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
    hit = admitted[b.request_id]
    L.say(f"Block size {bs}. Two prompts share a system prompt: their first {common} token ids are equal.")
    L.say(f"  request {a.request_id}: {len(ids_a)} prompt tokens, block table {tables[a.request_id]} "
          f"(admitted with {admitted[a.request_id]['cached_tokens']} cached tokens)")
    L.say(f"  request {b.request_id}: {len(ids_b)} prompt tokens, block table {tables[b.request_id]}: "
          f"{hit['cached_tokens']} tokens from the prefix cache = blocks {hit['hit_blocks']} "
          f"(only full blocks of the shared prefix: {common} // {bs} = {common // bs})")
    p = len(ids_b) - 1
    table = tables[b.request_id]
    slot = table[p // bs] * bs + p % bs
    L.say(f"  slot of request {b.request_id}'s last prompt position {p}: table[{p} // {bs}] * {bs} + {p} % {bs} "
          f"= {table[p // bs]} * {bs} + {p % bs} = {slot}")
    bm = engine.block_manager
    L.say(f"After both finished: {bm.num_used_blocks} used, {bm.num_evictable_blocks} evictable (cached, kept for "
          f"the next hit), {bm.num_free_blocks - bm.num_evictable_blocks} free, of {bm.num_blocks}; "
          f"prefix-cache hits {bm.prefix_hit_tokens} tokens.")
    return dict(block_size=bs, ids=[list(ids_a), list(ids_b)], common=common, tables=tables,
                cached_tokens=hit["cached_tokens"], hit_blocks=list(hit["hit_blocks"]), slot=slot, position=p,
                evictable=bm.num_evictable_blocks, used=bm.num_used_blocks, hit_tokens=bm.prefix_hit_tokens)


def quiz_paged(q: Qwen3) -> list[Question]:
    return [
        Question("Block size 4, block table [7, 2]: which flat slot holds position 5?",
                 ["29", "9", "5", "21"],
                 2, {1: "29 = 7 * 4 + 1 uses the first block; position 5 is in the second (5 // 4 = 1).",
                     3: "Positions are not slots: the block table maps them.",
                     4: "21 = 5 * 4 + 1 uses the position as a block id."},
                 "table[5 // 4] * 4 + 5 % 4 = 2 * 4 + 1 = 9."),
        Question("With 16-token blocks, at most how many slots does one sequence waste?",
                 ["0", "16", "15", "8"],
                 3, {1: "Only if its length were a multiple of 16; the last block is usually partly filled.",
                     2: "A block is only taken when a token needs it, so a whole block is never empty.",
                     4: "8 is the average-ish case, not the worst."},
                 "The tail of the last block: at most block_size - 1."),
        Question("A cached block whose last user has finished becomes...",
                 ["Evictable: contents and hash kept, reused for new data only when the free list is empty",
                  "Zeroed and put on the free list at once", "Kept forever", "Given back to the operating system"],
                 1, {2: "Its K/V are kept so the next request with the same prefix hits it.",
                     3: "It is evicted (least recently used first) when blocks run out.",
                     4: "The pool is allocated once at startup and never shrinks."},
                 "That is how a system prompt stays cached between requests."),
    ]


# ============================================================================= 11. Speculative Decoding


def text_speculative(q: Qwen3) -> str:
    return """\
Decode is bound by reading the weights, so checking several tokens costs about as much as
producing one. Speculative decoding exploits that: a cheap draft proposes k tokens, the target
model scores all of them in ONE forward (a little prefill of k+1 positions), and a rule keeps the
longest acceptable prefix plus one token of the target's own. Every step yields at least 1 token
and at most k+1.

The rule keeps the output distribution exactly the target's. Draft token x, drawn from the
draft's q(x), is accepted with probability min(1, p(x) / q(x)), where p is the target's
distribution at that position. At the first rejection, the replacement is drawn from the residual
max(0, p - q), renormalised, and the rest of the draft is thrown away. If all k are accepted,
a bonus token comes from the target's distribution at position k+1. Greedy (p and q one-hot) means:
accept while the draft equals the target's argmax. Rejected tokens' cache slots are given back
(BlockManager.truncate) and only verified tokens are ever hashed for the prefix cache."""


def diagram_speculative(L: Lesson) -> str:
    return """\
 draft proposes k = 4:       d1    d2    d3    d4
 target, one forward:   p0   p1    p2    p3    p4        (distributions at each position)
 accept d1? min(1, p0(d1)/q0(d1))  yes
 accept d2? min(1, p1(d2)/q1(d2))  yes
 accept d3? min(1, p2(d3)/q2(d3))  NO  -> draw from norm(max(0, p2 - q2)), drop d4
 this step emits: d1 d2 x3   (3 tokens for one target forward)"""


def spec_module():
    try:
        return mod("07_speculative")
    except ImportError:
        return None


def toy_accept_reject(p: torch.Tensor, qd: torch.Tensor, draws: int, seed: int = 0):
    """The rule written out, for a checkout without 07_speculative.py: one guess x ~ q, accepted with
    min(1, p(x)/q(x)), else a draw from norm(max(0, p - q)). Returns (acceptance rate, frequencies)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.multinomial(qd, draws, replacement=True, generator=g)
    accept = torch.rand(draws, generator=g) < (p[x] / qd[x]).clamp(max=1)
    residual = (p - qd).clamp(min=0)
    fallback = torch.multinomial(residual / residual.sum(), draws, replacement=True, generator=g)
    out = torch.where(accept, x, fallback)
    return accept.float().mean().item(), torch.bincount(out, minlength=len(p)).float() / draws


def toy_rejection_sample(Sp, p: torch.Tensor, qd: torch.Tensor, draws: int, seed: int = 0):
    """07's rejection_sample on `draws` rows of one guess each (the guess really drawn from q)."""
    S = mod("06_sampling")
    gen = S.make_generator(seed)
    V = len(p)
    guesses = Sp.sample_from_probs(qd.expand(draws, V), [False] * draws, [gen] * draws)[:, None]
    out, accepted = Sp.rejection_sample(guesses, torch.ones(draws, dtype=torch.int64), qd.expand(draws, 1, V),
                                        p.expand(draws, 2, V), [False] * draws, [gen] * draws)
    return accepted.float().mean().item(), torch.bincount(out[:, 0], minlength=V).float() / draws


def demo_speculative(L: Lesson) -> dict:
    Sp = spec_module()
    p = torch.tensor([0.50, 0.30, 0.15, 0.05])
    qd = torch.tensor([0.30, 0.50, 0.10, 0.10])
    draws = 8_000                       # 07 draws per row from a generator: enough for two decimals
    if Sp is not None:
        rate, freq = toy_rejection_sample(Sp, p, qd, draws)
        how = "07_speculative.rejection_sample"
    else:
        rate, freq = toy_accept_reject(p, qd, draws)
        how = "the rule written out here (07_speculative.py is not in this checkout)"
    expected = torch.minimum(p, qd).sum().item()
    fmt = lambda t: "[" + ", ".join(f"{v:.2f}" for v in t.tolist()) + "]"  # noqa: E731
    L.say(f"Toy distributions over 4 tokens A-D: target p = {fmt(p)}, draft q = {fmt(qd)}; "
          f"{draws:,} single guesses through {how}:")
    L.say(f"  accepted {rate:.3f} of the guesses (theory: sum of min(p, q) = {expected:.3f}); the emitted tokens "
          f"came out with frequencies {fmt(freq)}: the target's p, not the draft's q")
    facts = dict(toy_p=p.tolist(), toy_q=qd.tolist(), toy_rate=rate, toy_expected=expected, toy_freq=freq.tolist(),
                 engine=None)
    if Sp is not None:
        facts["engine"] = spec_live(L, Sp)
    return facts


def spec_live(L: Lesson, Sp) -> dict:
    """Speculative greedy decoding on the live model: the early-exit draft (the target's first layers)
    proposes k = 4, the target verifies. The engine's own speculative mode when it reports spec_*
    stats, else 07's `generate` loop around the same SpeculativeDecoder."""
    engine = L.engine
    target = engine.model
    k, n = 4, 10
    prompts = [engine.tokenizer.encode(t) for t in ("Speculative decoding guesses ahead", "The draft proposes")]
    plain = [o.token_ids for o in run_requests(engine, prompts, greedy(n))]
    stats, where = None, ""
    try:
        spec_engine = L.new_engine(speculative=True, num_speculative_tokens=k)
        ids = [o.token_ids for o in run_requests(spec_engine, prompts, greedy(n))]
        summary = spec_engine.stats_summary()
        if "spec_draft_tokens" in summary:
            stats = {key: summary[key] for key in ("spec_num_drafts", "spec_draft_tokens", "spec_accepted_tokens",
                                                   "spec_acceptance_rate", "spec_mean_acceptance_length",
                                                   "spec_acceptance_per_position") if key in summary}
            layers = spec_engine.draft_model.config.num_hidden_layers
            where = "the engine (EngineConfig(speculative=True))"
    except (TypeError, ValueError, AttributeError):
        stats = None
    if stats is None:
        layers = Sp.default_draft_layers(target.config.num_hidden_layers)
        ids, decoder = Sp.generate(target, Sp.early_exit_draft(target, layers), prompts, [greedy(n)] * len(prompts), k)
        stats = decoder.stats.summary()
        where = "07_speculative.generate"
    L.say(f"Live, greedy, {len(prompts)} prompts x {n} tokens, k = {k}, through {where}: the draft is the target's "
          f"first {layers} of {target.config.num_hidden_layers} layers (an early-exit draft: random weights, so it "
          "agrees only sometimes)")
    L.say(f"  {stats['spec_num_drafts']} drafts, {stats['spec_draft_tokens']} guesses, {stats['spec_accepted_tokens']} "
          f"accepted: acceptance rate {stats['spec_acceptance_rate']:.2f}, mean {stats['spec_mean_acceptance_length']:.2f} "
          f"tokens per target forward; per position {stats['spec_acceptance_per_position']}")
    L.say(f"  the ids equal plain greedy decoding's: {ids == plain}")
    L.rounding_note(engine)
    return dict(prompts=prompts, ids=ids, plain=plain, same=ids == plain, stats=stats, k=k, draft_layers=layers,
                where=where)


def quiz_speculative(q: Qwen3) -> list[Question]:
    return [
        Question("The draft proposes token x with probability q(x); the target gives it p(x). When is x accepted?",
                 ["Always, if p(x) > 0", "With probability min(1, p(x) / q(x))",
                  "Only if x is the target's argmax", "With probability q(x)"],
                 2, {1: "Then the output would follow the draft's distribution, not the target's.",
                     3: "That is the greedy special case (p one-hot), not the general rule.",
                     4: "The draft's own probability alone says nothing about what the target wants."},
                 "This rule plus the residual draw makes the output exactly the target's distribution."),
        Question("The draft proposes k = 4 tokens. How many tokens can one speculative step emit?",
                 ["Exactly 4", "0 to 4", "1 to 5", "Exactly 5"],
                 3, {1: "Rejections cut it short; full acceptance adds a bonus token.",
                     2: "Never 0: a rejection is replaced by a token drawn from the residual.",
                     4: "Only when all 4 are accepted (plus the bonus)."},
                 "At least the replacement (or bonus) token, at most k accepted + 1 bonus."),
        Question("Why is verifying k draft tokens nearly as cheap as decoding one?",
                 ["The target skips attention for draft tokens", "The draft model is the same size",
                  "Draft tokens are never written to the KV cache",
                  "Decode is bound by reading the weights; k+1 positions share one read"],
                 4, {1: "Every verified position attends over the cache like any other.",
                     2: "The draft is meant to be much cheaper than the target.",
                     3: "They are written (then truncated away if rejected); they are never hashed for the prefix cache."},
                 "Like prefill: more rows per weight read."),
    ]


# ============================================================================= 12. Putting It All Together


def text_together(q: Qwen3) -> str:
    return """\
engine.py assembles the files: LLMEngine.step() asks the Scheduler (05) for this step's tokens
under the budget, the ModelRunner packs them (prefill chunks and decode rows back to back) and runs
Qwen3 (02) over the paged cache (04), the Sampler (06) draws one token per sequence that reached
its end, and stop rules finish requests, whose blocks go back to the pool (cached ones stay
evictable). When the pool runs dry, the newest running request is preempted: its blocks are freed,
it goes to the front of the waiting queue with every token it has, and later recomputes its cache,
often partly from the prefix cache.

None of this changes a single token: continuous batching, chunked prefill, prefix caching and
preemption are all checked against naive_generate (no cache, batch of one). Watch it live:
  $ python run.py --model demo --dashboard --prompt Hi --prompt "Why is the sky blue?"
  $ python run.py --model tiny --narrate --xray --max-tokens 8"""


def diagram_together(L: Lesson) -> str:
    return """\
 add_request ──> waiting ──admit (prefix lookup, blocks)──> running ──finish──> blocks freed
                    ▲                                          │                (hashed ones evictable)
                    └──── preempted (blocks freed, recompute) ─┘
 every step:  schedule (budget) -> pack -> model forward over the paged cache -> sample -> stop rules"""


def demo_together(L: Lesson) -> dict:
    M = mod("02_model")
    engine = L.new_engine(block_size=4, num_kv_blocks=16, max_model_len=64, max_num_batched_tokens=16,
                          max_num_seqs=4)
    shared = "Four requests share this long opening sentence, then"
    prompts = [shared + " ask about rain.", "A short one.", "Another short prompt here.", shared + " ask about snow."]
    ids = [engine.tokenizer.encode(p) for p in prompts]
    n = 12
    with L.watching(engine, EventLog()) as log:
        outs = run_requests(engine, ids, greedy(n))
    ref = [M.naive_generate(engine.model, p, n) for p in ids]
    same = [o.token_ids == r for o, r in zip(outs, ref)]
    st = engine.stats_summary()
    chunked = sum(1 for d in log.of("prefill") for _, s, e in d["chunks"] if s > 0 and e - s > 1)
    L.say(f"{len(prompts)} requests ({[len(i) for i in ids]} prompt tokens, {n} new each) through a tight engine: "
          f"pool of {engine.num_kv_blocks} blocks x {engine.config.block_size} tokens, budget "
          f"{engine.config.max_num_batched_tokens} tokens per step.")
    L.say(f"  {st['steps']} steps; {len(log.of('preempted'))} preemption(s); {chunked} later prefill chunks "
          f"(chunked prefill, or recompute after preemption); prefix-cache hits {st['prefix_cache_hit_tokens']} tokens; "
          f"peak {st['kv_blocks_peak']} of {st['kv_blocks_total']} blocks")
    L.say(f"  every request's tokens equal naive_generate's (no cache, one at a time): {all(same)}")
    L.rounding_note(engine)
    return dict(prompt_ids=ids, token_ids=[o.token_ids for o in outs], same=same, stats=st,
                preempted_events=len(log.of("preempted")), chunked=chunked)


def quiz_together(q: Qwen3) -> list[Question]:
    return [
        Question("What happens to a preempted request?",
                 ["It is cancelled with an error", "It keeps its blocks but pauses",
                  "Its blocks are freed; it waits at the front of the queue and later recomputes its cache, "
                  "keeping every token", "Its generated tokens are thrown away and it starts over"],
                 3, {1: "Every admitted request finishes; preemption only costs compute.",
                     2: "Pausing with its blocks would not free anything: the point is to free blocks.",
                     4: "Its tokens (prompt and output so far) are kept and recomputed, so it continues exactly."},
                 "Preemption by recompute (05_scheduler.py)."),
        Question("With greedy decoding, which of these can change the tokens a request gets?",
                 ["Turning prefix caching off", "A different checkpoint (other weights)",
                  "A smaller token budget (more chunking)", "How many other requests share its steps"],
                 2, {1: "Prefix caching reuses exactly the K/V it would compute: same tokens.",
                     3: "Chunked prefill computes the same K/V in pieces: same tokens.",
                     4: "Batching never changes a request's tokens: checked against one-at-a-time."},
                 "The weights decide the tokens; the serving machinery only decides how fast."),
        Question("In what order does a request go through the engine?",
                 ["prefill -> tokenize -> decode -> sample", "tokenize -> decode -> prefill -> sample",
                  "tokenize -> admit -> prefill -> sample -> decode steps -> detokenize",
                  "admit -> tokenize -> sample -> prefill"],
                 3, {1: "Tokenizing comes first: the model needs ids.",
                     2: "Decode needs the prompt's K/V in the cache: prefill comes first.",
                     4: "A request is tokenized before it is admitted (admission needs its ids for the prefix lookup)."},
                 "And each decode step samples one more token."),
    ]


# ============================================================================= the course


CHAPTERS: list[Chapter] = [
    Chapter("Welcome", text_welcome, diagram_welcome, [("engine.py", "LLMEngine.step"), ("run.py", "main")],
            demo_welcome, quiz_welcome),
    Chapter("Model Architecture", text_architecture, diagram_architecture,
            [("02_model.py", "Qwen3DecoderLayer, Qwen3Attention, Qwen3MLP"), ("02_model.py", "count_parameters")],
            demo_architecture, quiz_architecture),
    Chapter("Tokenization", text_tokenization, diagram_tokenization,
            [("01_tokenize.py", "Tokenizer.encode, bpe, apply_chat_template")], demo_tokenization, quiz_tokenization),
    Chapter("Embedding Lookup", text_embedding, diagram_embedding,
            [("02_model.py", "Qwen3ForCausalLM.forward, compute_logits")], demo_embedding, quiz_embedding),
    Chapter("Self-Attention", text_attention, diagram_attention,
            [("02_model.py", "Qwen3Attention.forward, Qwen3Attention.norm_and_rotate, apply_rope, causal_attention")], demo_attention, quiz_attention),
    Chapter("Prefill", text_prefill, diagram_prefill,
            [("02_model.py", "causal_attention"),
             ("04_paged_attention.py", "PagedContext.attend, paged_prefill_attention"),
             ("05_scheduler.py", "Scheduler.schedule"), ("engine.py", "ModelRunner.prepare"),
             ("nano_kernels/csrc/paged_prefill.cpp", "causal_attention")], demo_prefill, quiz_prefill),
    Chapter("KV Cache", text_kv_cache, diagram_kv_cache,
            [("03_kv_cache.py", "KVCache.attend, greedy_steps")], demo_kv_cache, quiz_kv_cache),
    Chapter("Decode", text_decode, diagram_decode,
            [("05_scheduler.py", "Scheduler.schedule"), ("engine.py", "LLMEngine.step")], demo_decode, quiz_decode),
    Chapter("Sampling", text_sampling, diagram_sampling,
            [("06_sampling.py", "Sampler.process, Sampler.__call__")], demo_sampling, quiz_sampling),
    Chapter("PagedAttention", text_paged, diagram_paged,
            [("04_paged_attention.py", "BlockManager.allocate, slot_mapping, paged_decode_attention"),
             ("nano_kernels/csrc/paged_decode.cpp", "paged_decode")], demo_paged, quiz_paged),
    Chapter("Speculative Decoding", text_speculative, diagram_speculative,
            [("07_speculative.py", "the accept/reject rule"), ("04_paged_attention.py", "BlockManager.truncate")],
            demo_speculative, quiz_speculative),
    Chapter("Putting It All Together", text_together, diagram_together,
            [("engine.py", "LLMEngine"), ("modes/dashboard.py", "Dashboard")], demo_together, quiz_together),
]
for _i, _ch in enumerate(CHAPTERS, 1):
    _ch.number = _i


# ----------------------------------------------------------------------------- progress file


def default_progress_path() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "nano-vllm-py", "tutorial.json")


@dataclass
class Progress:
    current: int = 1
    done: list[int] = field(default_factory=list)
    scores: dict[int, dict] = field(default_factory=dict)      # chapter -> {"correct": c, "total": t}
    finished: bool = False

    def to_json(self) -> dict:
        return {"format": PROGRESS_FORMAT, "version": PROGRESS_VERSION, "current": self.current,
                "done": sorted(set(self.done)), "scores": {str(k): v for k, v in sorted(self.scores.items())},
                "finished": self.finished}

    @classmethod
    def from_json(cls, doc) -> "Progress":
        """Raises ValueError for anything that is not a progress file this version wrote."""
        n = len(CHAPTERS)
        if not isinstance(doc, dict) or doc.get("version") != PROGRESS_VERSION:
            raise ValueError("not a tutorial progress file")
        current, done, scores = doc.get("current"), doc.get("done", []), doc.get("scores", {})
        if not isinstance(current, int) or not 1 <= current <= n:
            raise ValueError(f"bad current chapter {current!r}")
        if not isinstance(done, list) or not all(isinstance(c, int) and 1 <= c <= n for c in done):
            raise ValueError("bad list of chapters done")
        if not isinstance(scores, dict):
            raise ValueError("bad scores")
        parsed = {}
        for k, v in scores.items():
            if not (isinstance(k, str) and k.isdigit() and 1 <= int(k) <= n and isinstance(v, dict)
                    and isinstance(v.get("correct"), int) and isinstance(v.get("total"), int)
                    and 0 <= v["correct"] <= v["total"]):
                raise ValueError(f"bad score for chapter {k!r}")
            parsed[int(k)] = {"correct": v["correct"], "total": v["total"]}
        return cls(current, sorted(set(done)), parsed, bool(doc.get("finished", False)))


class ProgressFileError(ValueError):
    """The progress file's path holds something the tutorial did not write: it is refused, untouched.
    A ValueError, like run.py's other bad input: one `error:` line, exit 2."""


class NotOurs(Exception):
    """Internal: why the thing at the progress path is not a progress file the tutorial wrote."""


NOT_OURS = "is not a progress file written by the tutorial"
LEGACY_KEYS = {"version", "current", "done", "scores", "finished"}     # files written before the marker


def file_identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def examine_progress_file(path: str) -> tuple[dict | None, os.stat_result | None]:
    """(its JSON document, its stat) when `path` holds a progress file the tutorial wrote; (None, None)
    when nothing is there. Raises NotOurs for anything else, without writing, and without opening what
    is not a regular file (opening a FIFO would block, a device could be anything). Ours: JSON with
    "format": PROGRESS_FORMAT (any version, any content), or a version-1 file from before the marker
    that is exactly valid progress."""
    try:
        st = os.stat(path)                                  # a symlink is followed: its target is the file
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except OSError as e:
        raise NotOurs(f"cannot be checked ({e.strerror or e})") from None
    if not stat_mod.S_ISREG(st.st_mode):
        raise NotOurs("is not a regular file")
    if st.st_size > PROGRESS_MAX_BYTES:
        raise NotOurs(f"{NOT_OURS} (it is {st.st_size:,} bytes)")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())                       # what was opened, not what was stat'ed before
            if not stat_mod.S_ISREG(st.st_mode):
                raise NotOurs("is not a regular file")
            data = f.read(PROGRESS_MAX_BYTES + 1)
    except OSError as e:
        raise NotOurs(f"cannot be read ({e.strerror or e})") from None
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise NotOurs(f"{NOT_OURS} (not JSON)") from None
    if isinstance(doc, dict) and doc.get("format") == PROGRESS_FORMAT:
        return doc, st
    if isinstance(doc, dict) and "current" in doc and set(doc) <= LEGACY_KEYS:
        try:
            Progress.from_json(doc)
            return doc, st
        except ValueError:
            pass
    raise NotOurs(f'{NOT_OURS} (no "format": "{PROGRESS_FORMAT}" in it)')


class ProgressStore:
    """Loads and saves Progress. The file is only ever replaced when it is one the tutorial wrote:
    anything else at the path is refused (ProgressFileError) and left untouched. A file that cannot be
    saved (a folder that cannot be written) gives one warning and the course goes on without saving."""

    def __init__(self, path: str | None):
        self.explicit = bool(path)
        self.path = path or default_progress_path()
        self.can_write = True
        self.seen: tuple | None = None        # file_identity of the file as last read or written (ours)

    def warn(self, msg: str) -> None:
        print(f"warning: {msg}", file=sys.stderr, flush=True)

    def name(self) -> str:
        return f"--progress-file {self.path}" if self.explicit else f"tutorial progress file {self.path}"

    def load(self) -> tuple[Progress, bool]:
        """(progress, whether it came from the file). Raises ProgressFileError when the path holds
        something the tutorial did not write; a file of ours that makes no sense gives one warning and
        a fresh start (it is replaced), one written by another version is kept and nothing is saved."""
        try:
            doc, st = examine_progress_file(self.path)
        except NotOurs as e:
            hint = "name another file" if self.explicit else "move it away or pass --progress-file FILE"
            raise ProgressFileError(f"{self.name()} {e}; it is left untouched ({hint})") from None
        if doc is None:
            return Progress(), False
        self.seen = file_identity(st)
        version = doc.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version != PROGRESS_VERSION:
            self.can_write = False
            self.warn(f"{self.name()} was written by another version of the tutorial (version "
                      f"{doc.get('version')!r}); it is left as it is and progress will not be saved")
            return Progress(), False
        try:
            return Progress.from_json(doc), True
        except ValueError as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            self.warn(f"cannot use tutorial progress file {self.path} ({reason}); starting fresh")
            return Progress(), False

    def save(self, progress: Progress) -> None:
        """Atomically: write a temporary file in the same folder, then rename it over the file. The
        file's permission bits (and owner, where allowed) are kept; a new file gets 0o644 less the
        umask. A file that something else put there since it was last read or written is checked again
        and, if it is not ours, left alone (one warning, no more saving)."""
        if not self.can_write:
            return
        try:
            target = os.path.realpath(self.path)         # a symlink stays: the file it points to is replaced
            folder = os.path.dirname(target)
            os.makedirs(folder, exist_ok=True)
            try:
                st = os.stat(target)
            except FileNotFoundError:
                st = None
            if st is not None and file_identity(st) != self.seen:
                try:
                    _, st = examine_progress_file(target)
                except NotOurs as e:
                    self.can_write = False
                    self.warn(f"{self.name()} was changed by something else and {e}; it is left untouched and "
                              "progress will not be saved")
                    return
            fd, tmp = self._temp_file(folder)
            try:
                if st is not None:
                    os.fchmod(fd, stat_mod.S_IMODE(st.st_mode))
                    if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                        try:
                            os.fchown(fd, st.st_uid, st.st_gid)
                        except OSError:
                            pass
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(progress.to_json(), f, indent=2)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
                self.seen = file_identity(os.stat(target))
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        except OSError as e:
            self.can_write = False
            self.warn(f"cannot save tutorial progress to {self.path} ({e.strerror or e}); progress will not be kept")

    @staticmethod
    def _temp_file(folder: str) -> tuple[int, str]:
        """A new file in `folder`, created with mode 0o644 (the umask applies): (fd, path)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        for _ in range(100):
            tmp = os.path.join(folder, f".tutorial-{os.getpid()}-{os.urandom(4).hex()}.tmp")
            try:
                return os.open(tmp, flags, 0o644), tmp
            except FileExistsError:
                continue
        raise FileExistsError(f"no free temporary file name in {folder}")

    def saved_note(self) -> str:
        """The end-of-run line's first words: where progress went, or that it was not kept."""
        return f"Progress saved to {self.path}" if self.can_write else "Progress was not saved (see the warning above)"


# ----------------------------------------------------------------------------- running the course


def reflow(text: str, width: int) -> list[str]:
    """Paragraphs re-wrapped to the terminal. A line indented by 2 starts an item of its own (a list
    entry, a command); a line indented by 4 continues the item above."""
    items: list[tuple[str, str]] = []                   # (indent, text); ("", "") = a blank line
    for line in text.splitlines():
        if not line.strip():
            items.append(("", ""))
        elif line.startswith("  $ "):                      # a command: never wrapped
            items.append(("verbatim", line))
        elif line.startswith("    ") and items and items[-1][1]:
            items[-1] = (items[-1][0], items[-1][1] + " " + line.strip())
        elif line.startswith("  "):
            items.append(("  ", line.strip()))
        elif items and items[-1][1] and items[-1][0] == "":
            items[-1] = ("", items[-1][1] + " " + line.strip())
        else:
            items.append(("", line.strip()))
    out = []
    for indent, body in items:
        if not body:
            out.append("")
            continue
        if indent == "verbatim":
            out.append(body)
            continue
        hang = indent + ("  " if body.startswith("- ") else "")
        out += textwrap.wrap(body, width, initial_indent=indent, subsequent_indent=hang,
                             break_long_words=False, break_on_hyphens=False)
    return out


class Quit(Exception):
    pass


class Navigate(Exception):
    def __init__(self, target: int):
        self.target = target


def read_line() -> str | None:
    """One line of stdin; None at its end. No stdin at all (`<&-` makes sys.stdin None), a closed one
    or one that fails to read (EIO once the terminal is gone) count as the end; a line that is not
    UTF-8 comes back as text that answers nothing (it is asked again)."""
    stdin = sys.stdin
    if stdin is None or getattr(stdin, "closed", False):
        return None
    try:
        line = stdin.readline()
    except UnicodeDecodeError:
        return "?\n"
    except (OSError, ValueError):                       # ValueError: I/O operation on closed file
        return None
    return line or None


def stdin_is_a_terminal() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (OSError, ValueError):
        return False


def read_answer(console: Console, prompt: str, allow_numbers: bool, chapter: int) -> str:
    """One line from stdin: '1'..'4' (when allowed), 'n', 'b', 'q' or '' (Enter). End of input is 'q'.
    Navigation raises Navigate / Quit; anything else is asked again."""
    while True:
        console.print(Text(prompt, style="bold"), end="")
        console.file.flush()
        line = read_line()
        if line is None:                                    # end of input (or no input at all)
            console.print()
            raise Quit()
        answer = line.strip().lower()
        if not stdin_is_a_terminal():                       # scripted: show what was read
            console.print(Text(answer))
        if answer in ("q", "quit", "exit"):
            raise Quit()
        if answer in ("n", "next"):
            raise Navigate(chapter + 1)
        if answer in ("b", "back"):
            raise Navigate(max(1, chapter - 1))
        if allow_numbers and answer in ("1", "2", "3", "4"):
            return answer
        if not allow_numbers and answer == "":
            return answer
        console.print(Text(f"  please type {'1-4, ' if allow_numbers else 'Enter, '}n, b or q", style="yellow"))


def reading_list(read: list[tuple[str, str]]) -> str:
    """'Read next: 02_model.py (causal_attention); ...': the ladder's files, then nano_kernels/ (the C++
    the engine runs on a CPU) marked as reading for after the ladder."""
    ladder = "; ".join(f"{file} ({what})" for file, what in read if not file.startswith("nano_kernels/"))
    after = "; ".join(f"{file} ({what})" for file, what in read if file.startswith("nano_kernels/"))
    return "Read next: " + ladder + (f"; after the ladder: {after}" if after else "")


def show_chapter(L: Lesson, ch: Chapter) -> None:
    c = L.console
    n = len(CHAPTERS)
    c.print()
    c.print(Rule(Text(f"Chapter {ch.number}/{n}: {ch.title}", style="bold cyan")))
    for line in reflow(ch.text(L.q), max(40, min(c.width, 100) - 1)):
        L.say(line)
    c.print()
    c.print(Text(ch.diagram(L), style="green"), soft_wrap=True)
    c.print()
    L.say(reading_list(ch.read), "italic")
    c.print()
    c.print(Text("Live demo", style="bold magenta"))
    L.chapter = ch.number
    try:
        L.facts[ch.number] = ch.demo(L)
    except Exception as e:        # a demo that fails must not end the course: say so and go on
        L.errors[ch.number] = f"{type(e).__name__}: {e}"
        L.say(f"(the demo failed: {type(e).__name__}: {e})", "red")
        L._engine = None          # it may have left a request half-done in the shared engine


def ask(L: Lesson, ch: Chapter, k: int, question: Question) -> bool:
    c = L.console
    c.print()
    L.say(f"Q{k}. {question.text}", "bold")
    for i, option in enumerate(question.options, 1):
        L.say(f"  {i}. {option}")
    answer = int(read_answer(c, f"answer 1-4 ({NAV}): ", True, ch.number))
    if answer == question.answer:
        L.say(f"  Right. {question.right}", "green")
        return True
    L.say(f"  Not quite: {question.why[answer]}", "red")
    L.say(f"  The answer is {question.answer}. {question.options[question.answer - 1]}: {question.right}", "yellow")
    return False


def run_course(L: Lesson, store: ProgressStore, progress: Progress, start: int) -> int:
    n = len(CHAPTERS)
    chapter = start
    while True:
        ch = CHAPTERS[chapter - 1]
        progress.current = chapter
        store.save(progress)
        try:
            show_chapter(L, ch)
            questions = ch.quiz(L.q)
            correct = sum(ask(L, ch, k, q) for k, q in enumerate(questions, 1))
            progress.scores[chapter] = {"correct": correct, "total": len(questions)}
            if chapter not in progress.done:
                progress.done.append(chapter)
            L.say(f"\nChapter {chapter} done: {correct}/{len(questions)} right.", "bold")
            if chapter == n:
                progress.finished = True
                progress.current = n
                store.save(progress)
                total = sum(s["correct"] for s in progress.scores.values())
                out_of = sum(s["total"] for s in progress.scores.values())
                L.say(f"Course complete: {len(progress.done)}/{n} chapters, {total}/{out_of} answers right. "
                      f"{store.saved_note()}.", "bold green")
                return 0
            progress.current = chapter + 1
            store.save(progress)
            read_answer(L.console, f"Enter for chapter {chapter + 1} ({NAV}): ", False, chapter)
            chapter += 1
        except Navigate as nav:
            if nav.target > n:                              # `n` in the last chapter: stop here
                store.save(progress)
                L.say(f"This is the last chapter. {store.saved_note()}.", "bold")
                return 0
            chapter = nav.target
        except Quit:
            store.save(progress)
            if store.can_write:
                L.say(f"{store.saved_note()}: next time `python run.py --tutorial` resumes at "
                      f"chapter {progress.current} ({CHAPTERS[progress.current - 1].title}).", "bold")
            else:
                L.say(f"{store.saved_note()}.", "bold")
            return 0


def main(args) -> int:
    """run.py --tutorial. Returns the exit code: 0; 2 for a bad --chapter or a --progress-file the tutorial
    did not write (one `error:` line, the file untouched); 130 on Ctrl-C, progress saved."""
    try:
        return course(args)[0]
    except ProgressFileError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


def course(args, console: Console | None = None) -> tuple[int, "Lesson | None"]:
    """The tutorial, reading answers from stdin; returns (exit code, the lesson with its demos' facts).
    Raises ProgressFileError (a ValueError) when the progress path holds something not ours."""
    console = console or Console(highlight=False)
    start = getattr(args, "chapter", None)
    if start is not None and not 1 <= start <= len(CHAPTERS):
        print(f"error: --chapter must be between 1 and {len(CHAPTERS)}, got {start}", file=sys.stderr)
        return 2, None
    store = ProgressStore(getattr(args, "progress_file", None))
    progress, resumed = store.load()               # before anything is loaded: a refusal is immediate
    if start is None:
        if progress.finished:
            console.print(Text("You finished the course before; starting again at chapter 1 (scores are kept).",
                               style="bold"))
            progress.finished, start = False, 1
        else:
            start = progress.current
            if resumed:
                done = ", ".join(map(str, progress.done)) or "none yet"
                console.print(Text(f"Resuming at chapter {start} (chapters done: {done}).", style="bold"))
    lesson = Lesson(args, console)
    try:
        return run_course(lesson, store, progress, start), lesson
    except KeyboardInterrupt:
        store.save(progress)
        note = store.saved_note()
        console.print(Text(f"\ninterrupted; {note[0].lower()}{note[1:]}", style="bold"))
        return 130, lesson
