"""
nano_kernels/ - the fast paths this project writes for itself, and the one call that plugs them in.
(Not `kernels`: that import name belongs to Hugging Face's `kernels` package, which transformers loads.)

The numbered files teach each idea in plain PyTorch and never import this package. Where speed
needs another path they offer a seam, and `plug_in` (called once by engine.py) uses it:

    seam (numbered file)                         what plugs in (this package)
    04: PagedContext(backend=AttentionBackend)   attention.CPUAttention: C++ decode and prompt kernels
    02: nn.Linear modules                        linear.GEMVLinear & co. (module swaps, gpt-fast style)
    02: RMSNorm, Qwen3Attention.norm_and_rotate  norm.FusedRMSNorm, norm.FusedNormRoPEAttention
    02: load_model(allocate=...)                 memory.huge_page_allocator: weights on 2 MiB pages

    csrc/*.cpp       the C++ (against ATen), built as ONE torch extension on first use (extension.py)
    attention.py     04's backend with the kernels; StepAttention, the attention compiled code sees
    linear.py        the linear layers: a GEMV for decode rows, oneDNN / MKL for prompts
    norm.py          RMSNorm and q/k norms + RoPE in one call each
    memory.py        huge pages, malloc's habits, the CPU's vendor, peak memory

Everything here is checked against the plain path it replaces (tests/test_kernels.py); where the
C++ cannot be built, one warning, and the plain path runs.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch

from nano_kernels.attention import CPUAttention, cpu_attention
from nano_kernels.linear import use_cpu_linear_kernels
from nano_kernels.memory import huge_page_allocator
from nano_kernels.norm import use_cpu_norm_kernel

qwen3 = importlib.import_module("02_model")


@dataclass
class FastPaths:
    """What plug_in put in place, for the engine and for bench.py's report."""
    linear: str | None = None                 # the linear modules swapped in, e.g. "GEMVLinear + OneDNNLinear"
    norms: bool = False                       # RMSNorm and q/k norm + RoPE in C++
    attention: CPUAttention | None = None     # 04's backend (None: torch's SDPA)

    @property
    def decode_kernel(self) -> bool:
        """Decode rows attend in paged_decode.cpp (and a decode step's attention is one C++ op)."""
        return self.attention is not None and self.attention.batches_decode_rows

    @property
    def prefill_kernel(self) -> bool:
        """Long bf16 prompt chunks attend in paged_prefill.cpp."""
        return self.attention is not None and self.attention.prefill


def weight_allocator(device: torch.device, compile: bool = False):
    """The `allocate` for 02's load_model: on a CPU, huge pages (under compile, a buffer per big
    matrix: torch.compile's freezing takes weights sharing one storage for one constant); else None."""
    return huge_page_allocator(shared=not compile) if device.type == "cpu" else None


def plug_in(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, block_size: int,
            compile: bool = False) -> FastPaths:
    """Put this machine's fast paths into a loaded model: on a CPU, the linear and norm modules
    swapped (under compile only the GEMV: inductor fuses the rest and picks its own GEMMs) and the
    C++ attention backend; elsewhere nothing (CUDA graphs and torch.compile are the engine's)."""
    if device.type != "cpu":
        return FastPaths()
    cfg = model.config
    return FastPaths(
        linear=use_cpu_linear_kernels(model, dtype, qwen3.cpu_has_bf16(), batched=not compile),
        norms=not compile and use_cpu_norm_kernel(model, dtype),
        attention=cpu_attention(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, block_size,
                                dtype, device))


def configure_cpu_inductor(cache_dir: str) -> None:
    """torch.compile's settings for CPU decode steps: weights frozen into the graph as constants,
    max-autotune's C++ GEMM templates, and a C++ wrapper that calls the step's kernels (the two
    C++ ops among them) without Python in between. Compiled kernels are cached on disk."""
    import torch._inductor.config as inductor
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache_dir)
    inductor.freezing = True
    inductor.max_autotune = True
    inductor.max_autotune_gemm_backends = "CPP,ATEN"
    inductor.cpp_wrapper = True
    torch._dynamo.config.recompile_limit = 64           # one graph per token-count bucket
