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

Hook points: `engine.observers` is a list of objects with an `on_event(event: str, data: dict)`
method. The teaching modes (modes/) subscribe there; the engine never imports them. Every
emission site is guarded by `if self.observers:`, so with nobody listening the cost is one
falsy check: no strings built, no dicts, no `.item()`. The events, in the order they happen:

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

Speed: on CUDA, decode steps replay CUDA graphs captured per batch-size and block-table-width bucket
(the Python and kernel-launch overhead of 28 layers disappears); `--enforce-eager` turns that off.
With `--compile` the graphs capture the compiled step (norms, RoPE, casts fused into a few kernels:
batch-1 decode 82 -> 185 tok/s on an H200).
On CPU a decode step is a pass over every weight, so what matters is how fast the linear layers read them: each
nn.Linear is swapped for the measured-fastest kernels of its dtype (`use_cpu_linear_kernels`): for
decode-sized batches a GEMV of our own in C++ (`GEMV_SOURCE`, reading the weights at ~95% of the
machine's `sum`), for larger ones oneDNN or MKL; what else a decode step runs, the attention
(store and 04's kernel) and, in eager code, the RMSNorms and (prompts too) each layer's q/k norms
with RoPE, is one C++ call each;
bf16 prompt chunks attend through 04's flash kernel where the CPU has bf16 dot products;
malloc keeps freed memory so activations do not page-fault in every step (`keep_freed_memory_mapped`),
and the weights and the KV pool live on 2 MiB pages (`huge_page_zeros`, `move_to_huge_pages`).
`--compile` runs the model through torch.compile (inductor, weights frozen as constants, the
max-autotune C++ GEMM templates, a C++ wrapper), one graph per step with attention and the GEMV
kernel as opaque ops, for steps of up to max_num_seqs tokens (on a CPU decode steps only) padded to
power-of-two buckets, so a handful of shapes are compiled once and replayed; the rest run eager.
"""
from __future__ import annotations

import ctypes
import functools
import importlib
import itertools
import math
import mmap
import os
import time
import weakref
from dataclasses import dataclass, field

import torch

tokenize = importlib.import_module("01_tokenize")
qwen3 = importlib.import_module("02_model")
paged = importlib.import_module("04_paged_attention")
sched = importlib.import_module("05_scheduler")
sampling = importlib.import_module("06_sampling")
spec = importlib.import_module("07_speculative")

SamplingConfig = sampling.SamplingConfig
Sequence, SequenceStatus = sched.Sequence, sched.SequenceStatus


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
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.dtype not in ("auto", *qwen3.DTYPES):
            raise ValueError(f"dtype {self.dtype!r} is not one of auto, {', '.join(qwen3.DTYPES)}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if self.draft_model is not None and not self.speculative:
            raise ValueError("draft_model is set but speculative is off: set speculative=True")


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None       # "stop" | "length" while running: None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def resolve_model(name: str) -> str:
    """A local folder for a preset name, a folder, or a hub id (see 02_model.download_model)."""
    if name in qwen3.PRESETS:
        return qwen3.preset_checkpoint(name)
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") != 1:
        path = os.path.expanduser(name)
        if not os.path.isdir(path):
            raise qwen3.CheckpointError(f"model folder {name!r} does not exist "
                                        "(allowed: a local folder, a hub id like Qwen/Qwen3-0.6B, demo or tiny)")
        return path
    return qwen3.download_model(name)


def bucket(n: int, limit: int) -> int:
    """The smallest power of two >= n, capped at limit: the shapes compiled code and CUDA graphs
    are made for. Padding to a few sizes means a handful of compilations instead of one per step."""
    return min(1 << (n - 1).bit_length(), max(limit, n))


class StepAttention:
    """The attention context compiled code sees (and, on a CPU, eager decode steps too). It is one
    object for the engine's whole life (compiled code is specialised on the objects it sees, so a
    new one per step would recompile), holding this step's PagedContext and how many of the
    (padded) tokens are real.

    To the compiler, attention is one opaque call whose output has q's shape, so a whole step, all
    layers, is one graph with no breaks. On a CPU with 04's kernel (kv_cache given) it serves
    decode steps only and the call is `paged_decode_step`, a C++ op that inductor's C++ wrapper
    calls directly: the step's slots, block tables (padded to max_blocks_per_seq columns: one
    shape per bucket) and context lengths are tensors here, inputs of the graph. Elsewhere it is
    `paged_attention_op`, which runs 04's eager paged attention in Python, whatever the step.
    The dense layers around it, which move the weights, are what compilation speeds up."""

    def __init__(self, kv_cache: torch.Tensor | None = None):
        self.ctx: paged.PagedContext | None = None
        self.num_tokens = 0
        self.key = next(_step_attention_keys)
        _STEP_ATTENTIONS[self.key] = self
        self.kv_cache = kv_cache
        self.slot_mapping = self.block_tables = self.context_lens = None

    def set_step(self, ctx: paged.PagedContext, num_tokens: int, rows: int, width: int) -> None:
        """This step's context: num_tokens real tokens of `rows`; with the C++ op, its tensors
        padded to `rows` (padding rows: slot -1, context length 0) and `width` table columns."""
        self.ctx, self.num_tokens = ctx, num_tokens
        if self.kv_cache is not None:
            pad = rows - num_tokens
            self.slot_mapping = torch.nn.functional.pad(ctx.slot_mapping, (0, pad), value=-1)      # (rows,)
            self.context_lens = torch.nn.functional.pad(ctx.context_lens, (0, pad))                 # (rows,)
            self.block_tables = torch.nn.functional.pad(
                ctx.block_tables, (0, width - ctx.block_tables.shape[1], 0, pad), value=-1)         # (rows, width)

    def attend(self, layer_idx: int, q, k, v):          # what the model calls: traced, one op
        # The key takes part in the branch, so it is one of the compiled graphs' guards (an int
        # compared on every call). Dynamo keeps one cache of graphs for the model's forward, shared
        # by every engine that compiles this model class, and ModelRunner skips the guards on
        # modules: this is what keeps an engine off another engine's graphs and the weights frozen
        # into them (a test compiles two checkpoints of one shape in one process).
        if self.kv_cache is None or self.key < 0:
            return paged_attention_op(q, k, v, self.key, layer_idx)
        # eager: the function itself (pybind); the dispatcher's boxed call cost ~15 us a layer more (cold caches)
        op = torch.ops.nano_vllm_cpu.paged_decode_step if torch.compiler.is_compiling() \
            else cpu_decode_step_op().paged_decode_step
        return op(q, k, v, self.kv_cache, layer_idx, self.slot_mapping, self.block_tables, self.context_lens)

    def run(self, layer_idx: int, q, k, v):             # what the Python op runs: eager
        n = self.num_tokens
        out = self.ctx.attend(layer_idx, q[:n], k[:n], v[:n])                   # (n, H, d)
        if n < q.shape[0]:                                                      # padding rows: zeros
            out = torch.cat([out, out.new_zeros(q.shape[0] - n, *out.shape[1:])])
        return out


# A custom op takes tensors and numbers only (inductor's C++ wrapper, which calls the op without
# Python in between, passes nothing else), so the op names its StepAttention by a number; the
# live ones are found here, held weakly (an engine that goes away takes its entry with it).
_STEP_ATTENTIONS: weakref.WeakValueDictionary[int, StepAttention] = weakref.WeakValueDictionary()
_step_attention_keys = itertools.count()


@torch.library.custom_op("nano_vllm::paged_attention", mutates_args=())
def paged_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step_attention: int,
                       layer_idx: int) -> torch.Tensor:
    """q (N, H, d), k/v (N, n_kv, d) -> (N, H, d). Writes k/v into the KV pool: a side effect
    the compiler does not see, and need not, as nothing else in the graph reads the pool."""
    return _STEP_ATTENTIONS[step_attention].run(layer_idx, q, k, v)


@paged_attention_op.register_fake
def _(q, k, v, step_attention, layer_idx):
    return torch.empty_like(q)


DECODE_STEP_SOURCE = r"""
#include <torch/library.h>
#include <cstring>

// One layer's attention in a CPU decode step (eager, or called by compiled code), appended to 04's
// kernel source: the step's k/v copied into their slots (what 04's store_kvcache does), then
// paged_decode above over the real rows. Padding rows (context_len 0) come last and give zeros.
// kv_cache is written, a side effect the compiler is not told of and need not be: nothing else in
// the graph reads the pool. Every slot is checked before any is written.
at::Tensor paged_decode_step(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kv_cache, int64_t layer,
                             at::Tensor slot_mapping, at::Tensor block_tables, at::Tensor context_lens) {
  TORCH_CHECK(kv_cache.dim() == 6 && q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes() && kv_cache.is_contiguous(),
              "paged_decode_step: q (B, H, d), k/v (B, n_kv, d), a contiguous kv_cache (layers, 2, blocks, n_kv, block_size, d)");
  TORCH_CHECK(k.scalar_type() == kv_cache.scalar_type() && v.scalar_type() == kv_cache.scalar_type() &&
              slot_mapping.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong &&
              slot_mapping.is_contiguous() && context_lens.is_contiguous(), "paged_decode_step: dtypes");
  TORCH_CHECK(layer >= 0 && layer < kv_cache.size(0), "paged_decode_step: layer out of range");
  const at::Tensor k_cache = kv_cache.select(0, layer).select(0, 0), v_cache = kv_cache.select(0, layer).select(0, 1);
  const int64_t B = q.size(0), num_blocks = k_cache.size(0), n_kv = k_cache.size(1), bs = k_cache.size(2), d = k_cache.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == n_kv && k.size(2) == d && slot_mapping.size(0) == B &&
              context_lens.size(0) == B && block_tables.size(0) == B, "paged_decode_step: one slot, length, table per row");
  const int64_t *slots = slot_mapping.const_data_ptr<int64_t>(), *lens = context_lens.const_data_ptr<int64_t>();
  int64_t n = 0;                                                     // the real rows
  while (n < B && lens[n] > 0) ++n;
  const at::Tensor kc = k.contiguous(), vc = v.contiguous();
  const int64_t row = d * kv_cache.element_size();                    // bytes of one head's vector
  const char *ks = static_cast<const char*>(kc.const_data_ptr()), *vs = static_cast<const char*>(vc.const_data_ptr());
  char *kd = static_cast<char*>(k_cache.data_ptr()), *vd = static_cast<char*>(v_cache.data_ptr());
  for (int64_t b = 0; b < n; ++b)
    TORCH_CHECK(slots[b] >= 0 && slots[b] < num_blocks * bs, "paged_decode_step: slot out of range");
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t h = 0; h < n_kv; ++h) {                             // slot s of head h: block s / bs, offset s % bs
      const int64_t to = ((slots[b] / bs * n_kv + h) * bs + slots[b] % bs) * row, from = (b * n_kv + h) * row;
      std::memcpy(kd + to, ks + from, row);
      std::memcpy(vd + to, vs + from, row);
    }
  }
  if (n == B) return paged_decode(q.contiguous(), k_cache, v_cache, block_tables.contiguous(), context_lens);
  at::Tensor out = at::zeros_like(q, at::MemoryFormat::Contiguous);
  if (n > 0)
    out.narrow(0, 0, n).copy_(paged_decode(q.narrow(0, 0, n).contiguous(), k_cache, v_cache,
                                           block_tables.narrow(0, 0, n).contiguous(), context_lens.narrow(0, 0, n)));
  return out;
}

TORCH_LIBRARY_FRAGMENT(nano_vllm_cpu, m) {
  m.def("paged_decode_step(Tensor q, Tensor k, Tensor v, Tensor kv_cache, int layer, Tensor slot_mapping, "
        "Tensor block_tables, Tensor context_lens) -> Tensor");
}
TORCH_LIBRARY_IMPL(nano_vllm_cpu, CPU, m) { m.impl("paged_decode_step", &paged_decode_step); }
"""


@functools.cache
def cpu_decode_step_op():
    """04's decode kernel with DECODE_STEP_SOURCE, compiled for this CPU (04's builder), or None.
    Loading it defines torch.ops.nano_vllm_cpu.paged_decode_step; torch.compile learns its
    output's shape here."""
    kernel = paged.build_cpu_kernel("nano_vllm_decode_step", paged.DECODE_KERNEL_SOURCE + DECODE_STEP_SOURCE,
                                    ["paged_decode_step"], "engine.py's decode-step attention op")
    if kernel is not None:
        torch.library.register_fake("nano_vllm_cpu::paged_decode_step", lambda q, *rest: torch.empty_like(q))
    return kernel


def configure_inductor(cache_dir: str) -> None:
    """CPU settings measured to matter for GEMV: weights frozen into the graph as constants
    (prepacked for oneDNN/AMX), max-autotune's C++ GEMM templates, and a C++ wrapper that calls
    the step's kernels without Python in between (fp32 batch-1 decode, both without max-autotune:
    9.15 -> 9.9 tok/s). Compiled kernels and autotuning results are cached on disk."""
    import torch._inductor.config as inductor
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache_dir)
    inductor.freezing = True
    inductor.max_autotune = True
    inductor.max_autotune_gemm_backends = "CPP,ATEN"
    inductor.cpp_wrapper = True
    torch._dynamo.config.recompile_limit = 64           # one graph per token-count bucket


def keep_freed_memory_mapped() -> bool:
    """Ask glibc's malloc to keep freed memory instead of returning it to the OS (CPU only).

    By default every allocation above a threshold gets fresh pages from the OS (mmap) and gives
    them back when freed, so each large activation of every step page-faults all its pages in
    again: measured on a 2-core Xeon, gathering 50 MB of fp32 keys took 13 ms into a new tensor
    and 2 ms into reused memory. With mmap off and trimming off, freed blocks go back to malloc's
    heap and the next step's tensors of the same sizes reuse pages already mapped (what jemalloc
    or tcmalloc, the usual advice for PyTorch on CPU, also achieve). The cost: the process keeps its
    peak memory. Linux/glibc only; returns False where it could not be applied."""
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4        # mallopt parameters, from glibc's <malloc.h>
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):             # not glibc (macOS, musl, Windows)
        return False


HUGE_PAGE = 2 * 2**20


def huge_page_zeros(shape, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor in memory that asked Linux for 2 MiB pages (transparent huge pages).

    A decode step streams every weight once and gathers K/V blocks from all over the pool. With
    4 KiB pages each 4 KiB needs its own TLB entry, so streaming gigabytes is a page walk every
    4 KiB and evicts every other translation; a 2 MiB page covers 512 of them. Many Linux systems
    give huge pages only to memory that asks (THP "madvise" mode), and PyTorch's allocator does
    not ask (unless THP_MEM_ALLOC_ENABLE=1 is set before torch starts). So: an anonymous private
    mapping (zeroed by the kernel), aligned to 2 MiB, madvise(MADV_HUGEPAGE), wrapped as a tensor
    (the tensor keeps the mapping alive). Measured on a 2-core Xeon (two engines in one process,
    steps alternating, both creation orders): fp32 decode steps 4-12% faster at batch 1 and 5-8%
    at batch 16; bf16 within the noise (its linear weights live in oneDNN's packed copies, which
    stay on ordinary pages). Where the OS has no such advice (not Linux), ordinary pages."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:                               # a kernel built without THP: ordinary pages
        pass
    start = -ctypes.addressof(ctypes.c_char.from_buffer(buf)) % HUGE_PAGE
    # the tensor's storage begins at the 2 MiB boundary (torch.compile's freezing misreads a
    # constant that starts inside its storage); the ctypes array keeps the mapping alive
    raw = torch.frombuffer((ctypes.c_uint8 * nbytes).from_buffer(buf, start), dtype=torch.uint8)
    # zero_ touches every page now, at startup, rather than page-faulting in the middle of steps
    return raw.view(dtype).view(shape).zero_()


def move_to_huge_pages(model: torch.nn.Module, shared: bool = True) -> int:
    """Copy every parameter into one huge-page buffer (see huge_page_zeros); tied parameters stay
    tied (the Parameter objects are kept, only their storage moves). Weights already repacked into
    oneDNN's opaque layout (PackedLinear) are not parameters and stay where they are. shared=False:
    each matrix of 2 MiB or more in a buffer of its own, the rest where it is (what torch.compile's
    freezing needs: it takes parameters that share one storage for one constant and computes
    garbage). Returns the bytes moved."""
    params = [p for p in model.parameters() if p.layout == torch.strided and (shared or p.nbytes >= HUGE_PAGE)]
    if not shared:
        for p in params:
            p.data = huge_page_zeros(p.shape, p.dtype).copy_(p.data)
        return sum(p.nbytes for p in params)
    sizes = [-(-p.nbytes // 64) * 64 for p in params]          # each one 64-byte (cache-line) aligned
    buffer = huge_page_zeros((sum(sizes),), torch.uint8)
    offset = 0
    for p, size in zip(params, sizes):
        p.data = buffer[offset:offset + p.nbytes].view(p.dtype).view(p.shape).copy_(p.data)
        offset += size
    return offset


class CUDAGraphDecoder:
    """Decode steps replayed from CUDA graphs, one per (batch-size bucket, block-table width bucket).

    A decode step of a 0.6B model is ~200 small kernels; launching them from Python costs more
    than running them. A CUDA graph records the launches once and replays them with one call.
    Everything the graph reads must live at fixed addresses with fixed shapes, so the step's
    inputs are copied into static buffers: input_ids/positions/slot_mapping/context_lens (B,) and
    block_tables (B, max_blocks_per_seq). A graph reads the first b rows and the first w columns:
    b is the batch rounded up to a power of two (1, 2, 4, ...), w the widest block table rounded
    up the same way. The padded decode attention (04) does work for every one of its b x w table
    entries, so one full-width graph would attend to max_model_len tokens of every sequence at
    every step; width buckets keep that work within 2x of the longest context. Rows beyond the
    real batch are padding: they write their K/V into a scratch block the BlockManager never
    hands out, and attend to it alone. All graphs share one memory pool: one replays at a time,
    and its output is read before the next replay.

    With `capture=False` (CPU, tests) the same buffers and padding run eagerly, which is how
    everything but the capture itself is tested without a GPU.

    `forward(input_ids, positions, ctx)` is what gets captured: the model itself, or under
    `--compile` the compiled step (ModelRunner.run_compiled), whose fused kernels are then replayed
    the same way: fewer kernels a layer, and still no launches from Python.
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


class PackedLinear(torch.nn.Module):
    """An nn.Linear whose weight is stored in oneDNN's blocked layout for this CPU (the layout its
    AMX/AVX-512 kernels read directly). Measured on a 2-core Sapphire Rapids, bf16 batch-1 GEMV:
    ~16 -> ~22 GB/s, i.e. decode reads the weights ~40% faster. Same math (fp32 accumulation);
    the module keeps its name in the model, so forward hooks still find it. The packed copy is
    the module's own: a tied lm_head packs a second copy of the embedding matrix."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


class SmallBatchLinear(torch.nn.Module):
    """An fp32 nn.Linear for small batches on CPU. MKL's kernel for x @ W^T is slow when x has a
    few rows (measured on a 2-core Xeon over Qwen3-0.6B's weight shapes: 29 GB/s of weights read
    at 1 row, 9 GB/s at 16), while the transposed product (W @ x^T)^T - the same dot products -
    runs at 15 GB/s from 4 to 32 rows. Outside that range F.linear is as fast or faster. The weight
    is the same Parameter (a tied lm_head stays tied); the module keeps its name for hooks."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and 4 <= x.shape[0] <= 32:
            return torch.mm(self.weight, x.t()).t().contiguous()                 # (M, out)
        return torch.nn.functional.linear(x, self.weight)


GEMV_SOURCE = r"""
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <algorithm>
#include <cstdint>
#include <omp.h>
#include <vector>

using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();          // floats in one SIMD register: 16 with AVX-512, 8 with AVX2

static inline Vec load(const float* p) { return Vec::loadu(p); }
static inline Vec load(const at::BFloat16* p) { Vec v; at::vec::load_to_float(p, v); return v; }

// U independent sums (registers) per step: 512 bytes of weights, 8 cache lines, asked for at once,
// so enough reads are in flight to keep up with the memory (on an AMD EPYC whose `sum` read 65 GB/s,
// bf16 with 8 registers, 256 bytes a step, read 53; with 16, 61); at most the registers there are.
template <typename T>
constexpr int U = std::min<int64_t>(512 / (W * sizeof(T)), W == 16 ? 16 : 8);

// x . w over K: x fp32 (a few KiB, in cache), w one weight row, read once from front to back.
// This form, K a multiple of U * W (every Qwen3 shape), has nothing after the loop: with tail
// loops after it the same loop read ~6% slower (measured, not understood).
template <typename T>
static inline float dot_blocks(const float* x, const T* w, int64_t K) {
  Vec acc[U<T>];
  for (int u = 0; u < U<T>; ++u) acc[u] = Vec(0.f);
  for (int64_t i = 0; i < K; i += U<T> * W)
    for (int u = 0; u < U<T>; ++u) acc[u] = at::vec::fmadd(load(w + i + u * W), Vec::loadu(x + i + u * W), acc[u]);
  for (int u = 1; u < U<T>; ++u) acc[0] = acc[0] + acc[u];
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc[0]);
}

// Any K: whole blocks, then single registers, then single numbers.
template <typename T>
static inline float dot_any(const float* x, const T* w, int64_t K) {
  const int64_t blocks = K / (U<T> * W) * (U<T> * W);
  float sum = blocks ? dot_blocks(x, w, blocks) : 0.f;
  Vec acc(0.f);
  int64_t i = blocks;
  for (; i + W <= K; i += W) acc = at::vec::fmadd(load(w + i), Vec::loadu(x + i), acc);
  sum += at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; i < K; ++i) sum += x[i] * float(w[i]);
  return sum;
}

#if defined(__AVX512BF16__)
#include <immintrin.h>
// Where the CPU has them (AVX512-BF16: AMD Zen 4, Intel Cooper Lake and later), a bf16 row takes
// `vdpbf16ps`: 32 products of bf16 pairs summed into 16 fp32 sums in one instruction, x in bf16 as
// the model hands it, where the loop above converts every weight to fp32 first. K a multiple of
// 256 (512 bytes of the row a block). Measured on a 2-core AMD EPYC over Qwen3-0.6B's layer
// weights, 150 samples against `sum` (with the running sums below): 92% of it, the conversion 89%.
constexpr int64_t PAIRS_STEP = 8 * 32;

// One block's 256 products in one register: 8 vdpbf16ps into fresh registers, then a tree of adds.
static inline __m512 bf16_pairs_block(const at::BFloat16* x, const at::BFloat16* w) {
  __m512 p[8];
  for (int u = 0; u < 8; ++u)
    p[u] = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_loadu_si512(w + u * 32),
                            (__m512bh)_mm512_loadu_si512(x + u * 32));
  for (int half = 4; half >= 1; half /= 2)
    for (int u = 0; u < half; ++u) p[u] = _mm512_add_ps(p[u], p[u + half]);
  return p[0];
}

// Not 8 running sums as in dot_blocks (each vdpbf16ps waiting for the one before it in its
// register): with those, rows longer than 1024 values (o_proj's 2048, down_proj's 3072) read less
// of `sum` than rows of 1024 (why is not settled: the same loop over an x cut to 2 KiB, same loads,
// read like short rows). Measured on a 2-core AMD EPYC, 2 threads, ~500 samples where `sum` read
// ~35 GB/s and ~120 where it read ~65: 8 running sums 95% / 87% of it (rows of 1024 / 3072), 83% /
// 68% at 65 GB/s; fresh registers each block and one running sum of adds 99% / 98%, 84% / 76%.
// fp32 rows keep the running sums (there the extra adds cost more than the chains: 75% against 93%).
static inline float dot_bf16_pairs(const at::BFloat16* x, const at::BFloat16* w, int64_t K) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < K; i += PAIRS_STEP) sum = _mm512_add_ps(sum, bf16_pairs_block(x + i, w + i));
  return _mm512_reduce_add_ps(sum);
}
#endif

// Each thread takes a contiguous range of the weight's rows: one stream through memory, which the
// hardware prefetcher follows (rows taken 4 or 8 at a time, or prefetched by hand, read slower).
// The M rows of x reuse each weight row while it is in L1. A bare OpenMP region (torch's own
// thread pool) rather than at::parallel_for: a decode step makes ~200 calls of ~50-100 us, and
// at::parallel_for's bookkeeping plus a dispatched copy of x cost ~3% of the bytes read per step.
template <typename X, typename T>
static void gemv_rows(float (*dot)(const X*, const T*, int64_t), const X* x, int64_t M, const T* w,
                      int64_t N, int64_t K, T* out) {
  const int64_t threads = at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), (N + 63) / 64);
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), per = (N + omp_get_num_threads() - 1) / omp_get_num_threads();
    for (int64_t n = t * per; n < std::min(N, (t + 1) * per); ++n)
      for (int64_t m = 0; m < M; ++m) out[m * N + n] = T(dot(x + m * K, w + n * K, K));
  }
}

// x's rows as X (fp32, or bf16 for the pairs above) on a 64-byte boundary (no SIMD load of x then
// straddles two cache lines): x itself where it already is, else a copy in a buffer this thread
// keeps from call to call.
template <typename X>
static const X* aligned_rows(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1);
  if (x.scalar_type() == c10::CppTypeToScalarType<X>::value && x.is_contiguous() &&
      reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 64 == 0)
    return x.const_data_ptr<X>();
  thread_local std::vector<X> buffer;
  buffer.resize(std::max<size_t>(buffer.size(), M * K + 64 / sizeof(X)));
  X* xa = reinterpret_cast<X*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t(63));
  const at::Tensor rows = x.stride(1) == 1 ? x : x.contiguous();
  for (int64_t m = 0; m < M; ++m) {
    if (x.scalar_type() == at::kFloat) at::vec::convert(rows.const_data_ptr<float>() + m * rows.stride(0), xa + m * K, K);
    else at::vec::convert(rows.const_data_ptr<at::BFloat16>() + m * rows.stride(0), xa + m * K, K);
  }
  return xa;
}

// x (M, K) @ weight (N, K)^T -> (M, N), fp32 or bf16 (bf16: products summed in fp32, one rounding).
at::Tensor gemv(at::Tensor x, at::Tensor weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "gemv: x (M, K), weight (N, K)");
  TORCH_CHECK(weight.is_contiguous() && x.scalar_type() == weight.scalar_type() &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16), "gemv: fp32 or bf16, contiguous weight");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor out = at::empty({M, N}, weight.options());
  if (x.scalar_type() == at::kFloat) {
    gemv_rows(K % (U<float> * W) == 0 ? dot_blocks<float> : dot_any<float>, aligned_rows<float>(x), M,
              weight.const_data_ptr<float>(), N, K, out.data_ptr<float>());
    return out;
  }
  const at::BFloat16* w = weight.const_data_ptr<at::BFloat16>();
#if defined(__AVX512BF16__)
  if (K % PAIRS_STEP == 0) {
    gemv_rows(dot_bf16_pairs, aligned_rows<at::BFloat16>(x), M, w, N, K, out.data_ptr<at::BFloat16>());
    return out;
  }
#endif
  gemv_rows(K % (U<at::BFloat16> * W) == 0 ? dot_blocks<at::BFloat16> : dot_any<at::BFloat16>, aligned_rows<float>(x),
            M, w, N, K, out.data_ptr<at::BFloat16>());
  return out;
}

// The same function as an op of torch's dispatcher, for compiled code: inductor's C++ wrapper
// calls it directly, no Python in between (its output shape is told to the compiler in Python).
TORCH_LIBRARY_FRAGMENT(nano_vllm_cpu, m) { m.def("gemv(Tensor x, Tensor weight) -> Tensor"); }
TORCH_LIBRARY_IMPL(nano_vllm_cpu, CPU, m) { m.impl("gemv", &gemv); }
"""


# Up to how many rows the GEMV kernel beats the GEMM libraries, measured on a 2-core AMD EPYC over
# Qwen3-0.6B's layer weights (GB/s of weights read, rows 1/2/3/4/6): fp32 33/32/29/26/13 against
# oneDNN's 27/22/21/19/16; bf16 41/28/18/16 against 26/23/20/32 (each row re-converts the weight).
GEMV_MAX_ROWS = {torch.float32: 4, torch.bfloat16: 2}


@functools.cache
def cpu_gemv_kernel():
    """GEMV_SOURCE compiled for this CPU with 04's builder, or None (no compiler: torch's kernels).
    Loading it also defines the op torch.ops.nano_vllm_cpu.gemv; torch.compile learns its output's
    shape here."""
    kernel = paged.build_cpu_kernel("nano_vllm_gemv", GEMV_SOURCE, ["gemv"], "engine.py's C++ GEMV kernel")
    if kernel is not None:
        torch.library.register_fake("nano_vllm_cpu::gemv", lambda x, weight: x.new_empty(x.shape[0], weight.shape[0]))
    return kernel


class GEMVLinear(torch.nn.Module):
    """An nn.Linear whose small batches (decode) run the GEMV kernel above, and larger ones
    (prefill) `batched`, the measured-fastest GEMM of its dtype (PackedLinear, SmallBatchLinear,
    or the nn.Linear itself).

    Why a kernel of our own: a batch-1 decode step is a matrix-vector product per weight, all
    memory reads, so tok/s is set by how fast the weights stream in. Measured on a 2-core AMD
    EPYC (Zen 4) over Qwen3-0.6B's 28 layers' weights on 2 MiB pages, against a `sum` of the same
    machine: this kernel reads 96% of it in fp32 and 93% in bf16, where oneDNN's packed kernel
    reads ~80% / ~70% and MKL ~50%. The weight is the plain Parameter (a tied lm_head stays
    tied); with a packed `batched` the module holds both copies."""

    def __init__(self, linear: torch.nn.Module, weight: torch.nn.Parameter, max_rows: int):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight, self.batched, self.max_rows = weight, linear, max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= self.max_rows:
            if torch.compiler.is_compiling():          # one opaque op in the graph
                return torch.ops.nano_vllm_cpu.gemv(x, self.weight)
            return cpu_gemv_kernel().gemv(x, self.weight)                    # (M, out)
        return self.batched(x)


RMS_NORM_SOURCE = r"""
#include <ATen/Parallel.h>
#include <cmath>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <vector>

// Every product and sum below rounds on its own, as torch's separate ops do: no fused multiply-add,
// which rounds once and which GCC otherwise makes of a * b + c (RoPE's x * cos + r * sin).
#pragma GCC optimize("fp-contract=off")

// 02's RMSNorm row by row: y = weight * T(x / sqrt(mean(x^2) + eps)), the mean in fp32 and the
// normalised row rounded to T before the weight multiplies it, as HF does. One call for the ~9 ops
// eager torch runs it as.
template <typename T>
static void rms_norm_rows(const T* x, const T* w, T* y, int64_t rows, int64_t d, float eps) {
  for (int64_t r = 0; r < rows; ++r, x += d, y += d) {
    float squares = 0.f;
    for (int64_t i = 0; i < d; ++i) squares += float(x[i]) * float(x[i]);
    const float inv_rms = 1.f / std::sqrt(squares / float(d) + eps);
    for (int64_t i = 0; i < d; ++i) y[i] = T(float(w[i]) * float(T(float(x[i]) * inv_rms)));
  }
}

// x (..., d) contiguous, weight (d,) of x's dtype (fp32 or bf16) -> x's shape.
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  const int64_t d = weight.numel();
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && x.dim() >= 1 && x.size(-1) == d &&
              x.scalar_type() == weight.scalar_type() &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16), "rms_norm: x (..., d), weight (d,), fp32 or bf16");
  at::Tensor y = at::empty_like(x);
  const int64_t rows = d ? x.numel() / d : 0;
  if (x.scalar_type() == at::kFloat)
    rms_norm_rows(x.const_data_ptr<float>(), weight.const_data_ptr<float>(), y.data_ptr<float>(), rows, d, float(eps));
  else
    rms_norm_rows(x.const_data_ptr<at::BFloat16>(), weight.const_data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(),
                  rows, d, float(eps));
  return y;
}

// 02's Qwen3Attention.norm_and_rotate for one of q (N, heads, d) / k: every head vector normalised as
// above, then rotated by its token's cos/sin (N, d) as 02's apply_rope computes it,
// y * cos + rotate_half(y) * sin, each product and the sum rounded to T as torch's three ops round them.
// A prompt's rows are shared among torch's threads; a decode step's few run on the calling thread.
template <typename T>
static void norm_rotate_rows(const T* x, const T* w, const T* cos, const T* sin, T* y, int64_t N, int64_t heads,
                             int64_t d, float eps) {
  const int64_t half = d / 2;
  at::parallel_for(0, N * heads, 512, [&](int64_t begin, int64_t end) {
    std::vector<T> normed(d);
    for (int64_t row = begin; row < end; ++row) {          // row = token n's head h
      const T *c = cos + row / heads * d, *s = sin + row / heads * d;
      rms_norm_rows(x + row * d, w, normed.data(), 1, d, eps);
      for (int64_t i = 0; i < d; ++i) {
        const float rotated = i < half ? -float(normed[i + half]) : float(normed[i - half]);
        y[row * d + i] = T(float(T(float(normed[i]) * float(c[i]))) + float(T(rotated * float(s[i]))));
      }
    }
  });
}

// q (N, H, d), k (N, n_kv, d) contiguous; their norms' weights (d,); cos, sin (N, d); one dtype,
// fp32 or bf16 -> (q, k) normalised and rotated: one call for the ~20 ops of eager torch.
std::tuple<at::Tensor, at::Tensor> norm_and_rotate(at::Tensor q, at::Tensor k, at::Tensor q_weight, at::Tensor k_weight,
                                                   at::Tensor cos, at::Tensor sin, double eps) {
  const int64_t N = q.size(0), d = q.size(-1);
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.size(0) == N && k.size(2) == d && d % 2 == 0 &&
              q_weight.numel() == d && k_weight.numel() == d && cos.sizes() == at::IntArrayRef({N, d}) &&
              sin.sizes() == cos.sizes(), "norm_and_rotate: q (N, H, d), k (N, n_kv, d), weights (d,), cos/sin (N, d)");
  for (const at::Tensor& t : {q, k, q_weight, k_weight, cos, sin})
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == q.scalar_type() &&
                (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16), "norm_and_rotate: contiguous, one dtype, fp32 or bf16");
  at::Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "norm_and_rotate", [&] {
    norm_rotate_rows(q.const_data_ptr<scalar_t>(), q_weight.const_data_ptr<scalar_t>(), cos.const_data_ptr<scalar_t>(),
                     sin.const_data_ptr<scalar_t>(), q_out.data_ptr<scalar_t>(), N, q.size(1), d, float(eps));
    norm_rotate_rows(k.const_data_ptr<scalar_t>(), k_weight.const_data_ptr<scalar_t>(), cos.const_data_ptr<scalar_t>(),
                     sin.const_data_ptr<scalar_t>(), k_out.data_ptr<scalar_t>(), N, k.size(1), d, float(eps));
  });
  return {q_out, k_out};
}
"""


@functools.cache
def cpu_rms_norm_kernel():
    """RMS_NORM_SOURCE compiled for this CPU with 04's builder, or None (no compiler: 02's RMSNorm)."""
    return paged.build_cpu_kernel("nano_vllm_rms_norm", RMS_NORM_SOURCE, ["rms_norm", "norm_and_rotate"],
                                  "engine.py's C++ RMSNorm")


class FusedRMSNorm(qwen3.RMSNorm):
    """02's RMSNorm (the same weight Parameter and eps) whose decode-sized inputs run one C++ call
    (RMS_NORM_SOURCE); larger ones, prefill, run 02's code. A decode step runs 113 norms: in eager
    torch each is ~9 ops, ~25 us on a 2-core AMD EPYC, ~2.9 ms of a ~35 ms bf16 step."""

    MAX_NUMEL = 1 << 15          # a batch of 32 rows of hidden 1024, or 16 tokens' 16 heads of 128

    def __init__(self, norm: qwen3.RMSNorm):
        torch.nn.Module.__init__(self)
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.MAX_NUMEL and x.is_contiguous() and x.dtype == self.weight.dtype:
            return cpu_rms_norm_kernel().rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class FusedNormRoPEAttention(qwen3.Qwen3Attention):
    """02's attention (the same submodules) whose q and k go through their norms and RoPE in one
    C++ call (`norm_and_rotate` in RMS_NORM_SOURCE), bit for bit FusedRMSNorm's kernel and 02's
    apply_rope. In eager torch that is two norms and ~16 small ops a layer. Measured on a 2-core
    AMD EPYC: between the GEMVs of a bf16 batch-1 decode step (the caches cold after every weight
    read) RoPE alone took ~56 us a layer, and with this call the step spends 1.5 ms less there
    (6.9 -> 5.4 ms); a 256-token prefill, 317 -> 339 tok/s in bf16, 190 -> 196 in fp32.
    Where something hooks q_norm or k_norm (the x-ray reads them), 02's code runs."""

    def __init__(self, attn: qwen3.Qwen3Attention):
        torch.nn.Module.__init__(self)
        self.layer_idx, self.n_heads, self.n_kv, self.head_dim = attn.layer_idx, attn.n_heads, attn.n_kv, attn.head_dim
        self.rope_theta = attn.rope_theta
        for name, child in attn.named_children():
            self.add_module(name, child)

    def norm_and_rotate(self, q, k, cos, sin):
        if q.dtype == self.q_norm.weight.dtype and not (self.q_norm._forward_hooks or self.k_norm._forward_hooks):
            return cpu_rms_norm_kernel().norm_and_rotate(q, k, self.q_norm.weight, self.k_norm.weight, cos, sin,
                                                         self.q_norm.eps)
        return super().norm_and_rotate(q, k, cos, sin)


def use_cpu_norm_kernel(model: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Swap every RMSNorm for FusedRMSNorm and every attention for FusedNormRoPEAttention (fp32 and
    bf16, where the C++ builds). Eager only: under torch.compile inductor fuses these ops itself."""
    if dtype not in (torch.float32, torch.bfloat16) or cpu_rms_norm_kernel() is None:
        return False
    swap_modules(model, lambda m: type(m) is qwen3.Qwen3Attention, FusedNormRoPEAttention)
    swap_modules(model, lambda m: type(m) is qwen3.RMSNorm, FusedRMSNorm)
    return True


def swap_modules(model: torch.nn.Module, match, replace) -> None:
    """Put replace(child) in place of every submodule for which match(child) holds, under the same
    name in the same parent (forward hooks registered afterwards still find it by name)."""
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if match(child)]
    for parent, name, child in swaps:
        setattr(parent, name, replace(child))


def cpu_vendor() -> str:
    """The CPU's vendor string from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD"; "" elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def use_cpu_linear_kernels(model: torch.nn.Module, dtype: torch.dtype, batched: bool = True) -> str | None:
    """Swap every nn.Linear for the faster CPU kernels of its dtype: GEMVLinear for decode-sized
    batches (up to GEMV_MAX_ROWS rows; where the C++ kernel builds), and for more rows PackedLinear
    for bf16 on a CPU with bf16 units; for fp32, SmallBatchLinear on Intel and PackedLinear on AMD.
    fp32 nn.Linear runs on MKL, Intel's library, which on AMD takes a slower generic path: measured
    on a 2-core EPYC (Zen 4) over Qwen3-0.6B's layer weights, MKL reads 17.6 GB/s at 1 row and
    10-15 at 4 (W @ x^T included), where oneDNN's packed kernel reads 26.5 and 19.4 (the machine's
    `sum`: 34), and at 512 rows computes 213 GFLOP/s against MKL's 168. Returns the kernels used,
    as "GEMVLinear + PackedLinear" (None: nothing swapped). batched=False (under torch.compile):
    only GEMVLinear, larger batches stay nn.Linear, whose GEMMs inductor picks itself."""
    onednn = torch.backends.mkldnn.is_available()
    if not batched:
        kind = None
    elif onednn and dtype == torch.bfloat16 and qwen3.cpu_has_bf16():
        kind = PackedLinear
    elif onednn and dtype == torch.float32 and cpu_vendor() == "AuthenticAMD":
        kind = PackedLinear
    elif dtype == torch.float32:
        kind = SmallBatchLinear
    else:
        kind = None
    gemv_rows = GEMV_MAX_ROWS.get(dtype, 0) if cpu_gemv_kernel() is not None else 0
    if kind is None and not gemv_rows:
        return None
    def replace(linear: torch.nn.Linear) -> torch.nn.Module:
        larger = kind(linear) if kind else linear                # what takes batches past gemv_rows
        return GEMVLinear(larger, linear.weight, gemv_rows) if gemv_rows else larger
    swap_modules(model, lambda m: isinstance(m, torch.nn.Linear), replace)
    return " + ".join(k.__name__ for k in (GEMVLinear if gemv_rows else None, kind) if k)


class ModelRunner:
    """Packs a scheduled batch into flat tensors, runs the model over the paged KV cache and
    returns logits for the positions that sample. Three ways to run the model:
    eager (always correct, the reference), compiled (`compile`: steps of up to max_num_seqs
    tokens, padded to shape buckets; on a CPU where 04's kernel runs, decode steps only, whose
    attention is then one C++ op), and decode-only CUDA graphs (on CUDA unless `enforce_eager`),
    which capture the compiled step under `compile`.

    Why compile only the short steps: a decode step reads every weight for a few tokens, so the
    ~60 small ops per layer between the GEMVs cost a large share of it, and fusing them pays; a
    prefill step is GEMMs on hundreds of rows, whose eager speed is most of the GEMMs' own
    (README). And each compiled shape costs a minute or more to build and, with frozen weights,
    holds its own copy of them."""

    def __init__(self, model, block_manager: paged.BlockManager, kv_cache,
                 device: torch.device, max_blocks_per_seq: int, max_num_seqs: int,
                 compile: bool = False, cuda_graphs: bool = False, cache_dir: str = "",
                 decode_kernel: bool = False):
        self.model, self.bm, self.kv_cache = model, block_manager, kv_cache
        self.device = device
        self.max_num_seqs, self.max_blocks_per_seq = max_num_seqs, max_blocks_per_seq
        # On a CPU whose decode rows 04's kernel takes, every decode step's attention is one C++ op
        # (eager or compiled: with cold caches, as between a step's weight reads, 04's Python path
        # around the same kernel cost ~110 us a layer, the op ~50; AMD EPYC, Qwen3-0.6B's heads),
        # and compiled steps are decode steps.
        self.decode_op = device.type == "cpu" and decode_kernel and cpu_decode_step_op() is not None
        self.step_attention = StepAttention(kv_cache if self.decode_op else None) if compile or self.decode_op else None
        self.compiled = self.compiled_logits = None
        if compile:
            # CPU: every bucket its own graph, GEMMs autotuned for its shape. CUDA: torch.compile's
            # default, the batch becomes a dynamic size after the second bucket, so two builds of
            # the Triton kernels serve every batch size (cuBLAS picks its GEMM per shape at run time).
            dynamic = False if device.type == "cpu" else None
            if device.type == "cpu":
                configure_inductor(os.path.join(cache_dir, "inductor"))
            # No guards on the modules: the model never changes after loading, and checking its
            # parameters and submodules before every call cost 0.43 ms a call, two calls a step
            # (AMD EPYC, bf16 batch-1 decode; 0.06 ms without). The inputs' shapes still pick the
            # bucket's graph, and the step attention's key the engine's (StepAttention.attend).
            options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
            self.compiled = torch.compile(model, dynamic=dynamic, options=options)
            self.compiled_logits = torch.compile(model.compute_logits, dynamic=dynamic, options=options)
        # the last block of the pool is the CUDA graphs' scratch block (see allocate in LLMEngine)
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
        ctx = paged.PagedContext.from_spans(self.kv_cache, self.bm, spans)
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


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None):
        config.validate()
        self.config = config
        self.device = qwen3.resolve_device(config.device)
        self.dtype = qwen3.resolve_dtype(config.dtype, self.device)
        folder = resolve_model(config.model)
        self.model_path = folder
        if self.device.type == "cpu":
            keep_freed_memory_mapped()
        self.model = qwen3.load_model(folder, self.dtype, self.device)
        self.linear_kernels = None
        # Under compile only the GEMV kernel (an op inductor calls as it is): for larger batches
        # inductor's freezing picks its own GEMMs, and it takes parameters that share one storage
        # for one constant, so each weight gets huge pages of its own.
        if self.device.type == "cpu":
            self.linear_kernels = use_cpu_linear_kernels(self.model, self.dtype, batched=not config.compile)
            if not config.compile:
                use_cpu_norm_kernel(self.model, self.dtype)
            move_to_huge_pages(self.model, shared=not config.compile)
        self.model_config = mc = self.model.config
        self.tokenizer = tokenizer or tokenize.load_tokenizer(folder)
        self.max_model_len = min(config.max_model_len or 4096, mc.max_position_embeddings)
        # 07: the draft comes before the pool is sized (its weights and its own KV pool take memory too)
        self.draft_model = self._load_draft() if config.speculative else None

        bytes_per_block = mc.kv_bytes_per_token(self.dtype) * config.block_size
        if self.draft_model is not None:   # the draft's pool has as many blocks as the target's
            bytes_per_block += self.draft_model.config.kv_bytes_per_token(self.dtype) * config.block_size
        self.num_kv_blocks = config.num_kv_blocks or self._auto_num_blocks(bytes_per_block)
        max_blocks_per_seq = -(-self.max_model_len // config.block_size)
        if self.num_kv_blocks < max_blocks_per_seq:
            raise ValueError(f"{self.num_kv_blocks} KV blocks of {config.block_size} tokens cannot hold one sequence "
                             f"of max_model_len {self.max_model_len}: need at least {max_blocks_per_seq}")
        cuda_graphs = self.device.type == "cuda" and not config.enforce_eager
        # CUDA graphs pad decode batches with rows that write to one extra scratch block
        self.kv_cache = paged.allocate_kv_cache(mc, self.num_kv_blocks + cuda_graphs, config.block_size,
                                                self.dtype, "meta" if self.device.type == "cpu" else self.device)
        if self.device.type == "cpu":   # the pool on 2 MiB pages: its blocks are gathered from all over it
            self.kv_cache = huge_page_zeros(self.kv_cache.shape, self.dtype)
        # 04's C++ decode kernel takes this model's decode rows: built (~25 s the first time) or
        # loaded here, at startup, rather than inside the first step;
        self.decode_kernel = paged.decode_kernel_applies(
            torch.empty(1, mc.num_attention_heads, mc.head_dim, dtype=self.dtype, device=self.device), self.kv_cache[0, 0])
        # and its C++ prompt kernel (bf16 on a CPU with bf16 dot products) the longer prompt chunks
        self.prefill_kernel = paged.prefill_kernel_applies(torch.empty(
            paged.PREFILL_KERNEL_MIN_ROWS, mc.num_attention_heads, mc.head_dim, dtype=self.dtype, device=self.device))
        self.block_manager = paged.BlockManager(self.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = sched.Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.block_manager, self.kv_cache, self.device, max_blocks_per_seq,
                                  config.max_num_seqs, compile=config.compile,
                                  cuda_graphs=cuda_graphs, cache_dir=qwen3.cache_root(),
                                  decode_kernel=self.decode_kernel)
        self.sampler = sampling.Sampler()
        self.speculative = None
        if self.draft_model is not None:
            draft = spec.DraftRunner(self.draft_model, self.num_kv_blocks, config.block_size, config.enable_prefix_caching)
            self.speculative = spec.SpeculativeDecoder(self.model, self.kv_cache, self.block_manager, draft,
                                                       config.num_speculative_tokens, self.max_model_len)
        self.observers: list = []
        self._observed_blocks: dict[int, list[int]] = {}   # block tables as observers last saw them
        self._ids = itertools.count()
        self._requests: dict[int, tuple[Sequence, RequestOutput, torch.Generator | None]] = {}
        self.stats = dict(prompt_tokens=0, generated_tokens=0, prefill_tokens=0, prefill_time_s=0.0,
                          decode_tokens=0, decode_time_s=0.0, steps=0, kv_blocks_peak=0)

    def _load_draft(self):
        """07: the draft model. draft_model None: the target's first layers (shared weights, no copy);
        otherwise any Qwen3 checkpoint with the target's vocabulary (a ValueError that says so if not)."""
        name = self.config.draft_model
        if name is None:
            return spec.early_exit_draft(self.model, spec.default_draft_layers(self.model_config.num_hidden_layers))
        folder = resolve_model(name)
        if os.path.realpath(folder) == os.path.realpath(self.model_path):
            return self.model   # the target as its own draft (acceptance ~1: a check, not a speedup): no second copy
        spec.check_same_vocabulary(self.model_config, qwen3.load_config(folder), self.tokenizer,
                                   tokenize.load_tokenizer(folder), name)
        draft = qwen3.load_model(folder, self.dtype, self.device)
        if self.device.type == "cpu" and not self.config.compile:   # the same CPU kernels and pages as the target
            use_cpu_linear_kernels(draft, self.dtype)
            move_to_huge_pages(draft)
        return draft

    def _auto_num_blocks(self, bytes_per_block: int) -> int:
        if self.config.kv_cache_memory_gb is not None:
            return max(1, int(self.config.kv_cache_memory_gb * 2**30 // bytes_per_block))
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used_by_others = total - free
            budget = total * self.config.gpu_memory_utilization - used_by_others - 2**30  # 1 GiB for activations
            return max(1, int(budget // bytes_per_block))
        # CPU: room for every sequence slot at max length, capped at 2 GiB (memory is shared with the weights).
        want = self.config.max_num_seqs * -(-self.max_model_len // self.config.block_size)
        return max(1, min(want, int(2 * 2**30 // bytes_per_block)))

    # --------------------------------------------------------------- hooks

    def _emit(self, event: str, **data) -> None:
        for observer in self.observers:
            observer.on_event(event, data)

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
            raise ValueError(f"the prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, "
                             "so at most {} prompt tokens fit".format(self.max_model_len - 1))
        bad = [i for i in ids if not 0 <= i < self.model_config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.model_config.vocab_size})")
        rid = next(self._ids)
        seq = Sequence(rid, list(ids), len(ids), params)    # its own list: it grows as tokens come
        generator = sampling.make_generator(params.seed, self.device)
        self._requests[rid] = (seq, RequestOutput(rid, text, list(ids)), generator)
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
        t0 = time.perf_counter()
        eager = bool(self.observers) and any(getattr(o, "needs_eager", False) for o in self.observers)
        logits, samplers = self.runner.run(batch, eager)
        token_list = self.sampler(logits, [s.sampling for s in samplers],
                                  [self._requests[s.seq_id][2] for s in samplers]).tolist() if samplers else []
        dt = time.perf_counter() - t0
        self._account(batch, dt)
        if self.observers:
            self._observe_step(batch, logits, samplers, token_list, dt)

        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            if self.config.enable_prefix_caching:
                self.block_manager.commit(seq.seq_id, seq.token_ids[:seq.num_computed_tokens])
        outputs = []
        for seq, token in zip(samplers, token_list):
            seq.token_ids.append(token)
            out = self._requests[seq.seq_id][1]
            out.token_ids.append(token)
            self.stats["generated_tokens"] += 1
            reason = self._stop_reason(seq, out)
            if reason is not None:
                out.finish_reason = reason
                blocks = list(seq.block_table)
                self.scheduler.finish(seq)
                del self._requests[seq.seq_id]
                if self.observers:
                    self._observe_finish(seq, out, blocks)
            outputs.append(out)
        return outputs

    def _speculative_step(self, batch) -> list[RequestOutput]:
        """step() with speculative decoding (07_speculative.SpeculativeDecoder does the model work, always
        eager): the prefill chunks as usual, and every sequence that samples gets up to k draft tokens
        checked in the same target forward, so it may gain several tokens. The stop rules see them one at
        a time: a stop inside the run drops the tokens after it (max_tokens: k is capped beforehand)."""
        prefill = sum(n for seq, n in zip(batch.seqs, batch.num_new_tokens) if seq.is_prefill)
        t0 = time.perf_counter()
        verified = self.speculative.step(batch, [self._requests[s.seq_id][2] for s in batch.seqs])
        dt = time.perf_counter() - t0
        outputs, finished, generated = [], [], 0
        for v in verified:
            seq, out = v.seq, self._requests[v.seq.seq_id][1]
            if self.observers:
                self._observe_verified(v)
                probs = v.target_logits.softmax(-1)                       # the model's own distribution
                top_p, top_i = probs.topk(5, dim=-1)
            for i, token in enumerate(v.token_ids):
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
        st = self.stats
        st["steps"] += 1
        st["generated_tokens"] += generated
        if prefill:   # as in _account: a step with any prefill counts as prefill time
            st["prefill_tokens"] += prefill
            st["prefill_time_s"] += dt
        else:         # decode tokens are the tokens the step produced: the speedup shows in decode tok/s
            st["decode_tokens"] += generated
            st["decode_time_s"] += dt
        st["kv_blocks_peak"] = max(st["kv_blocks_peak"], self.block_manager.num_used_blocks)
        if self.observers:
            self._emit("step_done", step=st["steps"], seconds=dt, num_tokens=batch.num_batched_tokens,
                       num_seqs=len(batch.seqs), num_used_blocks=self.block_manager.num_used_blocks,
                       num_free_blocks=self.block_manager.num_free_blocks, running=len(self.scheduler.running),
                       waiting=len(self.scheduler.waiting))
        for seq in finished:
            out = self._requests.pop(seq.seq_id)[1]
            blocks = list(seq.block_table)
            self.scheduler.finish(seq)
            self.speculative.free(seq.seq_id)
            if self.observers:
                self._observe_finish(seq, out, blocks)
        return outputs

    # --------------------------------------------------------------- events (only with observers)

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

    def _observe_step(self, batch, logits, samplers, tokens, seconds) -> None:
        probs = logits.softmax(-1)                                        # the model's own distribution
        top_p, top_i = probs.topk(5, dim=-1)
        for i, (seq, token) in enumerate(zip(samplers, tokens)):
            self._emit("sampled", request_id=seq.seq_id, token_id=token, prob=float(probs[i, token]),
                       top=list(zip(top_i[i].tolist(), top_p[i].tolist())), position=seq.num_tokens,
                       greedy=seq.sampling.greedy)
        self._emit("step_done", step=self.stats["steps"], seconds=seconds, num_tokens=batch.num_batched_tokens,
                   num_seqs=len(batch.seqs), num_used_blocks=self.block_manager.num_used_blocks,
                   num_free_blocks=self.block_manager.num_free_blocks, running=len(self.scheduler.running),
                   waiting=len(self.scheduler.waiting))

    def _observe_verified(self, v) -> None:
        if not v.draft_token_ids:
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

    def _account(self, batch, seconds: float) -> None:
        st = self.stats
        st["steps"] += 1
        decode = sum(1 for seq in batch.seqs if not seq.is_prefill)   # called before num_computed_tokens moves
        prefill = batch.num_batched_tokens - decode
        if prefill:   # a step with any prefill counts as prefill time (it is dominated by it)
            st["prefill_tokens"] += prefill
            st["prefill_time_s"] += seconds
        else:
            st["decode_tokens"] += decode
            st["decode_time_s"] += seconds
        st["kv_blocks_peak"] = max(st["kv_blocks_peak"], self.block_manager.num_used_blocks)

    def _stop_reason(self, seq: Sequence, out: RequestOutput) -> str | None:
        p: SamplingConfig = seq.sampling
        token = seq.token_ids[-1]
        if (not p.ignore_eos and token in self.tokenizer.eos_token_ids) or token in p.stop_token_ids:
            out.text = self.tokenizer.decode(out.token_ids)
            return "stop"
        text = self.tokenizer.decode(out.token_ids)
        if p.stop:
            for s in p.stop:   # a stop string ends the text just before it
                cut = text.find(s)
                if cut != -1:
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
        """Add the prompts, then yield (text_delta, output) each time a request gets a token.
        text_delta holds back an incomplete UTF-8 character until the next token completes it."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        for prompt, p in zip(prompts, params_list):
            self.add_request(prompt, p)
        shown: dict[int, int] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                text = out.text if out.finished else out.text.rstrip("\ufffd")
                start = shown.get(out.request_id, 0)
                shown[out.request_id] = max(start, len(text))
                yield text[start:], out

    def stats_summary(self) -> dict:
        st = self.stats
        return {
            "prompt_tokens": st["prompt_tokens"],
            "generated_tokens": st["generated_tokens"],
            "prefill_tokens_per_s": round(st["prefill_tokens"] / st["prefill_time_s"], 2) if st["prefill_time_s"] else 0.0,
            "decode_tokens_per_s": round(st["decode_tokens"] / st["decode_time_s"], 2) if st["decode_time_s"] else 0.0,
            "prefix_cache_hit_tokens": self.block_manager.prefix_hit_tokens,
            "preemptions": self.scheduler.num_preemptions,
            "kv_blocks_total": self.num_kv_blocks,
            "kv_blocks_peak": st["kv_blocks_peak"],
            "steps": st["steps"],
            # 07: spec_num_drafts, spec_draft_tokens, spec_accepted_tokens, spec_acceptance_rate,
            # spec_mean_acceptance_length, spec_acceptance_per_position; only with speculation on
            **(self.speculative.stats.summary() if self.speculative is not None else {}),
        }
