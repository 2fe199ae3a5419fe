"""
modes/narrator.py - `--narrate`: the engine explains, in plain words, what it is doing right now.

    python run.py --model tiny --narrate --prompt Hi --prompt "Hello there" --max-tokens 40

An observer on `engine.observers` (see engine.py's event list): each event the engine emits
becomes a sentence that carries the real values of this run and the reason behind them, in the
order things happen:

    tokenized, request_added   the prompt, its tokens, the chat template's markers, the sampling
    admitted                   the prefix-cache lookup: which blocks hit, how many tokens are skipped
    blocks_allocated           block ids from the pool, the block table, what is left free
    prefill                    how many tokens go through all layers at once, where their K/V land
    decode                     who decodes at which position, which slot its K/V is written to
    sampled                    the chosen token, its probability, the runners-up
    preempted, finished        blocks given back, why a request stopped, a summary
    spec_proposed/_verified    speculative decoding: the draft's guesses (q), the target's p, which
                               were kept, the replacement or bonus token

Decode is throttled so a long generation never becomes a paragraph per token: the first
`full_steps` decode steps are explained in full, then one short line every `every` decode steps,
and a summary when each request finishes. (Prefills, preemptions, new blocks and finishes are
rare events and always get their sentence.)

The generated text streams too, visibly apart from the commentary: commentary lines start with
`» ` (a step heading with `── `), text lines with `│ text [request]: ` and a different colour,
so the two stay distinguishable even without colours.

From Python:

    from modes.narrator import Narrator
    llm.observers.append(Narrator(llm, rich.console.Console()))
    llm.generate([...])

The narrator only reads: event data, and the engine's config and block manager. It never
changes what the engine does; the engine does not import it.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

from rich.text import Text

from modes.common import NBSP, fmt_bytes, token_piece

MARK, TEXT_MARK, HEAD_MARK = "» ", "│ ", "── "
TIMES = f"{NBSP}×{NBSP}"        # "13 × 112 KiB" with no-break spaces: never wrapped apart


def fmt_ids(ids, limit: int = 8) -> str:
    """[3, 4, 5] or [3, 4, 5, ..., 17, 9, 12] (12 blocks): block lists stay short however long they get."""
    ids = list(ids)
    if len(ids) <= limit:
        return "[" + ", ".join(map(str, ids)) + "]"
    return f"[{', '.join(map(str, ids[:3]))}, ..., {', '.join(map(str, ids[-3:]))}] ({len(ids)} blocks)"


def fmt_span(start: int, end: int) -> str:
    return f"position {start}" if end - start == 1 else f"positions {start}..{end - 1}"


def plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n} {word if n == 1 else (words or word + 's')}"


def visible(text: str) -> str:
    """Generated text on one line: newlines and tabs shown, not obeyed."""
    return text.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")


@dataclass
class _Request:
    prompt_len: int
    max_tokens: int
    sampling: object
    num_tokens: int = 0                        # tokens at (re-)admission
    tokens: list[int] = field(default_factory=list)   # generated so far
    shown: int = 0                             # characters of the text already streamed
    prob_sum: float = 0.0
    steps: int = 0
    seconds: float = 0.0
    admitted_this_step: bool = False
    hit_blocks: list[int] = field(default_factory=list)   # shared from the prefix cache at admission
    done: bool = False
    spec_drafted: int = 0                      # speculative decoding: guesses made for it, and accepted
    spec_accepted: int = 0


class Narrator:
    """Plain-language commentary of a live LLMEngine. `full_steps` decode steps in full, then a
    short line every `every` decode steps; `console` is a rich Console."""

    needs_eager = False        # it reads events only, no tensors from inside the model
    streams_text = True        # it prints the generated text itself (a CLI need not stream it too)

    def __init__(self, engine, console, full_steps: int = 3, every: int = 16):
        if full_steps < 0 or every < 1:
            raise ValueError(f"full_steps must be >= 0 and every >= 1, got {full_steps} and {every}.")
        self.engine, self.console = engine, console
        self.full_steps, self.every = full_steps, every
        self.tok = engine.tokenizer
        self.mc = engine.model_config
        self.block_size = engine.config.block_size
        self.kv_per_token = self.mc.kv_bytes_per_token(engine.dtype)
        # speculative decoding (07): guesses per sequence per step, 0 when off
        self.spec_k = engine.config.num_speculative_tokens if getattr(engine, "speculative", None) else 0
        self.requests: dict[int, _Request] = {}
        self.decode_steps = 0                  # steps that decoded at least one sequence
        self.step_full = False                 # this step is explained in full
        self.step = None                       # the step being narrated
        self.step_sampled: list[int] = []      # requests that got a token this step
        self.step_spans: dict[int, tuple[int, int]] = {}   # request -> positions it computes this step
        self.quiet_steps: list[tuple] = []     # (step, seconds, batch, tokens) since the last periodic line
        self.last_used_blocks = 0              # KV blocks in use at the last step_done
        self.spec_pending: dict[int, tuple] = {}   # speculative: this step's guesses, until verified
        self.spec_narrated: set[int] = set()   # requests whose kept tokens the spec sentence already told
        self.quiet_spec = [0, 0]               # guesses drafted / accepted since the last periodic line
        self.lines = 0                         # lines printed (tests bound it)

    # ------------------------------------------------------------------ output

    def _print(self, body: str, mark: str = MARK, style: str = "", cont: str | None = None,
               exact: bool = False) -> None:
        """One paragraph, wrapped to the console, every line marked (continuations indented).
        exact: keep every character (generated text: the wrapped lines joined give it back)."""
        width = max(40, (self.console.width or 80) - 1)
        cont = " " * len(mark) if cont is None else cont
        lines = textwrap.wrap(body, width - len(mark), break_on_hyphens=False, drop_whitespace=not exact,
                              replace_whitespace=False) or [""]
        for i, line in enumerate(lines):
            text = Text(mark if i == 0 else cont, style="dim")
            text.append(line, style=style)
            self.console.print(text, soft_wrap=True)
            self.lines += 1

    def _say(self, body: str) -> None:
        self._print(body)

    def _heading(self, body: str) -> None:
        self._print(body, mark=HEAD_MARK, style="bold")

    def _stream_text(self, rid: int, final_text: str | None = None) -> None:
        """Print the request's text that has not been shown yet (an incomplete UTF-8 character waits;
        at the end, final_text is the output's text, which a stop string may have cut)."""
        r = self._req(rid)
        text = self.tok.decode(r.tokens).rstrip("\ufffd") if final_text is None else final_text
        delta = text[r.shown:]
        r.shown = max(r.shown, len(text))
        if delta:
            prefix = f"{TEXT_MARK}text [{rid}]: "
            self._print(visible(delta), mark=prefix, style="bold green", cont=TEXT_MARK + " " * (len(prefix) - 2),
                        exact=True)

    def close(self) -> None:
        """Detach cleanly: the decode steps not yet summed up get their short line."""
        self._flush_quiet()

    # ------------------------------------------------------------------ events

    def on_event(self, event: str, data: dict) -> None:
        handler = getattr(self, "_on_" + event, None)
        if handler is not None:
            handler(**data)

    def _on_tokenized(self, request_id, text, token_ids, **_):
        n = len(token_ids)
        pieces = " · ".join(f"{i} {token_piece(self.tok, i, NBSP)}" for i in token_ids[:12])
        more = f" · ... ({n - 12} more)" if n > 12 else ""
        self._heading(f"request {request_id}")
        self._say(f"Request {request_id} arrives: its {len(text)} characters are split by byte-level BPE into "
                  f"{plural(n, 'token')}, the units the model reads: {pieces}{more}.")
        template = self._template(token_ids)
        if template:
            self._say(template)

    def _template(self, ids) -> str:
        """What the chat template's markers in the prompt mean (recognised from the token ids)."""
        piece = [self.tok.decode([i], skip_special_tokens=False) for i in ids]
        starts = [i for i, p in enumerate(piece) if p == "<|im_start|>"]
        if not starts:
            return "There is no chat template around it (a raw prompt): the model simply continues the text."
        roles = [piece[i + 1].strip() if i + 1 < len(piece) else "?" for i in starts]
        s = (f"It is in Qwen3's chat format: {plural(len(starts), 'turn')} ({', '.join(roles)}), each opened by "
             f"<|im_start|> and its role, closed by <|im_end|>.")
        if roles[-1] == "assistant" and piece[-1].strip() != "<|im_end|>":
            s += (" The prompt ends inside the assistant turn, so the model's next tokens are the reply; "
                  "it ends the reply by producing <|im_end|>.")
        if "<think>" in piece and "</think>" in piece:
            a, b = piece.index("<think>"), piece.index("</think>")
            if all(not p.strip() for p in piece[a + 1:b]):
                s += " The empty <think></think> block is pre-filled, so the model skips thinking and answers at once."
        elif roles[-1] == "assistant":
            s += " Thinking is on: the reply may start with <think> reasoning </think>."
        return s

    def _on_request_added(self, request_id, prompt, prompt_token_ids, sampling, waiting, **_):
        n = len(prompt_token_ids)
        self.requests[request_id] = _Request(n, sampling.max_tokens, sampling)
        if prompt is None:
            self._heading(f"request {request_id}")
            self._say(f"Request {request_id} arrives as {plural(n, 'token id')} (already tokenized).")
        if sampling.greedy:
            how = "greedy: each next token is the single most likely one (temperature 0)"
        else:
            how = f"sampled at temperature {sampling.temperature:g}"
            filters = [f"top-k {sampling.top_k}" if sampling.top_k else "",
                       f"top-p {sampling.top_p:g}" if sampling.top_p < 1 else "",
                       f"min-p {sampling.min_p:g}" if sampling.min_p else ""]
            if any(filters):
                how += " after " + ", ".join(f for f in filters if f)
            how += f", seed {sampling.seed}" if sampling.seed is not None else ", unseeded"
        self._say(f"It waits in the queue ({waiting} waiting) to be scheduled; it will generate at most "
                  f"{plural(sampling.max_tokens, 'token')}, {how}.")

    def _on_admitted(self, request_id, num_tokens, cached_tokens, hit_blocks, preempted_before, **_):
        r = self._req(request_id)
        r.num_tokens, r.admitted_this_step, r.hit_blocks = num_tokens, True, list(hit_blocks)
        bs = self.block_size
        lookable = (num_tokens - 1) // bs       # full blocks before the one holding the last token
        again = (f" This is a re-admission after {plural(preempted_before, 'preemption')}: its {num_tokens} tokens "
                 f"(prompt and generated so far) are computed again." if preempted_before else "")
        if not self.engine.config.enable_prefix_caching:
            look = f"Prefix caching is off, so all {num_tokens} tokens are computed."
        elif cached_tokens:
            look = (f"Prefix-cache lookup: {plural(len(hit_blocks), 'block')} {fmt_ids(hit_blocks)} hit = "
                    f"{cached_tokens} tokens whose keys and values are already in the pool (same tokens from the "
                    f"start); they are shared, not copied, and only the other {num_tokens - cached_tokens} "
                    f"are computed.")
        elif lookable == 0:
            look = (f"Prefix-cache lookup: nothing to look up - only full {bs}-token blocks before the last token "
                    f"are cached, and {num_tokens} tokens have none, so all {num_tokens} are computed.")
        else:
            look = (f"Prefix-cache lookup: no hit - the first {bs}-token block of its prompt is not in the cache "
                    f"(blocks are matched from the start, each by a hash of all tokens up to its end), so all "
                    f"{num_tokens} tokens are computed.")
        self._say(f"The scheduler admits request {request_id} ({num_tokens} tokens). {look}{again}")

    def _on_blocks_allocated(self, request_id, blocks, block_table, num_free_blocks, **_):
        r = self._req(request_id)
        total = self.engine.num_kv_blocks
        bs = self.block_size
        pos = (len(block_table) - len(blocks)) * bs       # the first position the new blocks hold
        shared = ""
        if r.admitted_this_step and r.hit_blocks:         # at admission the event lists the hits too
            blocks = [b for b in blocks if b not in r.hit_blocks]
            shared = f"{fmt_ids(r.hit_blocks)} shared from the prefix cache and "
        taken = (f"{shared}{plural(len(blocks), 'new block')} {fmt_ids(blocks)} "
                 f"{'comes' if len(blocks) == 1 else 'come'} from the pool; after this step's allocations "
                 f"{num_free_blocks} of {total} blocks are free")
        if r.admitted_this_step and len(block_table) == -(-r.num_tokens // bs):
            self._say(f"It needs ceil({r.num_tokens} / {bs}) = {plural(len(block_table), 'block')} of {bs} slots: "
                      f"block table {fmt_ids(block_table)}, of which {taken}.")
        elif r.admitted_this_step:
            self._say(f"It gets block table {fmt_ids(block_table)} for the tokens it computes in this step "
                      f"(more blocks follow with the next chunks): {taken}.")
        elif pos == r.prompt_len + len(r.tokens) - 1 and len(blocks) == 1:
            self._say(f"Request {request_id} reaches position {pos}: its last block is full, so block {blocks[0]} "
                      f"is taken from the pool (its table now has {len(block_table)}; {num_free_blocks} of {total} "
                      f"free).")
        else:
            self._say(f"Request {request_id}'s next prefill chunk starts past its blocks: {taken} "
                      f"(block table {fmt_ids(block_table)}).")

    def _new_step(self, step: int) -> None:
        if self.step != step:
            self.step, self.step_spans = step, {}
            self.spec_narrated = set()
            self.step_sampled = []
            self.step_full = False

    def _on_prefill(self, step, chunks, num_tokens, **_):
        self._new_step(step)
        self.step_full = True
        self._flush_quiet()
        layers, kv = self.mc.num_hidden_layers, self.kv_per_token
        self._heading(f"step {step} · prefill")
        parts, chunked = [], []
        for rid, start, end in chunks:
            self.step_spans[rid] = (start, end)
            r = self._req(rid)
            blocks = self._blocks_of(rid, start, end)
            where = f"block {blocks[0]}" if len(blocks) == 1 else f"blocks {fmt_ids(blocks)}"
            span = fmt_span(start, end) + (f"; 0..{start - 1} are already in the cache" if start > 0 else "")
            parts.append((rid, end - start, span, where))
            if end < r.num_tokens:
                chunked.append(f"request {rid} has {end} of its {r.num_tokens} tokens computed")
        kv_all = (f"their keys and values — {num_tokens}{TIMES}{fmt_bytes(kv, NBSP)} = "
                  f"{fmt_bytes(num_tokens * kv, NBSP)} —")
        what = "prompt tokens" if all(not self._req(rid).tokens for rid, _, _ in chunks) else "tokens"
        if len(parts) == 1:
            (rid, n, span, where), = parts
            self._say(f"Step {step} runs a prefill: request {rid}'s {n} {what} ({span}) go through all {layers} "
                      f"layers at once; {kv_all} are written to {where}.")
        else:
            each = "; ".join(f"request {rid}'s {n} ({span}) -> {where}" for rid, n, span, where in parts)
            self._say(f"Step {step} runs a prefill of {num_tokens} {what} from {len(parts)} requests, packed "
                      f"back to back with no padding: {each}. All {num_tokens} go through all {layers} layers at "
                      f"once; {kv_all} are written to the pool.")
        if chunked:
            self._say(f"This is chunked prefill: the budget of {self.engine.config.max_num_batched_tokens} tokens "
                      f"per step cuts the prompt into pieces ({'; '.join(chunked)}); the rest follows in the next "
                      f"steps, while running sequences keep decoding.")
        finishing = [rid for rid, _, end in chunks if end == self._req(rid).num_tokens]
        if finishing and self.spec_k:
            self._say(f"With speculative decoding, the draft model first guesses up to {self.spec_k} tokens after "
                      f"{'each finished prompt' if len(finishing) > 1 else 'the prompt'}; they ride along in this "
                      f"forward, and the target's logits at the prompt's last position and at each guess decide "
                      f"which guesses are kept.")
        elif finishing:
            self._say(f"Only the last position of {'each finished prompt' if len(finishing) > 1 else 'the prompt'} "
                      f"needs logits: the vocabulary projection runs on {plural(len(finishing), 'row')}, "
                      f"not {num_tokens}, and {'they give' if len(finishing) > 1 else 'it gives'} the first "
                      f"generated token.")

    def _on_decode(self, step, request_ids, positions, **_):
        self._new_step(step)
        self.decode_steps += 1
        for rid, pos in zip(request_ids, positions):
            self.step_spans[rid] = (pos, pos + 1)
        if self.step_full:       # a prefill in the same step: continuous batching
            self._say(f"In the same step {plural(len(request_ids), 'running sequence')} "
                      f"({self._who(request_ids, positions)}) decode one token each: continuous batching puts "
                      f"new prompts and ongoing generations in one forward pass.")
            return
        if self.decode_steps > self.full_steps:
            return
        self.step_full = True
        self._heading(f"step {step} · decode {self.decode_steps}")
        if self.spec_k:
            self._say(f"Speculative decoding is on: before this step's target forward the draft model guesses up "
                      f"to {self.spec_k} tokens per sequence, one draft forward each, and the target then runs over "
                      f"the newest token and all the guesses at once.")
        layers, kv = self.mc.num_hidden_layers, self.kv_per_token
        slots = []
        for rid, pos in list(zip(request_ids, positions))[:4]:
            block = self._blocks_of(rid, pos, pos + 1)[0]
            slots.append(f"block {block} slot {pos % self.block_size}")
        if len(request_ids) == 1:
            (rid,), (pos,) = request_ids, positions
            self._say(f"Step {step} decodes: request {rid} feeds its newest token (position {pos}) through all "
                      f"{layers} layers. Its query attends to {pos + 1} keys — the {pos} earlier ones read from "
                      f"the paged cache through the block table, and its own — and its key and value "
                      f"({fmt_bytes(kv, NBSP)}) are written to {slots[0]}.")
        else:
            where = ", ".join(f"{slot} (request {rid})" for slot, rid in zip(slots, request_ids))
            more = f" and {len(request_ids) - 4} more" if len(request_ids) > 4 else ""
            self._say(f"Step {step} decodes a batch of {len(request_ids)} sequences, one new token each "
                      f"({self._who(request_ids, positions)}), through all {layers} layers in one pass. Each query "
                      f"attends to its own sequence's earlier keys, read from the paged cache through its block "
                      f"table; the new keys and values ({len(request_ids)}{TIMES}{fmt_bytes(kv, NBSP)}) are written to "
                      f"{where}{more}.")

    def _on_sampled(self, request_id, token_id, prob, top, position, greedy, **_):
        r = self._req(request_id)
        r.tokens.append(token_id)
        r.prob_sum += prob
        self.step_sampled.append(request_id)
        first = len(r.tokens) == 1
        if request_id in self.spec_narrated or not (first or (self.step_full and self.decode_steps <= self.full_steps)):
            return
        others = " · ".join(f"{token_piece(self.tok, t, NBSP)} {p:.3f}" for t, p in top if t != token_id)
        if greedy:
            how = f"the most likely of {self.mc.vocab_size:,} (greedy)"
        else:
            rank = next((i + 1 for i, (t, _) in enumerate(top) if t == token_id), None)
            how = (f"drawn at random ({'rank ' + str(rank) if rank else 'outside the top ' + str(len(top))} "
                   f"by probability)")
        self._say(f"Request {request_id} -> token {token_id} {token_piece(self.tok, token_id, NBSP)} "
                  f"with p = {prob:.3f}, {how}; next in line: {others}. It will sit at position {position}"
                  f"{' (its first generated token)' if first else ''}.")

    def _on_step_done(self, step, seconds, num_tokens, num_seqs, num_used_blocks, num_free_blocks, running,
                      waiting, **_):
        for rid in self.step_spans:
            r = self._req(rid)
            r.steps, r.seconds, r.admitted_this_step = r.steps + 1, r.seconds + seconds, False
        total = self.engine.num_kv_blocks
        self.last_used_blocks = num_used_blocks
        if self.step_full:
            self._say(f"Step {step} took {seconds * 1e3:.1f} ms for {plural(num_tokens, 'token')} of "
                      f"{plural(num_seqs, 'sequence')}; KV pool: {num_used_blocks} of {total} blocks in use "
                      f"({fmt_bytes(num_used_blocks * self.block_size * self.kv_per_token, NBSP)}); "
                      f"{running} running, {waiting} waiting.")
            for rid in dict.fromkeys(self.step_sampled):
                self._stream_text(rid)
            return
        self.quiet_steps.append((step, seconds, num_seqs, len(self.step_sampled)))
        if (self.decode_steps - self.full_steps) % self.every == 0:
            self._flush_quiet(num_used_blocks)

    def _flush_quiet(self, num_used_blocks: int | None = None) -> None:
        """The short periodic line for the decode steps not explained in full, and the text they made."""
        if not self.quiet_steps:
            return
        steps = self.quiet_steps
        self.quiet_steps = []
        first, last = steps[0][0], steps[-1][0]
        ms = 1e3 * sum(s for _, s, _, _ in steps) / len(steps)
        batch = sorted({b for _, _, b, _ in steps})
        used = self.last_used_blocks if num_used_blocks is None else num_used_blocks
        active = [rid for rid, r in self.requests.items() if r.tokens and not r.done]
        at = ", ".join(f"[{rid}] {self.requests[rid].prompt_len + len(self.requests[rid].tokens) - 1}"
                       for rid in active[:6]) + (" ..." if len(active) > 6 else "")
        drafted, accepted = self.quiet_spec
        self.quiet_spec = [0, 0]
        spec = (f"; speculation: {accepted} of {drafted} guesses accepted ({100 * accepted / drafted:.0f}%)"
                if drafted else "")
        self._say(f"steps {first}..{last}: {plural(len(steps), 'decode step')}, "
                  f"{'-'.join(map(str, (batch[0], batch[-1]) if len(batch) > 1 else batch))} "
                  f"{'sequence' if batch == [1] else 'sequences'} each, {ms:.1f} ms/step, "
                  f"{plural(sum(n for *_, n in steps), 'token')} generated{spec}; newest positions {at}; "
                  f"KV pool {used}/{self.engine.num_kv_blocks} blocks.")
        for rid in active:
            self._stream_text(rid)

    def _on_preempted(self, request_id, num_tokens, freed_blocks, num_free_blocks, **_):
        self._flush_quiet()
        self._say(f"Preemption: the pool has no free block for the running sequences' next tokens, so request "
                  f"{request_id}, the most recently admitted, gives back its {plural(len(freed_blocks), 'block')} "
                  f"{fmt_ids(freed_blocks)} and goes back to the front of the queue (after this step's allocations "
                  f"{num_free_blocks} blocks are free). Its {num_tokens} tokens (text so far included) are kept; their "
                  f"keys and values are not: full blocks stay in the prefix cache until they are evicted, so its "
                  f"re-admission may find some of them there, and the rest is recomputed.")

    def _on_finished(self, request_id, output, reason, freed_blocks, cached_blocks, num_free_blocks, **_):
        self._flush_quiet()
        r = self._req(request_id)
        r.done = True
        n = len(output.token_ids)
        last = output.token_ids[-1] if output.token_ids else None
        p = r.sampling
        if reason == "stop":
            if last in self.tok.eos_token_ids and not getattr(p, "ignore_eos", False):
                why = f"stop: it produced {token_piece(self.tok, last, NBSP)}, an end-of-sequence token"
            elif last in getattr(p, "stop_token_ids", ()):
                why = f"stop: it produced token {last}, one of its stop token ids"
            else:
                hit = next((s for s in getattr(p, "stop", ()) if s in self.tok.decode(output.token_ids)), "?")
                why = f"stop: the text contains the stop string {hit!r}, cut just before it"
        elif n >= getattr(p, "max_tokens", n + 1):
            why = f"length: max_tokens = {r.max_tokens} reached"
        else:
            why = f"length: the context limit max_model_len = {self.engine.max_model_len} reached"
        self._stream_text(request_id, final_text=output.text)
        kept = len(cached_blocks)
        free_again = len(freed_blocks) - kept
        self._say(f"Request {request_id} finishes ({why}) after {plural(n, 'generated token')} in "
                  f"{plural(r.steps, 'step')} ({r.seconds * 1e3:.0f} ms of model time, "
                  f"{n / r.seconds if r.seconds else 0:.1f} tokens/s); its chosen tokens' mean probability was "
                  f"{r.prob_sum / max(n, 1):.3f}. Its {plural(len(freed_blocks), 'block')} {fmt_ids(freed_blocks)} go "
                  f"back to the pool: {kept} full {'block stays' if kept == 1 else 'blocks stay'} in the prefix "
                  f"cache (evictable, reusable by a request with the same prefix), {free_again} "
                  f"{'is' if free_again == 1 else 'are'} plain free; {num_free_blocks} of {self.engine.num_kv_blocks} "
                  f"blocks are free.")
        if r.spec_drafted:
            self._say(f"Speculation for request {request_id}: {r.spec_accepted} of {r.spec_drafted} guesses accepted "
                      f"({100 * r.spec_accepted / r.spec_drafted:.0f}%), so its {n} tokens took {r.steps} target "
                      f"forwards instead of {n}.")
        if not self.engine.has_unfinished_requests():
            self._summary()

    def _summary(self) -> None:
        e = self.engine
        st = e.stats
        self._heading("summary")
        self._say(f"All requests done: {plural(st['steps'], 'step')} ({self.decode_steps} decoding), "
                  f"{st['prompt_tokens']} prompt tokens, {e.block_manager.prefix_hit_tokens} tokens served from the "
                  f"prefix cache instead of computed, {st['generated_tokens']} tokens generated; KV pool peak "
                  f"{st['kv_blocks_peak']} of {e.num_kv_blocks} blocks "
                  f"({fmt_bytes(st['kv_blocks_peak'] * self.block_size * self.kv_per_token, NBSP)}); "
                  f"{plural(e.scheduler.num_preemptions, 'preemption')}.")

    # ------------------------------------------------------------------ speculative decoding

    def _on_spec_proposed(self, request_id, draft_token_ids, draft_probs, **_):
        self.spec_pending[request_id] = (list(draft_token_ids), list(draft_probs))

    def _on_spec_verified(self, request_id, num_draft_tokens, num_accepted, target_probs, rejected_position,
                          token_id, bonus, **_):
        r = self._req(request_id)
        k, a = num_draft_tokens, num_accepted
        r.spec_drafted += k
        r.spec_accepted += a
        self.quiet_spec[0] += k
        self.quiet_spec[1] += a
        ids, q = self.spec_pending.pop(request_id, ([], []))
        if not (self.step_full and self.decode_steps <= self.full_steps) and r.spec_drafted > k:
            return                       # throttled: the periodic line counts the guesses
        self.spec_narrated.add(request_id)
        greedy = getattr(r.sampling, "greedy", False)
        rule = ("a guess passes only if it is the target's own argmax (greedy: p and q are one-hot, so p 1.00 "
                "means the target agrees)" if greedy else
                "a guess x passes with probability min(1, p(x) / q(x))")
        guesses = " · ".join(f"{token_piece(self.tok, t, NBSP)} (q {qq:.2f}, p {pp:.2f})"
                             for t, qq, pp in zip(ids, q, target_probs))
        if bonus:
            outcome = (f"all {k} pass, and the target's logits after the last guess give a bonus token "
                       f"{token_piece(self.tok, token_id, NBSP)}: {k + 1} tokens from one target forward")
        else:
            outcome = (f"{'the first ' + str(a) + ' pass' if a else 'none passes'}; guess {rejected_position + 1} is "
                       f"rejected and the target's own choice {token_piece(self.tok, token_id, NBSP)} takes its place: "
                       f"{plural(a + 1, 'token')} from this step")
        self._say(f"Speculative decoding, request {request_id}: the draft model guessed {plural(k, 'token')} "
                  f"({guesses}); the target scored all of them in this step's single forward over {k + 1} positions, "
                  f"and {rule}: {outcome}. Rejected guesses' keys and values are rolled back (their slots freed).")

    # ------------------------------------------------------------------ helpers

    def _req(self, rid: int) -> _Request:
        """The narrator's record of a request (an empty one if it arrived before the narrator was attached)."""
        if rid not in self.requests:
            self.requests[rid] = _Request(0, 0, None)
        return self.requests[rid]

    def _blocks_of(self, rid: int, start: int, end: int) -> list[int]:
        table = self.engine.block_manager.block_tables.get(rid, [])
        return table[start // self.block_size:(end - 1) // self.block_size + 1] or ["?"]

    @staticmethod
    def _who(request_ids, positions) -> str:
        pairs = [f"request {r} at position {p}" for r, p in zip(request_ids, positions)]
        return ", ".join(pairs[:4]) + (f" and {len(pairs) - 4} more" if len(pairs) > 4 else "")
