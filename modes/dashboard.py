"""
modes/dashboard.py - `--dashboard`: a live view of the engine while it serves.

    python run.py --model demo --dashboard --prompt "Hi" --prompt "Why is the sky blue?"

The dashboard is two halves that never block each other:

  observer   `on_event` (engine.observers, see engine.py) updates plain Python state: per-request
             phase, progress and token ids, the latest top next-token candidates, queue sizes,
             throughput counters. It never renders and never decodes text, so its cost per token
             is a few list appends and dictionary writes.
  renderer   a `rich.live.Live` with its own thread redraws the screen from that state about 10
             times a second (`REFRESH_PER_SECOND`), however fast tokens come.

Both halves take one lock, so a frame never sees half an update. The engine's own structures (the
block manager) are only read on the engine's thread: a snapshot of the KV pool is taken there at
most 10 times a second and the renderer draws the snapshot.

    ┌ header: model, device, dtype, step, elapsed, status ─────────────────────────────┐
    │ throughput: prefill, decode  │ scheduler: waiting,  │ next-token top-5, their    │
    │ tok/s now and average; spec. │ running, preempted,  │ probabilities, the one     │
    │ acceptance (--speculative)   │ the last batch       │ sampled                    │
    │ KV pool: one cell per block (or per k blocks) coloured by owner: used / shared / │
    │ cached (evictable) / free, with counts and MiB, prefix-cache hit rate            │
    │ requests: phase, progress bar, tokens, prompt -> the text so far (one row each)  │
    └──────────────────────────────────────────────────────────────────────────────────┘

Not a terminal (a pipe, CI): no Live screen, no escape codes; when the run ends a plain-text
summary is printed instead. In a terminal the last frame stays on screen and the cursor is
restored on exit, Ctrl-C included (the `with` block stops Live before the interrupt goes on).
"""
from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from rich.cells import cell_len
from rich.console import Group
from rich.live import Live
from rich.measure import Measurement
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

REFRESH_PER_SECOND = 10
RATE_WINDOW_S = 1.0           # "now" rates are measured over the steps of the last second
MAP_WIDTH, MAP_ROWS = 96, 4   # the block map: at most this many cells; a big pool shares cells
MAX_REQUEST_ROWS = 8
COLORS = ["cyan", "magenta", "green", "blue", "bright_red", "bright_cyan", "bright_magenta", "bright_green"]


@dataclass
class RequestView:
    """What the dashboard knows about one request (updated by events only)."""
    rid: int
    prompt: str
    num_prompt_tokens: int
    max_tokens: int
    phase: str = "waiting"            # waiting | prefill | decode | preempted | finished
    target: int = 0                   # tokens to compute before the next sample (prompt + output so far)
    computed: int = 0                 # of those, computed or taken from the prefix cache
    cached: int = 0
    token_ids: list[int] = field(default_factory=list)
    preemptions: int = 0
    finish_reason: str | None = None
    final_text: str | None = None


def short_prompt(text: str | None, ids: list[int]) -> str:
    """The user's words for a chat-templated prompt, the text itself otherwise."""
    if text is None:
        return f"<{len(ids)} token ids>"
    marker = "<|im_start|>user\n"
    if marker in text:
        text = text[text.rfind(marker) + len(marker):].split("<|im_end|>")[0]
    return " ".join(text.split())


def one_line(text: str) -> str:
    return text.replace("\r", "").replace("\n", "⏎").replace("\t", " ")


class Dashboard:
    """An engine observer plus a Live screen. Use it as a context manager around the loop that
    steps the engine: `engine.observers.append(d); with d: ...`."""

    def __init__(self, engine, console, refresh_per_second: float = REFRESH_PER_SECOND):
        self.engine, self.console = engine, console
        self.refresh_per_second = refresh_per_second
        self.live: Live | None = None
        self._lock = threading.Lock()
        bm = engine.block_manager
        self.num_blocks, self.block_size = bm.num_blocks, bm.block_size
        self.bytes_per_block = engine.model_config.kv_bytes_per_token(engine.dtype) * bm.block_size
        self.model_name = os.path.basename(os.path.normpath(str(engine.config.model)))
        self.requests: dict[int, RequestView] = {}
        self.top: tuple | None = None                 # (rid, position, token_id, prob, [(id, p)]) of the last sample
        self.step = 0
        self.running = self.waiting = 0
        self.last_batch = (0, 0)                      # (sequences, tokens) of the last step
        self.preemptions = 0
        self.admitted_tokens = self.hit_tokens = 0
        self.totals = {"prefill": [0, 0.0], "decode": [0, 0.0]}   # kind -> [tokens, seconds]
        self.window: deque = deque()                  # (wall time, kind, tokens, seconds)
        self._step_prefill = 0
        self._step_decode = 0
        self.peak_used = 0
        self.pool: dict = {}                          # snapshot: cells, counts
        self._pool_at = 0.0
        self.spec: dict[str, int] = {}                # draft tokens / accepted, from spec_verified events
        self.spec_stats: dict = {}                    # the engine's spec_* stats, snapshot
        self.status = "waiting"
        self.started = self.ended = None
        self._text_cache: dict[int, tuple[int, str]] = {}
        self._snapshot_pool()

    # ------------------------------------------------------------------ observer (engine thread)

    def on_event(self, event: str, data: dict) -> None:
        with self._lock:
            handler = getattr(self, "_on_" + event, None)
            if handler is not None:
                handler(data)
        if event in ("step_done", "finished") and time.perf_counter() - self._pool_at >= 1 / self.refresh_per_second:
            self._snapshot_pool()

    def _on_request_added(self, d):
        sampling = d.get("sampling")
        self.requests[d["request_id"]] = RequestView(
            d["request_id"], short_prompt(d.get("prompt"), d["prompt_token_ids"]), len(d["prompt_token_ids"]),
            getattr(sampling, "max_tokens", 0) or 0, target=len(d["prompt_token_ids"]))
        if self.started is None:
            self.started = time.perf_counter()
        self.status = "running"

    def _on_admitted(self, d):
        r = self.requests.get(d["request_id"])
        self.admitted_tokens += d["num_tokens"]
        self.hit_tokens += d["cached_tokens"]
        if r is not None:
            r.phase, r.target, r.computed, r.cached = "prefill", d["num_tokens"], d["cached_tokens"], d["cached_tokens"]

    def _on_preempted(self, d):
        self.preemptions += 1
        r = self.requests.get(d["request_id"])
        if r is not None:
            r.phase, r.computed, r.preemptions = "preempted", 0, r.preemptions + 1

    def _on_prefill(self, d):
        self._step_prefill += d["num_tokens"]
        for rid, _, end in d["chunks"]:
            r = self.requests.get(rid)
            if r is not None:
                r.phase, r.computed = "prefill", end

    def _on_decode(self, d):
        for rid in d["request_ids"]:
            r = self.requests.get(rid)
            if r is not None:
                r.phase = "decode"

    def _on_sampled(self, d):
        r = self.requests.get(d["request_id"])
        if r is not None:
            r.token_ids.append(d["token_id"])
            r.phase, r.computed = "decode", r.target
            r.target += 1
        self._step_decode += 1           # tokens this step produced (several per sequence with speculation)
        self.top = (d["request_id"], d["position"], d["token_id"], d["prob"], d["top"])

    def _on_step_done(self, d):
        self.step = d["step"]
        self.running, self.waiting = d["running"], d["waiting"]
        self.last_batch = (d["num_seqs"], d["num_tokens"])
        self.peak_used = max(self.peak_used, d["num_used_blocks"])
        # Like the engine's own stats: a step with any prefill counts as prefill time.
        kind, tokens = ("prefill", self._step_prefill) if self._step_prefill else ("decode", self._step_decode)
        self.totals[kind][0] += tokens
        self.totals[kind][1] += d["seconds"]
        now = time.perf_counter()
        self.window.append((now, kind, tokens, d["seconds"]))
        while self.window and now - self.window[0][0] > RATE_WINDOW_S:
            self.window.popleft()
        self._step_prefill = self._step_decode = 0

    def _on_finished(self, d):
        r = self.requests.get(d["request_id"])
        if r is not None:
            r.phase, r.finish_reason = "finished", d["reason"]
            out = d.get("output")
            if out is not None:
                r.final_text, r.token_ids = out.text, list(out.token_ids)

    def _on_spec_verified(self, d):
        """Speculative decoding (07): k draft tokens checked, the first num_accepted kept."""
        self.spec["draft_tokens"] = self.spec.get("draft_tokens", 0) + d["num_draft_tokens"]
        self.spec["accepted"] = self.spec.get("accepted", 0) + d["num_accepted"]

    def map_width(self) -> int:
        return max(16, min(MAP_WIDTH, self.console.width - 4))

    def _snapshot_pool(self) -> None:
        """Read the block manager (engine thread only) into a small picture for the renderer."""
        bm = self.engine.block_manager
        owner = {}
        for sid, table in list(bm.block_tables.items()):
            for b in table:
                owner[b] = -2 if b in owner else sid          # -2: shared by several sequences
        evictable = set(bm.evictable_blocks())
        n = self.num_blocks
        width = self.map_width()
        per_cell = max(1, math.ceil(n / (width * MAP_ROWS)))
        cells = []
        for start in range(0, n, per_cell):
            state = None                                       # None = free
            for b in range(start, min(n, start + per_cell)):
                if b in owner:
                    state = owner[b]
                    break
                if b in evictable:
                    state = -1                                 # -1: cached, evictable
            cells.append(state)
        used, cached = bm.num_used_blocks, bm.num_evictable_blocks
        spec = {}
        if getattr(self.engine, "speculative", None) is not None and hasattr(self.engine, "stats_summary"):
            spec = {k: v for k, v in self.engine.stats_summary().items() if k.startswith("spec_")}
        pool = dict(cells=cells, per_cell=per_cell, width=width, used=used, cached=cached, free=n - used - cached,
                    hashed=bm.num_cached_blocks, hit_tokens=bm.prefix_hit_tokens)
        with self._lock:
            self.pool = pool
            self.spec_stats = spec
            self.peak_used = max(self.peak_used, used)
        self._pool_at = time.perf_counter()

    # ------------------------------------------------------------------ context manager

    def __enter__(self):
        self.status = "running"
        if self.started is None:
            self.started = time.perf_counter()
        if self.console.is_terminal:
            self.live = Live(console=self.console, get_renderable=self.render, auto_refresh=True,
                             refresh_per_second=self.refresh_per_second, transient=False)
            try:
                self.live.start(refresh=True)
            except BaseException:               # Ctrl-C during the first frame: `with` never calls __exit__
                self.status = "interrupted"
                self._stop_live()
                raise
        return self

    def _stop_live(self) -> None:
        """Stop Live: the last frame stays on screen, the cursor comes back (whatever happens)."""
        live, self.live = self.live, None
        if live is None:
            return
        try:
            live.stop()
        finally:
            self.console.show_cursor(True)

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.ended = time.perf_counter()
        self.status = "interrupted" if exc_type is KeyboardInterrupt else ("error" if exc_type else "done")
        try:
            self._snapshot_pool()
            with self._lock:
                self.running, self.waiting = len(self.engine.scheduler.running), len(self.engine.scheduler.waiting)
        finally:
            if self.live is not None:
                self._stop_live()
            elif exc_type is None or exc_type is KeyboardInterrupt:
                self.console.file.write(self.summary() + "\n")
                self.console.file.flush()
        return False                            # never swallow an exception (Ctrl-C goes on to run.py)

    # ------------------------------------------------------------------ numbers shared by both views

    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or time.perf_counter()) - self.started

    def rates(self) -> dict[str, tuple[float | None, float | None]]:
        """kind -> (tok/s over the last second or None when idle, tok/s over the whole run or None)."""
        out = {}
        for kind in ("prefill", "decode"):
            tokens, secs = self.totals[kind]
            w_tok = sum(t for _, k, t, _ in self.window if k == kind)
            w_sec = sum(s for _, k, _, s in self.window if k == kind)
            live = self.ended is None and self.window and time.perf_counter() - self.window[-1][0] <= RATE_WINDOW_S
            out[kind] = (w_tok / w_sec if live and w_sec else None, tokens / secs if secs else None)
        return out

    def text_of(self, r: RequestView) -> str:
        if r.final_text is not None:
            return r.final_text
        n = len(r.token_ids)
        cached = self._text_cache.get(r.rid)
        if cached is None or cached[0] != n:
            text = self.engine.tokenizer.decode(r.token_ids[:n]).rstrip("\ufffd")
            self._text_cache[r.rid] = cached = (n, text)
        return cached[1]

    def token_str(self, token_id: int) -> str:
        return repr(self.engine.tokenizer.decode([token_id], skip_special_tokens=False))

    def spec_rate(self) -> tuple[float, float] | None:
        """(accepted, proposed) draft tokens when speculative decoding reported any: the engine's
        spec_* stats (07's SpecDecodingStats.summary), else what the spec_* events carried."""
        st = self.spec_stats
        acc, prop = st.get("spec_accepted_tokens"), st.get("spec_draft_tokens")
        if acc is None or prop is None:
            acc, prop = self.spec.get("accepted"), self.spec.get("draft_tokens")
        if acc is None or not prop:
            return None
        return float(acc), float(prop)

    def mib(self, blocks: int) -> float:
        return blocks * self.bytes_per_block / 2**20

    # ------------------------------------------------------------------ plain summary (not a terminal)

    def summary(self) -> str:
        with self._lock:
            rates = self.rates()
            reqs = list(self.requests.values())
            pool = dict(self.pool)
            spec = self.spec_rate()
            lines = [f"dashboard summary ({self.status}): {len(reqs)} requests, "
                     f"{sum(r.phase == 'finished' for r in reqs)} finished, "
                     f"{sum(len(r.token_ids) for r in reqs)} tokens generated in {self.step} steps, {self.elapsed():.2f} s"]
            for kind in ("prefill", "decode"):
                tokens, _ = self.totals[kind]
                avg = rates[kind][1]
                lines.append(f"  {kind}: {tokens} tokens, " + (f"{avg:.1f} tok/s average" if avg else "no steps"))
            lines.append(f"  KV pool: {self.num_blocks} blocks x {self.block_size} tokens "
                         f"({self.mib(self.num_blocks):.1f} MiB), peak {self.peak_used} used; at the end "
                         f"{pool['used']} used, {pool['cached']} cached, {pool['free']} free")
            rate = 100 * self.hit_tokens / self.admitted_tokens if self.admitted_tokens else 0.0
            lines.append(f"  prefix cache: {self.hit_tokens} of {self.admitted_tokens} admitted tokens hit ({rate:.1f}%)")
            lines.append(f"  scheduler: {self.preemptions} preemptions")
            if spec is not None:
                lines.append(f"  speculative: {spec[0]:.0f} of {spec[1]:.0f} draft tokens accepted "
                             f"({100 * spec[0] / spec[1]:.1f}%)")
            for r in reqs:
                text = one_line(self.text_of(r))
                lines.append(f"  [{r.rid}] {r.phase}{' (' + r.finish_reason + ')' if r.finish_reason else ''}, "
                             f"{len(r.token_ids)} tokens: {text[:70]}{'…' if len(text) > 70 else ''}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ the screen (render thread)

    def render(self):
        with self._lock:
            return Group(self._header(), self._top_row(), self._pool_panel(), self._requests_panel())

    def _header(self) -> Text:
        e = self.engine
        style = {"done": "bold green", "interrupted": "bold red", "error": "bold red"}.get(self.status, "bold yellow")
        reqs = self.requests.values()
        return Text.assemble(("nano-vllm-py", "bold"), f" · {self.model_name} · {e.device} "
                             f"{str(e.dtype).removeprefix('torch.')} · step {self.step} · {self.elapsed():.1f} s · ",
                             (f"{self.status}: {sum(r.phase == 'finished' for r in reqs)}/{len(self.requests)} finished",
                              style))

    def _top_row(self) -> Table:
        grid = Table.grid(expand=True, padding=(0, 1))
        grid.add_column(width=24)
        grid.add_column(width=28)
        grid.add_column(ratio=1)
        grid.add_row(self._throughput_panel(), self._scheduler_panel(), self._candidates_panel())
        return grid

    def _throughput_panel(self) -> Panel:
        t = Table.grid(padding=(0, 1))
        t.add_column()
        t.add_column(justify="right")
        t.add_column(justify="right")
        t.add_row("[dim]tok/s[/]", "[dim]now[/]", "[dim]average[/]")
        fmt = lambda x: "–" if x is None else f"{x:,.1f}"   # noqa: E731
        for kind, (now, avg) in self.rates().items():
            t.add_row(kind, fmt(now), fmt(avg))
        t.add_row("tokens", "", f"{self.totals['prefill'][0]} + {self.totals['decode'][0]}")
        spec = self.spec_rate()
        if spec is not None:
            t.add_row("spec ok", f"{100 * spec[0] / spec[1]:.0f}%", f"{spec[0]:.0f}/{spec[1]:.0f}")
        return Panel(t, title="throughput", title_align="left")

    def _scheduler_panel(self) -> Panel:
        preempted_now = sum(r.phase == "preempted" for r in self.requests.values())
        t = Table.grid(padding=(0, 1))
        t.add_column(no_wrap=True)
        t.add_column(no_wrap=True)
        t.add_row("waiting", str(self.waiting))
        t.add_row("running", str(self.running))
        t.add_row("preempted", f"{preempted_now} now, {self.preemptions} total")
        t.add_row("batch", f"{self.last_batch[0]} seq, {self.last_batch[1]} tok")
        return Panel(t, title="scheduler queues", title_align="left")

    def _candidates_panel(self) -> Panel:
        if self.top is None:
            return Panel(Text("(no token sampled yet)", style="dim"), title="next-token candidates", title_align="left")
        rid, position, chosen, prob, top = self.top
        t = Table.grid(padding=(0, 1))
        t.add_column(no_wrap=True, max_width=14, overflow="ellipsis")
        t.add_column(no_wrap=True)
        t.add_column(justify="right", no_wrap=True)
        t.add_column(no_wrap=True)
        scale = 10 if self.console.width >= 100 else 0          # bars only where there is room
        for token_id, p in top:
            t.add_row(Text(self.token_str(token_id)), Text("█" * max(1, round(p * scale)) if scale and p >= 0.005 else "",
                                                           style="cyan"), f"{p:.1%}", "✓" if token_id == chosen else "")
        if chosen not in [i for i, _ in top]:
            t.add_row(Text(self.token_str(chosen)), "", f"{prob:.1%}", "✓")
        return Panel(t, title="next-token candidates", title_align="left",
                     subtitle=f"req {rid} · pos {position} · ✓ sampled", subtitle_align="right")

    def _pool_panel(self) -> Panel:
        pool = self.pool
        cells, per_cell = pool["cells"], pool["per_cell"]
        grid = Text()
        for i, state in enumerate(cells):
            if i and i % pool["width"] == 0:
                grid.append("\n")
            if state is None:
                grid.append("·", style="dim")
            elif state == -1:
                grid.append("▒", style="yellow")
            elif state == -2:
                grid.append("▓", style="bold white")
            else:
                grid.append("█", style=COLORS[state % len(COLORS)])
        rate = 100 * self.hit_tokens / self.admitted_tokens if self.admitted_tokens else 0.0
        counts = Text.assemble(
            ("█ used ", "cyan"), f"{pool['used']} ({self.mib(pool['used']):.1f} MiB)  ",
            ("▒ cached ", "yellow"), f"{pool['cached']} ({self.mib(pool['cached']):.1f} MiB)  ",
            ("· free ", "dim"), f"{pool['free']} ({self.mib(pool['free']):.1f} MiB)  ",
            ("▓ shared", "bold white"),
            f"\npeak {self.peak_used} used · prefix cache: {self.hit_tokens}/{self.admitted_tokens} tokens hit "
            f"({rate:.0f}%) · {pool['hashed']} hashed blocks")
        where = f"1 cell = {per_cell} blocks" if per_cell > 1 else "1 cell = 1 block"
        return Panel(Group(grid, counts), title=f"KV pool: {self.num_blocks} blocks x {self.block_size} tokens, "
                     f"{self.mib(self.num_blocks):.1f} MiB [dim]({where}; colour = request)[/]", title_align="left")

    def _requests_panel(self) -> Panel:
        t = Table(expand=True, box=None, padding=(0, 1), show_edge=False)
        t.add_column("req", justify="right", no_wrap=True)
        t.add_column("phase", no_wrap=True)
        t.add_column("progress", no_wrap=True)
        t.add_column("tokens", justify="right", no_wrap=True)
        t.add_column("text so far", no_wrap=True, overflow="ellipsis", ratio=1)
        order = {"decode": 0, "prefill": 1, "preempted": 2, "waiting": 3, "finished": 4}
        reqs = sorted(self.requests.values(), key=lambda r: (order[r.phase], r.rid))
        phase_style = {"prefill": "yellow", "decode": "green", "preempted": "red", "waiting": "dim", "finished": "bold"}
        for r in reqs[:MAX_REQUEST_ROWS]:
            if r.phase in ("prefill", "preempted", "waiting"):
                done, total, what = r.computed, r.target, f"{r.computed}/{r.target} prompt"
            else:
                done, total, what = len(r.token_ids), r.max_tokens or len(r.token_ids), f"{len(r.token_ids)}/{r.max_tokens}"
            phase = r.phase + (f" ({r.finish_reason})" if r.finish_reason else "")
            prompt = r.prompt if cell_len(r.prompt) <= 16 else r.prompt[:15] + "…"
            text = TailText(prompt + " → ", one_line(self.text_of(r)))
            t.add_row(Text(str(r.rid), style=COLORS[r.rid % len(COLORS)]), Text(phase, style=phase_style[r.phase]),
                      bar(done, total, 14), what, text)
        more = len(reqs) - MAX_REQUEST_ROWS
        title = f"requests [dim]({len(reqs)}{f', {more} more not shown' if more > 0 else ''}; prompt → output)[/]"
        return Panel(t, title=title, title_align="left")


class TailText:
    """A one-line cell that shows the END of a growing text: whatever fits the column's width."""

    def __init__(self, head: str, text: str):
        self.head, self.text = head, text

    def __rich_console__(self, console, options):
        room = max(1, options.max_width - cell_len(self.head))
        yield Text.assemble((self.head, "dim"), tail_cells(self.text, room), no_wrap=True, overflow="crop")

    def __rich_measure__(self, console, options):
        return Measurement(min(options.max_width, cell_len(self.head) + 10),
                           min(options.max_width, cell_len(self.head) + cell_len(self.text)))


def tail_cells(text: str, width: int) -> str:
    """The end of text that fits in `width` terminal cells (the newest words matter most)."""
    if cell_len(text) <= width:
        return text
    out, used = [], 1
    for ch in reversed(text):
        w = cell_len(ch)
        if used + w > width:
            break
        out.append(ch)
        used += w
    return "…" + "".join(reversed(out))


def bar(done: int, total: int, width: int) -> Text:
    frac = 0.0 if total <= 0 else min(1.0, done / total)
    full = round(frac * width)
    return Text.assemble(("━" * full, "green"), ("━" * (width - full), "grey30"))
