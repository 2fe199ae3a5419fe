"""
nano_kernels/extension.py - every C++ file in nano_kernels/csrc/ built as ONE torch extension, once per machine.

`torch.utils.cpp_extension.load` compiles the sources with ninja, in parallel, into a library that
torch keeps under ~/.cache/torch_extensions (or $TORCH_EXTENSIONS_DIR) and reloads in later
processes without compiling. The first build on a machine takes tens of seconds; it says so on
one line of stderr. Without a C++ compiler (or when the build fails for any reason) there is one
warning, `cpu_extension()` returns None and the engine keeps torch's own ops: the same tokens.

The library's name carries the CPU's vector ISA (and whether it multiplies bf16 pairs), so a home
folder shared by machines of another kind never loads code built for instructions they lack.

Nothing here can hang a run:
- A build interrupted half-way (Ctrl-C, SIGTERM, a killed process) must not block the next one:
  torch's own build lock is a plain file that a dead process leaves behind, and every later build
  would wait on it forever. So builds are serialised by an flock on `build.flock` in the build
  folder (released by the OS when its holder dies, however it dies); whoever holds it knows a
  torch `lock` file it finds is stale, and removes it.
- A build is bounded: it runs in a child process, in a process group of its own (its ninja and
  compilers go with it), stopped after NANO_VLLM_BUILD_TIMEOUT seconds (default 600); this
  process then loads the library the child built (a fraction of a second). Waiting for another
  process's build is bounded by the same time. Past either bound: one warning, None, torch's ops.
- A build is needed when there is no library, a source is newer than it, or `build.key` (written
  beside it) says it was built by another torch, Python, compiler, set of flags or sources.
"""
from __future__ import annotations

import fcntl
import functools
import glob
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings

import torch

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
DEFAULT_BUILD_TIMEOUT_S = 600.0

qwen3 = importlib.import_module("02_model")

# The child that builds: torch's own `load`, then exit. Its alarm is a backstop for a parent that
# died without stopping it: the child then stops its own process group (ninja stops its compilers).
CHILD = r"""
import json, os, signal, sys
signal.signal(signal.SIGALRM, lambda *_: os.killpg(0, signal.SIGTERM))
signal.alarm(int(sys.argv[2]))
from torch.utils import cpp_extension
try:
    cpp_extension.load(**json.loads(sys.argv[1]))
except Exception as e:
    sys.stderr.write("\nBUILD ERROR: " + (str(e).strip() or type(e).__name__))
    sys.exit(1)
"""


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


def build_timeout() -> float:
    """The bound on a build (and on waiting for another's), in seconds: NANO_VLLM_BUILD_TIMEOUT, else 600."""
    value = os.environ.get("NANO_VLLM_BUILD_TIMEOUT")
    if value is None:
        return DEFAULT_BUILD_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"NANO_VLLM_BUILD_TIMEOUT={value!r} is not a positive number of seconds")
    return seconds


def take_lock(guard, timeout: float) -> None:
    """The build folder's flock, waiting at most `timeout` s for the process that holds it."""
    deadline, told = time.monotonic() + timeout, False
    while True:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"another process held its build folder for over {timeout:g} s "
                                   "(NANO_VLLM_BUILD_TIMEOUT sets the bound)") from None
            if not told:
                print("waiting for another process's build of nano_kernels/csrc ...", file=sys.stderr, flush=True)
                told = True
            time.sleep(0.1)


def needs_build(folder: str, name: str, key: str) -> bool:
    """No library, a source newer than it, or one built under another key (then its objects go too)."""
    library = os.path.join(folder, f"{name}.so")
    if not os.path.exists(library):
        return True
    if any(os.path.getmtime(p) > os.path.getmtime(library) for p in glob.glob(os.path.join(CSRC, "*"))):
        return True
    built_with = read_key(folder)
    if built_with is not None and built_with != key:                # ninja would relink objects of another torch
        for path in glob.glob(os.path.join(folder, "*.o")) + [library]:
            os.remove(path)
        return True
    return False


def read_key(folder: str) -> str | None:
    try:
        with open(os.path.join(folder, "build.key")) as f:
            return f.read()
    except FileNotFoundError:
        return None


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's process group (ninja passes it on to its compilers); SIGKILL to what
    is left of the group after 5 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            proc.poll()                                             # reaps the child once it has exited
            os.killpg(proc.pid, 0)                                  # ProcessLookupError: the group is gone
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def build_in_child(arguments: dict, timeout: float, guard) -> None:
    """torch's `load` in a child process, stopped (with its ninja and compilers) after `timeout` s.
    The child holds the flock too (an inherited descriptor), so it stays held while the child lives."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(arguments), str(math.ceil(timeout) + 10)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, pass_fds=(guard.fileno(),))
    try:
        _, err = proc.communicate(timeout=timeout)
    except BaseException as e:                                      # the bound, Ctrl-C: the build goes, all of it
        stop(proc)
        if isinstance(e, subprocess.TimeoutExpired):
            raise TimeoutError(f"the build did not finish within {timeout:g} s "
                               "(NANO_VLLM_BUILD_TIMEOUT sets the bound)") from None
        raise
    if proc.returncode != 0:
        error = err.rpartition("BUILD ERROR: ")[2].strip() if "BUILD ERROR: " in err else ""
        raise RuntimeError(error or f"the build process exited with {proc.returncode}: {err.strip()[-500:]}")


def build(name: str | None = None, build_directory: str | None = None):
    """Compile (if needed, in a child process, bounded) and load nano_kernels/csrc/*.cpp; returns
    the Python module. Raises what the build raises, TimeoutError past the bound."""
    from torch.utils import cpp_extension
    name = name or extension_name()
    folder = build_directory or cpp_extension._get_build_directory(name, verbose=False)
    os.makedirs(folder, exist_ok=True)
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    arguments = dict(name=name, sources=sources, extra_cflags=compiler_flags(), extra_ldflags=["-fopenmp"],
                     extra_include_paths=[CSRC], build_directory=folder)
    key = json.dumps({"torch": torch.__version__, "python": sys.version, "compiler": os.environ.get("CXX", "c++"),
                      **{k: v for k, v in arguments.items() if k != "build_directory"}}, sort_keys=True)
    timeout = build_timeout()
    with open(os.path.join(folder, "build.flock"), "w") as guard:
        take_lock(guard, timeout)                                   # a live build's; a dead one's is gone
        stale = os.path.join(folder, "lock")
        if os.path.exists(stale):                                   # torch's, left by a build that was killed
            os.remove(stale)
        if needs_build(folder, name, key):
            print(f"building nano_kernels/csrc ({len(sources)} C++ files, one extension) for this CPU "
                  f"({torch.backends.cpu.get_cpu_capability()}); once per machine, a minute or less ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            build_in_child(arguments, timeout, guard)
            print(f"built nano_kernels/csrc in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        module = cpp_extension.load(**arguments)                    # built: ninja finds nothing to do
        if read_key(folder) != key:                                 # what the library was built with
            with open(os.path.join(folder, "build.key.tmp"), "w") as f:
                f.write(key)
            os.replace(os.path.join(folder, "build.key.tmp"), os.path.join(folder, "build.key"))
    return module


@functools.cache
def cpu_extension():
    """The built extension, or None after one warning where it cannot be built: then every fast
    path that needs it stays off and torch's ops run."""
    try:
        module = build()
    except Exception as e:   # no compiler or ninja, a failed compile or link, past the bound: torch's ops
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"nano_kernels/csrc could not be built ({first_line}); torch's ops run instead", stacklevel=2)
        return None
    # what compiled code needs to know of the two dispatcher ops: their outputs' shapes (once a process)
    if not hasattr(cpu_extension, "fakes_registered"):
        torch.library.register_fake("nano_vllm_cpu::paged_decode_step", lambda q, *rest: torch.empty_like(q))
        torch.library.register_fake("nano_vllm_cpu::gemv", lambda x, weight: x.new_empty(x.shape[0], weight.shape[0]))
        cpu_extension.fakes_registered = True
    return module
