"""
nano_kernels/linear.py - the linear layers on a CPU: module swaps, gpt-fast style.

02_model.py's layers are plain nn.Linear. On a CPU a decode step is a pass over every weight for a
few rows of activations, so tokens per second are set by how fast the weights stream in; a prompt
is the opposite, a GEMM on hundreds of rows, bound by arithmetic. No one kernel is best at both,
so each nn.Linear is swapped for a module that picks by the number of rows:

    GEMVLinear        up to GEMV_MAX_ROWS rows: gemv.cpp, which reads the weight once, front to back
      .batched        more rows: the fastest GEMM of the dtype on this CPU
          PackedLinear       bf16 on a CPU with bf16 units: oneDNN on a copy in its own blocked layout
          OneDNNLinear       fp32 on AMD (MKL takes a generic path there), and bf16's lm_head
          SmallBatchLinear   fp32 elsewhere: MKL, with small batches as (W @ x^T)^T
          nn.Linear          what is left

Every module holds the SAME weight Parameter as the nn.Linear it replaces (a tied lm_head stays
tied), and keeps its name in the model, so forward hooks still find it. The one copy: bf16's packed
layer weights, which oneDNN would otherwise lay out again inside every call (on decode batches of
a few rows that costs more than the product); the lm_head, tied to the embedding on small Qwen3s
and the largest matrix, is not packed (docs/performance.md: speed and memory, measured).
"""
from __future__ import annotations

import torch

from nano_kernels.extension import cpu_extension
from nano_kernels.memory import cpu_vendor

# Up to how many rows gemv.cpp beats the GEMM libraries (bf16 re-converts the weight for each row).
GEMV_MAX_ROWS = {torch.float32: 4, torch.bfloat16: 2}


class PackedLinear(torch.nn.Module):
    """An nn.Linear computed by oneDNN on a copy of the weight in oneDNN's blocked layout for this
    CPU (the layout its kernels read directly); the plain weight stays for the GEMV."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


class OneDNNLinear(torch.nn.Module):
    """An nn.Linear computed by oneDNN's matmul on the plain weight (oneDNN lays it out as its
    kernels read it inside each call, which a GEMM on hundreds of rows amortises)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")


class SmallBatchLinear(torch.nn.Module):
    """An fp32 nn.Linear for small batches on CPU. MKL's kernel for x @ W^T is slow when x has a
    few rows, while the transposed product (W @ x^T)^T - the same dot products - is not; outside
    4 to 32 rows F.linear is as fast or faster."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and 4 <= x.shape[0] <= 32:
            return torch.mm(self.weight, x.t()).t().contiguous()                 # (M, out)
        return torch.nn.functional.linear(x, self.weight)


class GEMVLinear(torch.nn.Module):
    """An nn.Linear whose small batches (decode) run gemv.cpp, and larger ones (prefill) `batched`."""

    def __init__(self, batched: torch.nn.Module, weight: torch.nn.Parameter, max_rows: int):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight, self.batched, self.max_rows = weight, batched, max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= self.max_rows:
            if torch.compiler.is_compiling():          # one opaque op in the graph
                return torch.ops.nano_vllm_cpu.gemv(x, self.weight)
            return cpu_extension().gemv(x, self.weight)                          # (M, out)
        return self.batched(x)


def swap_modules(model: torch.nn.Module, match, replace) -> None:
    """Put replace(child) in place of every submodule for which match(child) holds, under the same
    name in the same parent (forward hooks registered afterwards still find it by name)."""
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if match(child)]
    for parent, name, child in swaps:
        setattr(parent, name, replace(child))


def batched_kind(dtype: torch.dtype, has_bf16: bool, lm_head: bool = False):
    """The module for batches past the GEMV's rows, or None (nn.Linear stays)."""
    onednn = torch.backends.mkldnn.is_available()
    if onednn and dtype == torch.bfloat16 and has_bf16:
        return OneDNNLinear if lm_head else PackedLinear
    if onednn and dtype == torch.float32 and cpu_vendor() == "AuthenticAMD":
        return OneDNNLinear
    if dtype == torch.float32:
        return SmallBatchLinear
    return None


def use_cpu_linear_kernels(model: torch.nn.Module, dtype: torch.dtype, has_bf16: bool, batched: bool = True) -> str | None:
    """Swap every nn.Linear for the CPU modules of its dtype (the table above). Returns the kinds
    used, e.g. "GEMVLinear + OneDNNLinear" (None: nothing swapped). batched=False (under
    torch.compile): only GEMVLinear, larger batches stay nn.Linear, whose GEMMs inductor picks."""
    kinds = {head: batched_kind(dtype, has_bf16, head) if batched else None for head in (False, True)}
    gemv_rows = GEMV_MAX_ROWS.get(dtype, 0) if cpu_extension() is not None else 0
    if kinds[False] is None and not gemv_rows:
        return None
    lm_head = getattr(model, "lm_head", None)

    def replace(linear: torch.nn.Linear) -> torch.nn.Module:
        kind = kinds[linear is lm_head]
        larger = kind(linear) if kind else linear                # what takes batches past gemv_rows
        return GEMVLinear(larger, linear.weight, gemv_rows) if gemv_rows else larger
    swap_modules(model, lambda m: isinstance(m, torch.nn.Linear), replace)
    return " + ".join(dict.fromkeys(k.__name__ for k in (GEMVLinear if gemv_rows else None, *kinds.values()) if k))
