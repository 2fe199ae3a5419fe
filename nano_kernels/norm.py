"""
nano_kernels/norm.py - the norms of a step in one C++ call each (rms_norm.cpp), as module swaps.

Between a decode step's matrix products sit 57 RMSNorms of the hidden state and, per layer, the q/k norms and RoPE;
in eager torch each norm is ~9 small ops and the q/k part ~20, and their dispatch costs add up
when the products themselves take microseconds. The swapped modules compute bit for bit what
02_model.py computes (the C++ rounds every product and sum as torch's ops do), and hand anything
they were not written for back to 02's code.
"""
from __future__ import annotations

import importlib

import torch

from nano_kernels.extension import cpu_extension
from nano_kernels.linear import swap_modules

qwen3 = importlib.import_module("02_model")


class FusedRMSNorm(qwen3.RMSNorm):
    """02's RMSNorm (the same weight Parameter and eps) whose decode-sized inputs run one C++ call;
    larger ones, prefill, run 02's code (F.rms_norm is already one kernel there)."""

    MAX_NUMEL = 1 << 15          # a batch of 32 rows of hidden 1024, or 16 tokens' 16 heads of 128

    def __init__(self, norm: qwen3.RMSNorm):
        torch.nn.Module.__init__(self)
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.MAX_NUMEL and x.is_contiguous() and x.dtype == self.weight.dtype:
            return cpu_extension().rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class FusedNormRoPEAttention(qwen3.Qwen3Attention):
    """02's attention (the same submodules) whose q and k go through their norms and RoPE in one
    C++ call (02's `norm_and_rotate` seam), bit for bit FusedRMSNorm's kernel and 02's apply_rope.
    Where something hooks q_norm or k_norm (the x-ray reads them), 02's code runs."""

    def __init__(self, attn: qwen3.Qwen3Attention):
        torch.nn.Module.__init__(self)
        self.layer_idx, self.n_heads, self.n_kv, self.head_dim = attn.layer_idx, attn.n_heads, attn.n_kv, attn.head_dim
        self.rope_theta = attn.rope_theta
        for name, child in attn.named_children():
            self.add_module(name, child)

    def norm_and_rotate(self, q, k, cos, sin):
        if q.dtype == self.q_norm.weight.dtype and not (self.q_norm._forward_hooks or self.k_norm._forward_hooks):
            return cpu_extension().norm_and_rotate(q, k, self.q_norm.weight, self.k_norm.weight, cos, sin,
                                                   self.q_norm.eps)
        return super().norm_and_rotate(q, k, cos, sin)


def use_cpu_norm_kernel(model: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Swap every RMSNorm for FusedRMSNorm and every attention for FusedNormRoPEAttention (fp32 and
    bf16, where the C++ builds). Eager only: under torch.compile inductor fuses these ops itself."""
    if dtype not in (torch.float32, torch.bfloat16) or cpu_extension() is None:
        return False
    swap_modules(model, lambda m: type(m) is qwen3.Qwen3Attention, FusedNormRoPEAttention)
    swap_modules(model, lambda m: type(m) is qwen3.RMSNorm, FusedRMSNorm)
    return True
