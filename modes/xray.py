"""
modes/xray.py - `--xray`: the tensors inside the live engine, stage by stage, with their real numbers.

    python run.py --model demo --xray --prompt Hi --max-tokens 8 [--xray-every 16] [--xray-layer 0]

For an x-rayed step it prints, from the tensors of that very forward pass:

    embed_tokens          (N, hidden)         N = the step's packed tokens (several sequences back to back)
    layer L: q, k, v      (N, H, d), (N, H_kv, d), (N, H_kv, d)  after the head split and q/k-norm,
                          then q and k after RoPE at the step's positions
    layer L: attention    which earlier positions the last token of each sequence attends to most
    layer L: out, mlp     the attention block's output (o_proj) and the MLP's, the layer's residual out
    final norm, logits    (N, hidden), (S, vocab): lm_head runs only on the S rows that sample
    top-k                 the next-token candidates with their probabilities, and the one chosen
    KV pool               blocks used, bytes per token and per block, each sequence's block table

with shape, dtype, min / max / mean / std and the mean L2 norm of a vector along the last dim.
With speculative decoding the target forward also runs over each sequence's draft guesses: the
x-ray shows them in the packing, and the logits rows that verified them (`verify [i]`).

How the tensors are taken: forward hooks on the model's modules (`model.model.embed_tokens`,
`model.model.layers[L].self_attn.q_norm`, `k_norm`, `v_proj`, `o_proj`, `mlp`, `model.model.norm`,
`lm_head`, and a pre-hook on the model for its input ids and positions), so 02_model.py stays as
it is. They are registered only for the steps being x-rayed (on the `prefill`/`decode` event of
such a step) and removed at its `step_done`: the other steps run with no hook at all. The first
prefill of every request and the first decode step are x-rayed, then every `every`-th decode step.

Attention weights: the attention kernels (04's paged attention, the C++ ones in nano_kernels/csrc/,
SDPA, FlashAttention) never materialise the softmax, so the x-ray recomputes it for the chosen
layer: the captured q_norm output is rotated with 02's own RoPE at the captured positions, the
keys of every position the token can see are read (read-only) from the paged KV cache through the
sequence's block table, and softmax(q k^T / sqrt(d)) @ v is checked against the input the model's
o_proj actually got.

`needs_eager = True`: hooks do not fire inside a replayed CUDA graph or inside torch.compile'd
code, so while an observer with this flag is attached the engine runs its steps eagerly.

From Python:

    from modes.xray import XRay
    llm.observers.append(XRay(llm, rich.console.Console(), every=16, layer=0))
"""
from __future__ import annotations

import importlib
import math

import torch
from rich.text import Text

from modes.common import fmt_bytes, token_piece

qwen3 = importlib.import_module("02_model")
paged = importlib.import_module("04_paged_attention")

MARK, HEAD, FOOT = "┃ ", "┏━ x-ray ", "┗━"
SHOW_SEQS = 4           # per-sequence lines (attention, top-k, block table) for at most this many


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_stats(x: torch.Tensor) -> dict:
    """shape, dtype, min, max, mean, std, and the mean L2 norm of the vectors along the last dim."""
    f = x.detach().float()
    return dict(shape=tuple(x.shape), dtype=dtype_name(x.dtype), min=f.min().item(), max=f.max().item(),
                mean=f.mean().item(), std=f.std().item() if f.numel() > 1 else 0.0,
                norm=f.norm(dim=-1).mean().item())


class XRay:
    """Shows the tensors of x-rayed steps: the first prefill of each request, the first decode step,
    then every `every`-th decode step; `layer` is the decoder layer whose attention is opened up."""

    needs_eager = True         # hooks do not fire in CUDA graphs or compiled code: the engine runs eager

    def __init__(self, engine, console, every: int = 16, layer: int = 0, top_k: int = 5):
        num_layers = engine.model_config.num_hidden_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(f"--xray-layer {layer} is out of range: this model has {num_layers} layers, "
                             f"so the layer must be between 0 and {num_layers - 1}.")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"--xray-every must be a positive integer, got {every}.")
        self.engine, self.console = engine, console
        self.every, self.layer, self.top_k = every, layer, top_k
        self.tok = engine.tokenizer
        self.tokens: dict[int, list[int]] = {}      # each request's tokens (prompt + sampled), for labels
        self.prefilled: set[int] = set()            # requests whose first prefill was x-rayed
        self.decode_steps = 0
        self.step = None                            # the step being x-rayed (hooks armed), or None
        self.kinds: list[str] = []
        self.spans: dict[int, tuple[int, int]] = {}    # this step's (start, end) per request, from the events
        self.spans_step = self.prefill_step = None
        self.samples: list[dict] = []
        self.spec: dict[int, dict] = {}            # speculative: each request's guesses and verdict this step
        self.captured: dict[str, torch.Tensor] = {}
        self.handles: list = []
        self.hook_calls = 0                         # times a hook of ours ran (tests count them)
        self.xrayed_steps: list[int] = []
        self.lines = 0

    # ------------------------------------------------------------------ hooks

    def _arm(self, step: int) -> None:
        """Register the hooks for this step only."""
        self.step, self.kinds, self.samples, self.captured, self.spec = step, [], [], {}, {}
        if self.prefill_step == step:                # armed by its decode event: the step has prefill chunks too
            self.kinds.append("prefill")
        model = self.engine.model
        attn_layer = model.model.layers[self.layer]
        attn = attn_layer.self_attn

        def grab(name):          # a forward hook keeping a copy of the module's output for this step
            def hook(module, args, out):
                self.hook_calls += 1
                self.captured[name] = out.detach().clone()
            return hook

        def grab_inputs(module, args, kwargs):
            self.hook_calls += 1
            ids = args[0] if args else kwargs.get("input_ids")
            pos = args[1] if len(args) > 1 else kwargs.get("positions")
            if ids is not None:
                self.captured["input_ids"] = ids.detach().clone()
            if pos is not None:
                self.captured["positions"] = pos.detach().clone()

        def grab_o_input(module, args):
            self.hook_calls += 1
            self.captured["attn_o_in"] = args[0].detach().clone()

        self.handles = [
            model.register_forward_pre_hook(grab_inputs, with_kwargs=True),
            model.model.embed_tokens.register_forward_hook(grab("embed")),
            attn.q_norm.register_forward_hook(grab("q")),
            attn.k_norm.register_forward_hook(grab("k")),
            attn.v_proj.register_forward_hook(grab("v")),
            attn.o_proj.register_forward_pre_hook(grab_o_input),
            attn.register_forward_hook(grab("attn_out")),
            attn_layer.mlp.register_forward_hook(grab("mlp_out")),
            attn_layer.register_forward_hook(grab("layer_out")),
            model.model.norm.register_forward_hook(grab("norm")),
            model.lm_head.register_forward_hook(grab("logits")),
        ]

    def _disarm(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.step, self.captured = [], None, {}

    def close(self) -> None:
        """Detach cleanly (e.g. between two runs): no hook stays on the model."""
        self._disarm()

    # ------------------------------------------------------------------ events

    def on_event(self, event: str, data: dict) -> None:
        if event == "request_added":
            self.tokens[data["request_id"]] = list(data["prompt_token_ids"])
        elif event == "prefill":                     # a step's prefill event comes before its decode event
            chunks = data["chunks"]
            self.spans_step, self.spans = data["step"], {rid: (s, e) for rid, s, e in chunks}
            self.prefill_step = data["step"]
            if any(rid not in self.prefilled for rid, _, _ in chunks):
                self._want(data["step"], "prefill")
            if self.step == data["step"]:
                self.prefilled.update(rid for rid, _, _ in chunks)
        elif event == "decode":
            if self.spans_step != data["step"]:
                self.spans_step, self.spans = data["step"], {}
            self.spans.update({rid: (p, p + 1) for rid, p in zip(data["request_ids"], data["positions"])})
            self.decode_steps += 1
            if self.decode_steps == 1 or (self.decode_steps - 1) % self.every == 0:
                self._want(data["step"], f"decode {self.decode_steps}")
        elif event == "sampled":
            if data["request_id"] in self.tokens:
                self.tokens[data["request_id"]].append(data["token_id"])
            if self.step is not None:
                self.samples.append(data)
        elif event == "step_done":
            if self.step is not None:
                try:
                    self._report(data)
                finally:
                    self._disarm()
        elif event == "finished":
            self.tokens.pop(data["request_id"], None)
        elif event.startswith("spec_") and self.step is not None:
            self.spec.setdefault(data["request_id"], {}).update(data)

    def _want(self, step: int, kind: str) -> None:
        if self.step != step:
            self._arm(step)
        if kind not in self.kinds:
            self.kinds.append(kind)

    # ------------------------------------------------------------------ the report

    def _out(self, line: str, style: str = "") -> None:
        text = Text(MARK, style="cyan")
        text.append(line, style=style)
        self.console.print(text, soft_wrap=True)
        self.lines += 1

    def _segments(self) -> list[tuple[int, int, int, int]]:
        """(request, start, end, first packed row) for each sequence of the step, in packing order:
        the engine packs in scheduling order (the scheduler's running list); checked against the
        positions the model actually received."""
        running = [s.seq_id for s in self.engine.scheduler.running]
        order = sorted(self.spans, key=lambda r: running.index(r) if r in running else len(running) + r)
        segs, row = [], 0
        for rid in order:
            s, e = self.spans[rid]
            segs.append((rid, s, e, row))
            row += e - s + self._guesses(rid)
        pos = self.captured.get("positions")
        if pos is not None:
            expect = [p for rid, s, e, _ in segs for p in range(s, e + self._guesses(rid))]
            if pos.tolist() != expect:
                return []
        return segs

    def _guesses(self, rid: int) -> int:
        """Speculative decoding: the draft tokens appended to the request's span in the target forward."""
        return len(self.spec.get(rid, {}).get("draft_token_ids", ()))

    @torch.inference_mode()
    def _report(self, done: dict) -> None:
        e, mc, cap = self.engine, self.engine.model_config, self.captured
        L = self.layer
        segs = self._segments()
        self.xrayed_steps.append(self.step)
        n = int(cap["input_ids"].shape[0]) if "input_ids" in cap else sum(b - a for a, b in self.spans.values())
        packed = " · ".join((f"[{rid}] {s}..{t - 1}" if t - s > 1 else f"[{rid}] {s}") +
                            (f" + {self._guesses(rid)} guesses" if self._guesses(rid) else "") for rid, s, t, _ in segs)
        self.console.print(Text(f"{HEAD}· step {self.step} · {' + '.join(self.kinds)} · {n} packed "
                                f"{'token' if n == 1 else 'tokens'}: "
                                f"{packed or '?'} · layer {L} of {mc.num_hidden_layers} · "
                                f"{dtype_name(e.dtype)} on {e.device}", style="bold cyan"), soft_wrap=True)
        self.lines += 1

        # RoPE at the captured positions, with 02's own functions: the q and k the attention saw.
        pos = cap.get("positions")
        q_rot = k_rot = None
        if pos is not None and "q" in cap and "k" in cap:
            cos, sin = qwen3.rope_cos_sin(pos, mc.head_dim, mc.rope_theta, e.model.model.embed_tokens.weight.dtype)
            q_rot, k_rot = qwen3.apply_rope(cap["q"], cos, sin), qwen3.apply_rope(cap["k"], cos, sin)
        v = cap.get("v")
        if v is not None:
            v = v.view(v.shape[0], -1, mc.head_dim)           # the head split the attention module does
        rows = [("embed_tokens(ids)", cap.get("embed")),
                (f"L{L} q = q_norm(q_proj)", cap.get("q")),
                (f"L{L} k = k_norm(k_proj)", cap.get("k")),
                (f"L{L} v = v_proj", v),
                (f"L{L} q after RoPE", q_rot),
                (f"L{L} k after RoPE", k_rot),
                (f"L{L} attention (o_proj)", cap.get("attn_out")),
                (f"L{L} mlp", cap.get("mlp_out")),
                (f"L{L} residual out", cap.get("layer_out")),
                ("final norm", cap.get("norm")),
                ("logits (lm_head)", cap.get("logits"))]
        self._out(f"{'stage':<24} {'shape':<17} {'dtype':<8} {'min':>10} {'max':>10} {'mean':>10} {'std':>10} "
                  f"{'‖vec‖':>10}", style="bold")
        for name, t in rows:
            if t is None:
                self._out(f"{name:<24} (not captured: the hook did not fire this step)", style="dim")
                continue
            if t.numel() == 0:
                self._out(f"{name:<24} {str(tuple(t.shape)):<17} {dtype_name(t.dtype):<8} (empty: no sequence "
                          f"samples this step)", style="dim")
                continue
            s = tensor_stats(t)
            self._out(f"{name:<24} {str(s['shape']):<17} {s['dtype']:<8} {s['min']:>10.4g} {s['max']:>10.4g} "
                      f"{s['mean']:>10.4g} {s['std']:>10.4g} {s['norm']:>10.4g}")

        if pos is not None:
            inv0 = 1.0
            inv_last = mc.rope_theta ** (-(mc.head_dim - 2) / mc.head_dim)
            self._out(f"RoPE: positions {self._positions(segs, pos)}; cos/sin ({pos.shape[0]}, {mc.head_dim}); "
                      f"θ = {mc.rope_theta:,.0f}: dim pair 0 turns {inv0:g} rad per position, pair "
                      f"{mc.head_dim // 2 - 1} turns {inv_last:.2g}")
        if "q" in cap and "k" in cap:
            H, Hkv, d = cap["q"].shape[1], cap["k"].shape[1], cap["q"].shape[2]
            self._out(f"GQA: {H} query heads share {Hkv} KV heads ({H // Hkv} query heads per KV head), "
                      f"head_dim {d}; q_proj {mc.hidden_size} -> {H} × {d} = {H * d}")
        self._check_cache(segs, k_rot, v)
        self._attention(segs, q_rot)
        self._candidates(segs)
        self._pool(segs, done["num_used_blocks"])
        self.console.print(Text(FOOT, style="cyan"))
        self.lines += 1

    def _positions(self, segs, pos) -> str:
        if not segs:
            return str(pos.tolist()[:16])
        return " · ".join(f"[{rid}] {s}..{t - 1 + self._guesses(rid)}" if t - s + self._guesses(rid) > 1
                          else f"[{rid}] {s}" for rid, s, t, _ in segs)

    def _cache_rows(self, rid: int, positions) -> list[int]:
        """Flat slot of each position in the paged cache, through the request's block table."""
        bs = self.engine.config.block_size
        table = self.engine.block_manager.block_tables[rid]
        return [table[p // bs] * bs + p % bs for p in positions]

    def _check_cache(self, segs, k_rot, v) -> None:
        """The rotated keys and the values of this step must be exactly what the step wrote to the cache."""
        if not segs or k_rot is None or v is None:
            return
        kv = self.engine.kv_cache[self.layer]                           # (2, blocks, n_kv, block_size, d)
        worst = 0.0
        bs = self.engine.config.block_size
        for rid, s, t, row in segs:
            have = len(self.engine.block_manager.block_tables[rid]) * bs   # rejected guesses may be rolled back
            end = min(t + self._guesses(rid), have)
            slots = torch.tensor(self._cache_rows(rid, range(s, end)), device=kv.device)
            k_c, v_c = paged.read_slots(kv[0], slots), paged.read_slots(kv[1], slots)
            worst = max(worst, (k_c.float() - k_rot[row:row + end - s].float()).abs().max().item(),
                        (v_c.float() - v[row:row + end - s].float()).abs().max().item())
        verdict = "identical" if worst == 0 else f"max |Δ| = {worst:.2g}"
        self._out(f"KV write: this step's k (after RoPE) and v equal what sits in the cache at their slots: {verdict}")

    def _attention(self, segs, q_rot) -> None:
        """Recompute the chosen layer's attention weights for the last token of each sequence."""
        cap = self.captured
        if not segs or q_rot is None:
            return
        kv = self.engine.kv_cache[self.layer]                           # (2, blocks, n_kv, block_size, d)
        n_kv, d = kv.shape[2], kv.shape[-1]
        o_in = cap.get("attn_o_in")
        for rid, s, t, row in segs[:SHOW_SEQS]:
            r = row + t - s - 1                                          # the sequence's last packed row
            slots = torch.tensor(self._cache_rows(rid, range(t)), device=kv.device)
            k = paged.read_slots(kv[0], slots).float()                  # (t, n_kv, d)
            v = paged.read_slots(kv[1], slots).float()
            q = q_rot[r].float()                                         # (H, d)
            H = q.shape[0]
            k, v = k.repeat_interleave(H // n_kv, dim=1), v.repeat_interleave(H // n_kv, dim=1)  # (t, H, d)
            w = (torch.einsum("hd,nhd->hn", q, k) / math.sqrt(d)).softmax(-1)          # (H, t)
            mean = w.mean(0)
            top = mean.topk(min(3, t))
            toks = self.tokens.get(rid, [])
            label = lambda p: token_piece(self.tok, toks[p]) if p < len(toks) else "?"  # noqa: E731
            best = " · ".join(f"pos {p} {label(p)} {x:.2f}" for x, p in zip(top.values.tolist(), top.indices.tolist()))
            check = ""
            if o_in is not None:
                o = torch.einsum("hn,nhd->hd", w, v).reshape(-1)
                diff = (o - o_in[r].float()).abs().max().item()
                check = f"; weights @ v vs the model's attention output: max |Δ| = {diff:.1g}"
                if o_in.dtype != torch.float32:
                    check += f" (the model computes in {dtype_name(o_in.dtype)})"
            self._out(f"attention [{rid}] pos {t - 1} {label(t - 1)} over {t} keys ({t - s} new, {s} from the "
                      f"cache), mean of {H} heads: {best}; self {mean[-1].item():.2f}{check}")
        if len(segs) > SHOW_SEQS:
            self._out(f"(and {len(segs) - SHOW_SEQS} more sequences)", style="dim")

    def _candidates(self, segs) -> None:
        """Top-k next tokens from the captured logits (one row per sampling sequence)."""
        logits = self.captured.get("logits")
        samples = self.samples
        if self.spec:
            return self._verification(segs, logits)
        if logits is None or logits.shape[0] != len(samples):
            for smp in samples[:SHOW_SEQS]:      # fall back on the engine's own top candidates
                self._out(f"next token [{smp['request_id']}]: " + " · ".join(
                    f"{token_piece(self.tok, t)} {p:.3f}" for t, p in smp["top"]) +
                    f" -> {token_piece(self.tok, smp['token_id'])}")
            return
        probs = logits.float().softmax(-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        for i, smp in enumerate(samples[:SHOW_SEQS]):
            cands = " · ".join(f"{token_piece(self.tok, t)} {p:.3f}"
                               for t, p in zip(top_i[i].tolist(), top_p[i].tolist()))
            tid = smp["token_id"]
            how = "greedy" if smp["greedy"] else "sampled"
            self._out(f"next token [{smp['request_id']}] (softmax of {logits.shape[1]:,} logits): {cands} -> "
                      f"{tid} {token_piece(self.tok, tid)} ({how}, p = {probs[i, tid].item():.3f})")
        if len(samples) > SHOW_SEQS:
            self._out(f"(and {len(samples) - SHOW_SEQS} more)", style="dim")

    def _verification(self, segs, logits) -> None:
        """Speculative decoding: the target's logits rows are the last scheduled token and each guess of
        every sampling sequence; row j says what the target would put at the guess j+1's place."""
        rows = [rid for rid, *_ in segs if rid in self.spec or any(s["request_id"] == rid for s in self.samples)]
        need = sum(self._guesses(rid) + 1 for rid in rows)
        probs = logits.float().softmax(-1) if logits is not None and logits.shape[0] == need else None
        offset = 0
        for rid in rows:
            k, info = self._guesses(rid), self.spec.get(rid, {})
            guesses = info.get("draft_token_ids", [])
            kept = [s["token_id"] for s in self.samples if s["request_id"] == rid]
            if probs is not None and rid in [r for r, *_ in segs[:SHOW_SEQS]]:
                top_p, top_i = probs[offset:offset + k + 1].max(-1)
                says = " · ".join(f"{token_piece(self.tok, t)} {p:.2f}"
                                  for t, p in zip(top_i.tolist(), top_p.tolist()))
                self._out(f"verify [{rid}]: {k + 1} logits rows (the last token + {k} guesses), the target's top-1 "
                          f"at each: {says}")
            if guesses:
                a = info.get("num_accepted", 0)
                said = " · ".join(token_piece(self.tok, t) for t in guesses)
                self._out(f"  draft guessed {said} -> {a} of {k} accepted{', bonus' if info.get('bonus') else ''}; "
                          f"kept {' · '.join(token_piece(self.tok, t) for t in kept)}")
            offset += k + 1

    def _pool(self, segs, used: int) -> None:
        e, bm = self.engine, self.engine.block_manager
        cache = e.kv_cache
        bs = e.config.block_size
        per_token = cache[:, :, 0, :, 0].numel() * cache.element_size()  # every layer's k and v of one slot
        self._out(f"KV pool: kv_cache {tuple(cache.shape)} {dtype_name(cache.dtype)} = "
                  f"{fmt_bytes(cache.numel() * cache.element_size())}; {used} of {bm.num_blocks} blocks used "
                  f"({fmt_bytes(used * bs * per_token)}), {fmt_bytes(per_token)} per token, "
                  f"{fmt_bytes(bs * per_token)} per {bs}-token block")
        for rid, s, t, _ in segs[:SHOW_SEQS]:
            table = bm.block_tables.get(rid, [])
            self._out(f"  [{rid}] block table {table}: {t} of {len(table) * bs} slots filled")
