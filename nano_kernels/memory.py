"""
nano_kernels/memory.py - where a CPU engine's memory lives: huge pages, malloc's habits, what the CPU is.

A decode step streams every weight once and gathers K/V blocks from all over the pool. With 4 KiB
pages each 4 KiB needs its own TLB entry, so streaming gigabytes is a page walk every 4 KiB; a
2 MiB page covers 512 of them. Many Linux systems give huge pages only to memory that asks for
them (transparent huge pages in "madvise" mode), and torch's allocator does not ask. So the weights
are loaded straight into memory that asks (`huge_page_allocator`, no second copy), and so is the
KV pool (`huge_page_zeros`).
"""
from __future__ import annotations

import ctypes
import math
import mmap
import resource

import torch

HUGE_PAGE = 2 * 2**20


def keep_freed_memory_mapped() -> bool:
    """Ask glibc's malloc to keep freed memory instead of returning it to the OS.

    By default every allocation above a threshold gets fresh pages from the OS (mmap) and gives
    them back when freed, so each large activation of every step page-faults all its pages in
    again. With mmap and trimming off, freed blocks go back to malloc's heap and the next step's
    tensors of the same sizes reuse pages already mapped (what jemalloc or tcmalloc, the usual
    advice for PyTorch on CPU, also achieve). The cost: the process keeps its peak memory.
    Linux/glibc only; returns False where it could not be applied."""
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4        # mallopt parameters, from glibc's <malloc.h>
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):             # not glibc (macOS, musl, Windows)
        return False


def huge_page_zeros(shape, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor in memory that asked Linux for 2 MiB pages: an anonymous private mapping
    (zeroed by the kernel), aligned to 2 MiB, madvise(MADV_HUGEPAGE), wrapped as a tensor (the
    tensor keeps the mapping alive). Where the OS has no such advice (not Linux), ordinary pages."""
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


def available_memory_bytes() -> int | None:
    """What Linux says can still be allocated without swapping (MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_fits(nbytes: int, what: str, change: str) -> None:
    """A ValueError saying what to change where nbytes is more than the memory available now, so a
    run too big for the machine stops with a sentence instead of the allocator's ENOMEM."""
    free = available_memory_bytes()
    if free is not None and nbytes > free:
        raise ValueError(f"{what} would take {nbytes / 2**30:.2f} GiB, but {free / 2**30:.2f} GiB of memory is "
                         f"available: {change}")


def huge_page_allocator(shared: bool = True):
    """An `allocate` for 02_model.load_model: every weight in one huge-page buffer, each 64-byte
    (cache-line) aligned. shared=False: each matrix of 2 MiB or more in a buffer of its own, the
    rest in ordinary memory (what torch.compile's freezing needs: it takes parameters that share
    one storage for one constant and computes garbage)."""
    def allocate(shapes: dict[str, torch.Size], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        elem = torch.empty((), dtype=dtype).element_size()
        nbytes = {name: math.prod(shape) * elem for name, shape in shapes.items()}
        check_fits(sum(nbytes.values()), "the model's weights", "choose a smaller model or --dtype")
        if not shared:
            return {name: huge_page_zeros(shape, dtype) if nbytes[name] >= HUGE_PAGE else torch.empty(shape, dtype=dtype)
                    for name, shape in shapes.items()}
        sizes = {name: -(-n // 64) * 64 for name, n in nbytes.items()}
        buffer = huge_page_zeros((sum(sizes.values()),), torch.uint8)
        out, offset = {}, 0
        for name, shape in shapes.items():
            out[name] = buffer[offset:offset + nbytes[name]].view(dtype).view(shape)
            offset += sizes[name]
        return out
    return allocate


def peak_rss_bytes() -> int:
    """The most resident memory this process has held since it started, or since reset_peak_rss
    (Linux's VmHWM; elsewhere the process's lifetime peak, ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Start peak_rss_bytes afresh from the memory resident now (Linux: clear_refs 5; elsewhere a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


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
