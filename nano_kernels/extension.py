"""
nano_kernels/extension.py - every C++ file in nano_kernels/csrc/ built as ONE torch extension, once per machine.

`torch.utils.cpp_extension.load` compiles the sources with ninja, in parallel, into a library that
torch keeps under ~/.cache/torch_extensions (or $TORCH_EXTENSIONS_DIR) and reloads in later
processes without compiling. The first build on a machine takes tens of seconds; it says so on
one line of stderr. Without a C++ compiler (or when the build fails for any reason) there is one
warning, `cpu_extension()` returns None and the engine keeps torch's own ops: the same tokens.

The library's name carries the CPU's vector ISA (and whether it multiplies bf16 pairs), so a home
folder shared by machines of another kind never loads code built for instructions they lack.

A build interrupted half-way (Ctrl-C, SIGTERM, a killed process) must not block the next one:
torch's own build lock is a plain file that a dead process leaves behind, and every later build
would wait on it forever. So builds are serialised by an flock (released by the OS when its
holder dies, however it dies); whoever holds it knows a torch lock file it finds is stale.
"""
from __future__ import annotations

import fcntl
import functools
import glob
import importlib
import os
import sys
import time
import warnings

import torch

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")

qwen3 = importlib.import_module("02_model")


def extension_name() -> str:
    """nano_vllm_cpu_<isa>[_bf16]: one library per kind of CPU."""
    isa = torch.backends.cpu.get_cpu_capability().lower()          # "avx512", "avx2", "default", ...
    return f"nano_vllm_cpu_{isa}" + ("_bf16" if qwen3.cpu_has_bf16() else "")


def compiler_flags() -> list[str]:
    flags = ["-O3", "-march=native", "-fopenmp"]                    # OpenMP: torch's own thread pool runs the work
    isa = torch.backends.cpu.get_cpu_capability()
    if isa in ("AVX512", "AVX2"):
        flags.append(f"-DCPU_CAPABILITY_{isa}")                     # at::vec's SIMD implementation for it
    return flags


def build(name: str | None = None, build_directory: str | None = None):
    """Compile (or load the already compiled) nano_kernels/csrc/*.cpp; returns the Python module.
    Raises what the build raises."""
    from torch.utils import cpp_extension
    name = name or extension_name()
    folder = build_directory or cpp_extension._get_build_directory(name, verbose=False)
    os.makedirs(folder, exist_ok=True)
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    with open(os.path.join(folder, "build.flock"), "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)                           # waits for a live build; a dead one's is gone
        stale = os.path.join(folder, "lock")
        if os.path.exists(stale):                                   # left by a build that was killed
            os.remove(stale)
        fresh = not glob.glob(os.path.join(folder, f"{name}*.so"))
        if fresh:
            print(f"building nano_kernels/csrc ({len(sources)} C++ files, one extension) for this CPU "
                  f"({torch.backends.cpu.get_cpu_capability()}); once per machine, ~1 min ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        module = cpp_extension.load(name, sources, extra_cflags=compiler_flags(), extra_ldflags=["-fopenmp"],
                                    extra_include_paths=[CSRC], build_directory=folder)
        if fresh:
            print(f"built nano_kernels/csrc in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return module


@functools.cache
def cpu_extension():
    """The built extension, or None after one warning where it cannot be built: then every fast
    path that needs it stays off and torch's ops run."""
    try:
        module = build()
    except Exception as e:   # no compiler, no ninja, a failed compile or link: all mean "use torch's ops"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"nano_kernels/csrc could not be built ({first_line}); torch's ops run instead", stacklevel=2)
        return None
    # what compiled code needs to know of the two dispatcher ops: their outputs' shapes (once a process)
    if not hasattr(cpu_extension, "fakes_registered"):
        torch.library.register_fake("nano_vllm_cpu::paged_decode_step", lambda q, *rest: torch.empty_like(q))
        torch.library.register_fake("nano_vllm_cpu::gemv", lambda x, weight: x.new_empty(x.shape[0], weight.shape[0]))
        cpu_extension.fakes_registered = True
    return module
