"""
nano_kernels/attention.py - paged attention on a CPU in C++, plugged into 04's `AttentionBackend` seam.

04_paged_attention.py gathers each sequence's blocks and runs torch's SDPA per sequence: correct,
and the reference. Two kernels of nano_kernels/csrc/ do the same work faster on a CPU:

  - decode rows (one query reading the cache): `paged_decode.cpp` takes every decode row of a step
    in one call and reads each block where it lies in the pool (no gather), as vLLM's paged-attention
    kernels do;
  - prompt chunks in bf16 on a CPU with AVX512-BF16: `paged_prefill.cpp`, flash attention with
    fp32 scores from bf16 pair products, for chunks of PREFILL_MIN_ROWS rows or more (below that,
    repacking the keys costs more than it saves and SDPA runs).

`CPUAttention` is that backend. The engine also calls the decode kernel through `StepAttention`,
the attention compiled code sees: one opaque op per layer, so a whole step is one graph.

    python -m nano_kernels.attention      # times one layer both ways on this machine
"""
from __future__ import annotations

import importlib
import itertools
import weakref

import torch

from nano_kernels.extension import cpu_extension

paged = importlib.import_module("04_paged_attention")

# From how many rows a prompt chunk takes the flash kernel (docs/performance.md: below it, the
# per-call repacking of keys and values loses to SDPA).
PREFILL_MIN_ROWS = 32


def decode_kernel_applies(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                          dtype: torch.dtype, device: torch.device) -> bool:
    """The shapes paged_decode.cpp was written for (every Qwen3 qualifies): a CPU, fp32 or bf16,
    head size a multiple of 16 up to 256, blocks of up to 64 tokens, 1, 2, 4 or 8 query heads per
    KV head; and a build that succeeded."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and head_dim % 16 == 0
            and head_dim <= 256 and block_size <= 64 and num_heads % num_kv_heads == 0
            and num_heads // num_kv_heads in (1, 2, 4, 8) and cpu_extension() is not None)


def prefill_kernel_applies(head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """paged_prefill.cpp: bf16 on a CPU with bf16 dot products (the build has the function only
    there), head size a multiple of 64 (every Qwen3: 128)."""
    ext = cpu_extension() if device.type == "cpu" else None
    return dtype == torch.bfloat16 and head_dim % 64 == 0 and ext is not None and hasattr(ext, "causal_attention")


class CPUAttention(paged.AttentionBackend):
    """04's backend with the C++ kernels: every decode row of a step in one paged_decode call
    (`decode`), and long bf16 prompt chunks through causal_attention (`prefill`). What a kernel does
    not take, 04's SDPA does."""

    def __init__(self, decode: bool, prefill: bool):
        self.batches_decode_rows, self.prefill = decode, prefill

    def decode_rows(self, q, k_cache, v_cache, block_tables, context_lens):
        return cpu_extension().paged_decode(q.contiguous(), k_cache, v_cache, block_tables, context_lens)

    def sequence(self, q, keys, values, seq):
        if self.prefill and q.shape[0] >= PREFILL_MIN_ROWS:
            # the kernel reads the same keys token-major: (n, n_kv, d) views, no copy
            return cpu_extension().causal_attention(q, keys[0].transpose(0, 1), values[0].transpose(0, 1))
        return super().sequence(q, keys, values, seq)


def cpu_attention(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                  device: torch.device) -> CPUAttention | None:
    """The backend for this model on this machine, or None where no kernel applies (04's SDPA then)."""
    decode = decode_kernel_applies(num_heads, num_kv_heads, head_dim, block_size, dtype, device)
    prefill = prefill_kernel_applies(head_dim, dtype, device)
    return CPUAttention(decode, prefill) if decode or prefill else None


class StepAttention:
    """The attention context compiled code sees (and, on a CPU, eager decode steps too). It is one
    object for the engine's whole life (compiled code is specialised on the objects it sees, so a
    new one per step would recompile), holding this step's PagedContext and how many of the
    (padded) tokens are real.

    To the compiler, attention is one opaque call whose output has q's shape, so a whole step, all
    layers, is one graph with no breaks. On a CPU with the decode kernel (kv_cache given) it serves
    decode steps only and the call is `paged_decode_step` (paged_decode.cpp), a C++ op that
    inductor's C++ wrapper calls directly: the step's slots, block tables (padded to a fixed width:
    one shape per bucket) and context lengths are tensors here, inputs of the graph. Elsewhere it is
    `paged_attention_op`, which runs 04's eager paged attention in Python, whatever the step."""

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
        # compared on every call): dynamo keeps one cache of graphs for the model's forward, shared
        # by every engine that compiles this model class, and the engine skips the guards on
        # modules, so this is what keeps an engine off another engine's graphs and frozen weights.
        if self.kv_cache is None or self.key < 0:
            return paged_attention_op(q, k, v, self.key, layer_idx)
        # eager: the function itself (pybind), cheaper than the dispatcher's boxed call
        op = torch.ops.nano_vllm_cpu.paged_decode_step if torch.compiler.is_compiling() \
            else cpu_extension().paged_decode_step
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


# ----------------------------------------------------------------------------- timed here


def best_ms(run, repeats: int = 6) -> float:
    """The best of a few runs (the first pays for first touches), in ms."""
    import time
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def show_decode_speed(console, batch: int = 16, context_len: int = 340, dtype=torch.bfloat16) -> None:
    """One layer's decode attention both ways at Qwen3-0.6B's heads, timed on this machine."""
    H, n_kv, d, bs = 16, 8, 128, 16
    blocks = -(-context_len // bs)
    k_cache = torch.randn(batch * blocks, n_kv, bs, d, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(batch * blocks).view(batch, blocks)     # scattered over the pool
    lens, q = torch.full((batch,), context_len), torch.randn(batch, H, d, dtype=dtype)
    ms = {name: best_ms(lambda: paged.paged_decode_attention(q, k_cache, v_cache, tables, lens, backend=backend))
          for name, backend in (("the kernel", CPUAttention(decode=True, prefill=False)), ("gather + SDPA", paged.TORCH_SDPA))}
    kv_mb = 2 * k_cache.numel() * k_cache.element_size() / 1e6
    console.print(f"one layer of decode, Qwen3-0.6B's heads, {batch} sequences x {context_len} tokens, "
                  f"{str(dtype).removeprefix('torch.')} ({kv_mb:.0f} MB of k/v): "
                  + ", ".join(f"{name} {t:.2f} ms ({kv_mb / t:.0f} GB/s)" for name, t in ms.items()))


def show_prefill_speed(console, prompt_len: int = 512) -> None:
    """One layer's attention over a bf16 prompt both ways at Qwen3-0.6B's heads, timed on this
    machine, and how far each is from the exact answer (float64)."""
    F = torch.nn.functional
    H, n_kv, d = 16, 8, 128
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(prompt_len, h, d, generator=g).bfloat16() for h in (H, n_kv, n_kv))
    heads = lambda x: x.transpose(0, 1)[None]             # noqa: E731   (n, h, d) -> (1, h, n, d)
    ways = {"the kernel": lambda: cpu_extension().causal_attention(q, k, v),
            "SDPA (flash)": lambda: F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True,
                                                                   enable_gqa=True)[0].transpose(0, 1)}
    exact = F.scaled_dot_product_attention(heads(q.double()), heads(k.double()).repeat_interleave(H // n_kv, 1),
                                           heads(v.double()).repeat_interleave(H // n_kv, 1), is_causal=True)[0]
    flops = 2 * 2 * H * d * prompt_len * (prompt_len + 1) / 2           # q.k and p.v over the causal half
    console.print(f"one layer of a {prompt_len}-token bf16 prompt, Qwen3-0.6B's heads:")
    for name, run in ways.items():
        t = best_ms(run, 5)
        err = (run().double() - exact.transpose(0, 1)).abs().max().item()
        console.print(f"  {name:14s} {t:6.2f} ms ({flops / t / 1e6:4.0f} GFLOP/s), max abs diff from float64 {err:.1e}")


if __name__ == "__main__":
    from rich.console import Console
    console = Console()
    if cpu_extension() is None:
        raise SystemExit("nano_kernels/csrc could not be built here: nothing to time")
    show_decode_speed(console)
    if prefill_kernel_applies(128, torch.bfloat16, torch.device("cpu")):
        show_prefill_speed(console)
