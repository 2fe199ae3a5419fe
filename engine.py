"""
engine.py - the whole serving engine, assembled from the numbered files.

    requests ──> Scheduler (05) ──> ModelRunner ──> Sampler (06) ──> stop checks ──> outputs
                    │   picks this step's tokens      │ packs them, runs Qwen3 (02) over
                    │   under the token budget        │ the paged KV cache (04)
                    └── BlockManager (04): blocks, prefix cache, preemption

One call to `LLMEngine.step()` is one model forward over every token the scheduler picked:
prefill chunks of new requests and one token for each decoding request, packed back to back.
Logits are computed only at the positions that sample (the last token of each sequence whose
KV is now complete), the sampler draws one token for each, and finished requests leave the
batch at once: the next step may already contain a request that arrived meanwhile.

Hook points: `engine.observers` holds objects with an `on_event(event: str, data: dict)` method; the
teaching modes (modes/) subscribe there, and the engine never imports them. Every emission is behind
`if self.observers:`: with nobody listening, no strings, no dicts, no `.item()`. The events, in order:

    tokenized         request_id, text, token_ids                    (a text prompt was encoded)
    request_added     request_id, prompt, prompt_token_ids, sampling, waiting
    preempted         request_id, num_tokens, freed_blocks, num_free_blocks
    admitted          request_id, num_tokens, cached_tokens, hit_blocks, preempted_before
    blocks_allocated  request_id, blocks (new), block_table, num_free_blocks
    prefill           step, chunks [(request_id, start, end)], num_tokens
    decode            step, request_ids, positions
    spec_proposed     request_id, draft_token_ids, draft_probs (q of each)     (speculative only, before its sampled)
    spec_verified     request_id, num_draft_tokens, num_accepted, target_probs (p of each draft token),
                      rejected_position (None: all accepted), token_id (the replacement, or the bonus), bonus
    sampled           request_id, token_id, prob, top [(token_id, prob)] (the model's softmax), position, greedy
                      (speculative: one per token kept, accepted draft tokens first)
    step_done         step, seconds, num_tokens, num_seqs, num_used_blocks, num_free_blocks, running, waiting
    finished          request_id, output, reason, freed_blocks, cached_blocks, num_free_blocks

Speed, each beside the plain path it is tested against:
  - nano_kernels/ (`nano_kernels.plug_in` at startup): on a CPU, C++ attention that reads the paged
    cache in place, a GEMV for decode rows, one-call norms, weights and KV pool on huge pages;
  - CUDA graphs (CUDA, unless `enforce_eager`): decode steps replayed per batch and table-width bucket;
  - `compile`: torch.compile of steps of up to max_num_seqs tokens padded to power-of-two buckets.
"""
from __future__ import annotations

import importlib
import itertools
import os
import time
from dataclasses import dataclass, field

import torch

import nano_kernels
from nano_kernels.attention import StepAttention
from nano_kernels.memory import check_fits, huge_page_zeros, keep_freed_memory_mapped

tokenize = importlib.import_module("01_tokenize")
qwen3 = importlib.import_module("02_model")
kv_cache_lesson = importlib.import_module("03_kv_cache")
paged = importlib.import_module("04_paged_attention")
sched = importlib.import_module("05_scheduler")
sampling = importlib.import_module("06_sampling")
spec = importlib.import_module("07_speculative")

SamplingConfig = sampling.SamplingConfig
Sequence = sched.Sequence


# The KV pool's default size on a CPU, in GiB: a laptop's share (--kv-cache-memory-gb changes it).
CPU_KV_CACHE_GB = 1.0


@dataclass
class EngineConfig:
    model: str = "Qwen/Qwen3-0.6B"        # a local HF folder, a hub id, or a preset: "demo", "tiny"
    dtype: str = "auto"                    # auto | float32 | bfloat16 | float16
    device: str = "auto"                   # auto | cpu | cuda | mps
    block_size: int = 16
    num_kv_blocks: int | None = None       # None: from kv_cache_memory_gb, or free GPU memory on CUDA
    kv_cache_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None       # None: min(the model's max positions, 4096)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False            # CUDA: no CUDA graphs
    compile: bool = False                  # CPU/CUDA: torch.compile the model
    speculative: bool = False              # 07: a draft model proposes, the target verifies
    draft_model: str | None = None         # like `model`; None: the target's first layers (07.early_exit_draft)
    num_speculative_tokens: int = 4        # k: draft tokens per sequence per step

    def validate(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "num_kv_blocks", "num_speculative_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.dtype not in ("auto", *qwen3.DTYPES):
            raise ValueError(f"dtype {self.dtype!r} is not one of auto, {', '.join(qwen3.DTYPES)}")
        if self.draft_model is not None and not self.speculative:
            raise ValueError("draft_model is set but speculative is off: set speculative=True")


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None       # "stop" | "length" | "error" (the message in `error`); running: None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def bucket(n: int, limit: int) -> int:
    """The smallest power of two >= n, capped at limit: the few shapes compiled code and CUDA graphs are made for."""
    return min(1 << (n - 1).bit_length(), max(limit, n))


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None):
        config.validate()
        self.config = config
        self.device = qwen3.resolve_device(config.device)
        self.dtype = qwen3.resolve_dtype(config.dtype, self.device)
        self.model_path = folder = qwen3.resolve_model(config.model)
        cpu = self.device.type == "cpu"
        if cpu:
            keep_freed_memory_mapped()
        # the weights are read straight into their final place (on a CPU: huge pages), then the
        # fast paths of this machine are plugged in (nano_kernels/: module swaps, the attention backend)
        self.model = qwen3.load_model(folder, self.dtype, self.device,
                                      allocate=nano_kernels.weight_allocator(self.device, config.compile))
        self.fast = nano_kernels.plug_in(self.model, self.device, self.dtype, config.block_size, config.compile)
        self.model_config = mc = self.model.config
        self.weights_bytes = sum(p.nbytes for p in self.model.parameters())   # a tied lm_head counted once
        self.tokenizer = tokenizer or tokenize.load_tokenizer(folder)
        self.max_model_len = min(config.max_model_len or 4096, mc.max_position_embeddings)
        # 07: the draft comes before the pool is sized (its weights and its own KV pool take memory too)
        self.draft_model = spec.load_draft(self.model, folder, self.tokenizer, config.draft_model,
                                           self._load_draft) if config.speculative else None

        bytes_per_block = mc.kv_bytes_per_token(self.dtype) * config.block_size
        if self.draft_model is not None:   # the draft's pool has as many blocks as the target's
            bytes_per_block += self.draft_model.config.kv_bytes_per_token(self.dtype) * config.block_size
        self.num_kv_blocks = config.num_kv_blocks or self._auto_num_blocks(bytes_per_block)
        self.kv_cache_bytes = self.num_kv_blocks * bytes_per_block
        max_blocks_per_seq = -(-self.max_model_len // config.block_size)
        if self.num_kv_blocks < max_blocks_per_seq:
            fmt = kv_cache_lesson.fmt_bytes
            raise ValueError(f"a KV pool of {self.num_kv_blocks} blocks ({fmt(self.kv_cache_bytes)}) cannot hold one "
                             f"sequence of max_model_len {self.max_model_len} ({max_blocks_per_seq} blocks, "
                             f"{fmt(max_blocks_per_seq * bytes_per_block)}): raise --kv-cache-memory-gb or "
                             "--num-kv-blocks, or lower --max-model-len")
        cuda_graphs = self.device.type == "cuda" and not config.enforce_eager
        # CUDA graphs pad decode batches with rows that write to one extra scratch block
        self.kv_cache = paged.allocate_kv_cache(mc, self.num_kv_blocks + cuda_graphs, config.block_size,
                                                self.dtype, "meta" if cpu else self.device)
        if cpu:   # the pool on 2 MiB pages (its blocks are gathered from all over it), if the memory is there
            check_fits(self.kv_cache_bytes, "the KV pool", "lower --kv-cache-memory-gb or --num-kv-blocks")
            self.kv_cache = huge_page_zeros(self.kv_cache.shape, self.dtype)
        backend = self.fast.attention or paged.TORCH_SDPA
        self.block_manager = paged.BlockManager(self.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = sched.Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.block_manager, self.kv_cache, self.device, max_blocks_per_seq,
                                  config.max_num_seqs, compile=config.compile, cuda_graphs=cuda_graphs,
                                  cache_dir=qwen3.cache_root(), backend=backend, decode_op=self.fast.decode_kernel)
        self.sampler = sampling.Sampler()
        self.speculative = None
        if self.draft_model is not None:
            draft = spec.DraftRunner(self.draft_model, self.num_kv_blocks, config.block_size,
                                     config.enable_prefix_caching, backend)
            self.speculative = spec.SpeculativeDecoder(self.model, self.kv_cache, self.block_manager, draft,
                                                       config.num_speculative_tokens, self.max_model_len, backend)
        self.observers: list = []
        self._observed_blocks: dict[int, list[int]] = {}   # block tables as observers last saw them
        self._ids = itertools.count()
        self._requests: dict[int, tuple[Sequence, RequestOutput]] = {}
        self.stats = dict(prompt_tokens=0, generated_tokens=0, prefill_tokens=0, prefill_time_s=0.0,
                          decode_tokens=0, decode_time_s=0.0, steps=0, kv_blocks_peak=0)

    def _load_draft(self, folder: str):
        """A draft checkpoint, with the same fast paths and pages as the target."""
        draft = qwen3.load_model(folder, self.dtype, self.device, allocate=nano_kernels.weight_allocator(self.device))
        nano_kernels.plug_in(draft, self.device, self.dtype, self.config.block_size)
        return draft

    def _auto_num_blocks(self, bytes_per_block: int) -> int:
        if self.config.kv_cache_memory_gb is not None:
            return max(1, int(self.config.kv_cache_memory_gb * 2**30 // bytes_per_block))
        if self.device.type == "cuda":   # what others leave of the card, less 1 GiB for activations
            free, total = torch.cuda.mem_get_info(self.device)
            return max(1, int((total * self.config.gpu_memory_utilization - (total - free) - 2**30) // bytes_per_block))
        # CPU: CPU_KV_CACHE_GB, or less where every sequence slot at max length needs less
        want = self.config.max_num_seqs * -(-self.max_model_len // self.config.block_size)
        return max(1, min(want, int(CPU_KV_CACHE_GB * 2**30 // bytes_per_block)))

    # --------------------------------------------------------------- requests

    def add_request(self, prompt: str | list[int], params: SamplingConfig | None = None) -> int:
        """Queue one request (a text, encoded as is, or token ids). Raises ValueError for bad
        parameters; nothing is queued then, and the requests already running are untouched."""
        params = params or SamplingConfig()
        params.validate()
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, so at most "
                             f"{self.max_model_len - 1} prompt tokens fit")
        bad = [i for i in ids if not 0 <= i < self.model_config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.model_config.vocab_size})")
        rid = next(self._ids)
        seq = Sequence(rid, list(ids), len(ids), params)    # its own list: it grows as tokens come
        self._requests[rid] = (seq, RequestOutput(rid, text, list(ids)))
        self.scheduler.add(seq)
        self.stats["prompt_tokens"] += len(ids)
        if self.observers:
            if text is not None:
                self._emit("tokenized", request_id=rid, text=text, token_ids=ids)
            self._emit("request_added", request_id=rid, prompt=text, prompt_token_ids=ids, sampling=params,
                       waiting=len(self.scheduler.waiting))
        return rid

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # --------------------------------------------------------------- one step

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, apply stop rules. Returns the outputs of the
        requests that got a new token this step (finished ones have finish_reason set)."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        if self.observers:
            self._observe_schedule(batch)
        if self.speculative is not None:
            return self._speculative_step(batch)
        prefill = sum(n for seq, n in zip(batch.seqs, batch.num_new_tokens) if seq.is_prefill)
        t0 = time.perf_counter()
        eager = bool(self.observers) and any(getattr(o, "needs_eager", False) for o in self.observers)
        logits, samplers = self.runner.run(batch, eager)
        gens = [sampling.make_generator(s.sampling.seed, self.device, s.num_tokens) for s in samplers]  # one per token
        token_list = self.sampler(logits, [s.sampling for s in samplers], gens).tolist()
        dt = time.perf_counter() - t0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            if self.config.enable_prefix_caching:
                self.block_manager.commit(seq.seq_id, seq.token_ids[:seq.num_computed_tokens])
        runs = [(seq, [token] if ok else [], logits[i:i + 1])   # not finite: no token, the request fails
                for i, (seq, token, ok) in enumerate(zip(samplers, token_list, logits.isfinite().all(dim=1).tolist()))]
        return self._finish_step(batch, prefill, dt, runs)

    def _speculative_step(self, batch) -> list[RequestOutput]:
        """step() with speculative decoding (07_speculative.SpeculativeDecoder does the model work, always
        eager): the prefill chunks as usual, and every sequence that samples gets up to k draft tokens
        checked in the same target forward, so it may gain several tokens. The stop rules see them one at
        a time: a stop inside the run drops the tokens after it (max_tokens: k is capped beforehand)."""
        prefill = sum(n for seq, n in zip(batch.seqs, batch.num_new_tokens) if seq.is_prefill)
        t0 = time.perf_counter()
        verified = self.speculative.step(batch)
        dt = time.perf_counter() - t0
        if self.observers:
            for v in verified:
                self._observe_verified(v)
        return self._finish_step(batch, prefill, dt, [(v.seq, v.token_ids, v.target_logits) for v in verified])

    def _finish_step(self, batch, prefill: int, seconds: float, runs) -> list[RequestOutput]:
        """Each (sequence, its new tokens, their logits) through the stop rules one token at a time (a stop drops
        the tokens after it; no tokens: its logits were not finite, it fails alone); statistics; the finished leave."""
        outputs, finished, generated = [], [], 0
        for seq, tokens, logits in runs:
            out = self._requests[seq.seq_id][1]
            if not tokens:
                out.finish_reason, out.error = "error", "the model's logits are not finite (NaN or inf)"
                finished.append(seq)
            if self.observers:
                probs = logits.softmax(-1)                                # the model's own distribution
                top_p, top_i = probs.topk(5, dim=-1)
            for i, token in enumerate(tokens):
                if self.observers:
                    self._emit("sampled", request_id=seq.seq_id, token_id=token, prob=float(probs[i, token]),
                               top=list(zip(top_i[i].tolist(), top_p[i].tolist())), position=seq.num_tokens,
                               greedy=seq.sampling.greedy)
                seq.token_ids.append(token)
                out.token_ids.append(token)
                generated += 1
                out.finish_reason = self._stop_reason(seq, out)
                if out.finished:
                    finished.append(seq)
                    break
            outputs.append(out)
        self._account(batch, prefill, seconds, generated)
        for seq in finished:
            out = self._requests.pop(seq.seq_id)[1]
            blocks = list(seq.block_table)
            self.scheduler.finish(seq)
            if self.speculative is not None:
                self.speculative.free(seq.seq_id)
            if self.observers:
                self._observe_finish(seq, out, blocks)
        return outputs

    # --------------------------------------------------------------- events (only with observers)

    def _emit(self, event: str, **data) -> None:
        for observer in self.observers:
            observer.on_event(event, data)

    def _observe_schedule(self, batch) -> None:
        bm, known = self.block_manager, self._observed_blocks
        for seq in batch.preempted:
            freed = known.pop(seq.seq_id, [])
            self._emit("preempted", request_id=seq.seq_id, num_tokens=seq.num_tokens, freed_blocks=freed,
                       num_free_blocks=bm.num_free_blocks)
        step = self.stats["steps"] + 1
        chunks, decodes = [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.seq_id not in known:      # admitted this step: the prefix-cache lookup just happened
                known[seq.seq_id] = []
                self._emit("admitted", request_id=seq.seq_id, num_tokens=seq.num_tokens,
                           cached_tokens=seq.num_cached_tokens,
                           hit_blocks=list(seq.block_table[:seq.num_cached_tokens // bm.block_size]),
                           preempted_before=seq.num_preemptions)
            new_blocks = seq.block_table[len(known[seq.seq_id]):]
            if new_blocks:
                self._emit("blocks_allocated", request_id=seq.seq_id, blocks=list(new_blocks),
                           block_table=list(seq.block_table), num_free_blocks=bm.num_free_blocks)
            known[seq.seq_id] = list(seq.block_table)
            span = (seq.seq_id, seq.num_computed_tokens, seq.num_computed_tokens + n)
            (chunks if seq.is_prefill else decodes).append(span)
        if chunks:
            self._emit("prefill", step=step, chunks=chunks, num_tokens=sum(e - s for _, s, e in chunks))
        if decodes:
            self._emit("decode", step=step, request_ids=[r for r, _, _ in decodes],
                       positions=[s for _, s, _ in decodes])

    def _observe_verified(self, v) -> None:
        if not v.draft_token_ids or not v.token_ids:
            return   # no guesses this step (k capped to 0): a plain sample, reported by `sampled` alone
        k, a = len(v.draft_token_ids), v.num_accepted
        self._emit("spec_proposed", request_id=v.seq.seq_id, draft_token_ids=v.draft_token_ids,
                   draft_probs=v.draft_probs)
        self._emit("spec_verified", request_id=v.seq.seq_id, num_draft_tokens=k, num_accepted=a,
                   target_probs=v.target_probs, rejected_position=a if a < k else None,
                   token_id=v.token_ids[-1], bonus=a == k)

    def _observe_finish(self, seq, out, blocks) -> None:
        self._observed_blocks.pop(seq.seq_id, None)
        bm = self.block_manager
        self._emit("finished", request_id=seq.seq_id, output=out, reason=out.finish_reason,
                   freed_blocks=blocks, cached_blocks=[b for b in blocks if bm.is_cached(b)],
                   num_free_blocks=bm.num_free_blocks)

    def _account(self, batch, prefill: int, seconds: float, generated: int) -> None:
        """The step's statistics (and `step_done`). A step with any prefill counts as prefill time (it
        is dominated by it); a decode step's tokens are the tokens it produced (speculation's show)."""
        st = self.stats
        st["steps"] += 1
        st["generated_tokens"] += generated
        if prefill:
            st["prefill_tokens"] += prefill
            st["prefill_time_s"] += seconds
        else:
            st["decode_tokens"] += generated
            st["decode_time_s"] += seconds
        st["kv_blocks_peak"] = max(st["kv_blocks_peak"], self.block_manager.num_used_blocks)
        if self.observers:
            self._emit("step_done", step=st["steps"], seconds=seconds, num_tokens=batch.num_batched_tokens,
                       num_seqs=len(batch.seqs), num_used_blocks=self.block_manager.num_used_blocks,
                       num_free_blocks=self.block_manager.num_free_blocks, running=len(self.scheduler.running),
                       waiting=len(self.scheduler.waiting))

    def _stop_reason(self, seq: Sequence, out: RequestOutput) -> str | None:
        p: SamplingConfig = seq.sampling
        token = seq.token_ids[-1]
        if (not p.ignore_eos and token in self.tokenizer.eos_token_ids) or token in p.stop_token_ids:
            out.text = self.tokenizer.decode(out.token_ids)
            return "stop"
        text = self.tokenizer.decode(out.token_ids)
        cut = min([i for i in (text.find(s) for s in p.stop) if i != -1], default=-1)   # the first stop string in it
        if cut != -1:                                                                  # ends the text just before it
            out.text = text[:cut]
            return "stop"
        out.text = text
        if len(out.token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    # --------------------------------------------------------------- conveniences

    def generate(self, prompts, params: SamplingConfig | list[SamplingConfig] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; outputs in the order of the prompts."""
        final = {}
        for _, out in self.stream(prompts, params):
            if out.finished:
                final[out.request_id] = out
        return [final[rid] for rid in sorted(final)]

    def stream(self, prompts, params=None):
        """Add the prompts, then yield (text_delta, output) each time a request gets a token. text_delta holds back
        an incomplete UTF-8 character and the longest tail that begins a stop string: the deltas add up to the text."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        for prompt, p in zip(prompts, params_list):
            self.add_request(prompt, p)
        shown: dict[int, int] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                stops = [] if out.finished else self._requests[out.request_id][0].sampling.stop
                text = out.text if out.finished else out.text.rstrip("\ufffd")
                text = text[:len(text) - max([n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])] or [0])]
                start = shown.get(out.request_id, 0)
                shown[out.request_id] = max(start, len(text))
                yield text[start:], out

    def stats_summary(self) -> dict:
        """The run's figures (run.py's --output json "stats"); 07's spec_* counts only with speculation on."""
        st = self.stats
        rate = lambda kind: round(st[f"{kind}_tokens"] / st[f"{kind}_time_s"], 2) if st[f"{kind}_time_s"] else 0.0  # noqa: E731
        return {"prompt_tokens": st["prompt_tokens"], "generated_tokens": st["generated_tokens"],
                "prefill_tokens_per_s": rate("prefill"), "decode_tokens_per_s": rate("decode"),
                "prefix_cache_hit_tokens": self.block_manager.prefix_hit_tokens,
                "preemptions": self.scheduler.num_preemptions, "kv_blocks_total": self.num_kv_blocks,
                "kv_blocks_peak": st["kv_blocks_peak"], "steps": st["steps"],
                **(self.speculative.stats.summary() if self.speculative is not None else {})}


class ModelRunner:
    """Packs a scheduled batch into flat tensors, runs the model over the paged KV cache and
    returns logits for the positions that sample. Three ways to run the model: eager (the
    reference), compiled (`compile`: steps of up to max_num_seqs tokens, padded to buckets; on a CPU
    with the C++ decode kernel, decode steps only, their attention one C++ op), and decode-only CUDA
    graphs (on CUDA unless `enforce_eager`), which capture the compiled step under `compile`.
    Only short steps are compiled: in a decode step the ~60 small ops per layer between the matrix
    products are a large share, and fusing them pays; a prefill step is GEMMs on hundreds of rows."""

    def __init__(self, model, block_manager: paged.BlockManager, kv_cache,
                 device: torch.device, max_blocks_per_seq: int, max_num_seqs: int,
                 compile: bool = False, cuda_graphs: bool = False, cache_dir: str = "",
                 backend: paged.AttentionBackend = paged.TORCH_SDPA, decode_op: bool = False):
        self.model, self.bm, self.kv_cache, self.backend = model, block_manager, kv_cache, backend
        self.device = device
        self.max_num_seqs, self.max_blocks_per_seq = max_num_seqs, max_blocks_per_seq
        # decode_op (a CPU with the C++ decode kernel): every decode step's attention, eager or
        # compiled, is one C++ op, not 04's Python around the same kernel; compiled steps are decode steps
        self.decode_op = decode_op
        self.step_attention = StepAttention(kv_cache if self.decode_op else None) if compile or self.decode_op else None
        self.compiled = self.compiled_logits = None
        if compile:
            # CPU: every bucket its own graph, GEMMs autotuned for its shape. CUDA: torch.compile's
            # default, the batch becomes a dynamic size after the second bucket, so two builds of
            # the Triton kernels serve every batch size (cuBLAS picks its GEMM per shape at run time).
            dynamic = False if device.type == "cpu" else None
            if device.type == "cpu":
                nano_kernels.configure_cpu_inductor(os.path.join(cache_dir, "inductor"))
            # No guards on the modules: the model never changes after loading, and checking its
            # parameters and submodules before every call costs more than a small step's kernels.
            # The inputs' shapes still pick the bucket's graph, and the step attention's key the
            # engine's (StepAttention.attend).
            options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
            self.compiled = torch.compile(model, dynamic=dynamic, options=options)
            self.compiled_logits = torch.compile(model.compute_logits, dynamic=dynamic, options=options)
        # the last block of the pool is the CUDA graphs' scratch block (LLMEngine allocates num_kv_blocks + 1)
        self.graph_decoder = CUDAGraphDecoder(model, kv_cache, block_manager.block_size, max_blocks_per_seq,
                                              max_num_seqs, kv_cache.shape[2] - 1, capture=True,
                                              forward=self.run_compiled if compile else None) \
            if cuda_graphs else None

    def prepare(self, batch) -> tuple:
        """The step's flat inputs: input_ids and positions (N,), the paged-attention context
        (slot_mapping, block_tables, context_lens, cu_seqlens_q: see 04), the packed indices of
        the positions whose logits are needed, and the sequences they belong to."""
        input_ids, positions, spans, logits_indices, samplers = [], [], [], [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            spans.append((seq.seq_id, start, end))
            if end == seq.num_tokens:       # the sequence's last token: its logits give the next one
                logits_indices.append(len(input_ids) - 1)
                samplers.append(seq)
        ctx = paged.PagedContext.from_spans(self.kv_cache, self.bm, spans, backend=self.backend)
        as_tensor = lambda x: torch.tensor(x, dtype=torch.int64, device=self.device)  # noqa: E731
        return as_tensor(input_ids), as_tensor(positions), ctx, as_tensor(logits_indices), samplers

    def forward(self, input_ids, positions, ctx, eager: bool = False) -> torch.Tensor:
        """Final hidden states (N, hidden) of the step's tokens, by the fastest allowed path."""
        if not eager and self.graph_decoder is not None and not ctx.is_prefill \
                and input_ids.shape[0] <= self.graph_decoder.max_batch:
            return self.graph_decoder.run(input_ids, positions, ctx.slot_mapping, ctx.block_tables, ctx.context_lens)
        n = input_ids.shape[0]
        if eager or (self.decode_op and ctx.is_prefill):
            return self.model(input_ids, positions, ctx)
        if self.compiled is not None and n <= self.max_num_seqs:
            pad = bucket(n, self.max_num_seqs) - n
            hidden = self.run_compiled(torch.nn.functional.pad(input_ids, (0, pad)),
                                       torch.nn.functional.pad(positions, (0, pad)), ctx, num_tokens=n)
            return hidden[:n]
        if self.decode_op:                                  # a decode step, eager, its attention the op
            self.step_attention.set_step(ctx, n, n, ctx.block_tables.shape[1])
            return self.model(input_ids, positions, self.step_attention)
        return self.model(input_ids, positions, ctx)

    def run_compiled(self, input_ids, positions, ctx, num_tokens: int | None = None) -> torch.Tensor:
        """The compiled model on a step padded to a bucket; attention sees the first num_tokens
        rows (default: all of them; the CUDA graphs' padding rows attend to their scratch block)."""
        rows = input_ids.shape[0]
        self.step_attention.set_step(ctx, rows if num_tokens is None else num_tokens, rows, self.max_blocks_per_seq)
        return self.compiled(input_ids, positions, self.step_attention)

    def logits(self, hidden: torch.Tensor, eager: bool = False) -> torch.Tensor:
        if eager or self.compiled_logits is None:
            return self.model.compute_logits(hidden)
        n = hidden.shape[0]
        padded = torch.nn.functional.pad(hidden, (0, 0, 0, bucket(n, self.max_num_seqs) - n))   # rows: one per sampling sequence
        return self.compiled_logits(padded)[:n]

    @torch.inference_mode()
    def run(self, batch, eager: bool = False) -> tuple[torch.Tensor, list]:
        """Logits (S, vocab) in fp32 for the S sequences that sample this step, and those sequences.
        eager=True bypasses compiled code, CUDA graphs (forward hooks only fire in eager code) and
        the C++ decode-step op: the model with 04's attention as written."""
        input_ids, positions, ctx, logits_indices, samplers = self.prepare(batch)
        hidden = self.forward(input_ids, positions, ctx, eager)                 # (N, hidden)
        return self.logits(hidden[logits_indices], eager).float(), samplers


class CUDAGraphDecoder:
    """Decode steps replayed from CUDA graphs, one per (batch-size bucket, block-table width bucket).

    A decode step of a 0.6B model is ~200 small kernels; launching them from Python costs more
    than running them. A CUDA graph records the launches once and replays them with one call.
    Everything it reads must live at fixed addresses with fixed shapes, so the step's inputs are
    copied into static buffers: input_ids/positions/slot_mapping/context_lens (B,) and block_tables
    (B, max_blocks_per_seq). A graph reads the first b rows and w columns: the batch and the widest
    table rounded up to powers of two. 04's padded decode attention works on all b x w entries, so
    width buckets keep that within 2x of the longest context. Padding rows write their K/V into a
    scratch block the BlockManager never hands out, and attend to it alone. All graphs share one
    memory pool: one replays at a time, and its output is read before the next replay.

    `forward` is what gets captured: the model, or under `--compile` the compiled step. With
    `capture=False` (CPU, tests) the same buffers and padding run eagerly: everything but the
    capture itself is tested without a GPU.
    """

    def __init__(self, model, kv_cache, block_size: int, max_blocks_per_seq: int, max_batch: int,
                 scratch_block: int, capture: bool, forward=None):
        self.model, self.kv_cache = model, kv_cache
        self.forward = forward or model
        self.max_batch, self.max_width = bucket(max_batch, max_batch), max_blocks_per_seq
        self.scratch_block, self.scratch_slot = scratch_block, scratch_block * block_size
        self.capture = capture
        device = kv_cache.device
        B, W = self.max_batch, max_blocks_per_seq
        self.input_ids = torch.zeros(B, dtype=torch.int64, device=device)
        self.positions = torch.zeros(B, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((B,), self.scratch_slot, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(B, dtype=torch.int64, device=device)
        self.block_tables = torch.full((B, W), scratch_block, dtype=torch.int64, device=device)
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def _forward(self, b: int, w: int) -> torch.Tensor:
        ctx = paged.PagedContext(self.kv_cache, self.slot_mapping[:b], self.block_tables[:b, :w],
                                 self.context_lens[:b], static_shapes=True)      # decode metadata
        return self.forward(self.input_ids[:b], self.positions[:b], ctx)        # (b, hidden)

    def _graph(self, b: int, w: int):
        if (b, w) not in self.graphs:
            self._forward(b, w)                       # warm up kernels (and the allocator) first
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._forward(b, w)
            self.graphs[b, w] = (graph, out)
        return self.graphs[b, w]

    def run(self, input_ids, positions, slot_mapping, block_tables, context_lens) -> torch.Tensor:
        n, width = block_tables.shape
        b, w = bucket(n, self.max_batch), bucket(width, self.max_width)
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slot_mapping[:n] = slot_mapping
        self.context_lens[:n] = context_lens
        self.block_tables[:n, :width] = block_tables     # columns past a table's end are masked in 04
        self.input_ids[n:b] = 0                          # padding rows: scratch slot, context of 1
        self.positions[n:b] = 0
        self.slot_mapping[n:b] = self.scratch_slot
        self.context_lens[n:b] = 1
        self.block_tables[n:b] = self.scratch_block
        if not self.capture:
            return self._forward(b, w)[:n]
        graph, out = self._graph(b, w)
        graph.replay()
        return out[:n]
