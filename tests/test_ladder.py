"""The numbered files are the lesson: each runs on its own as a short demo that compiles nothing,
imports only the files before it (never nano_kernels/), and the ladder stays within its budgets."""
import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

LADDER = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "0[1-7]_*.py")))


def test_the_ladder_has_seven_steps():
    assert [f[:2] for f in LADDER] == ["01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.parametrize("name", LADDER)
def test_each_file_runs_alone_and_compiles_nothing(name, tmp_path):
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "NANO_VLLM_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, name], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip(), "a demo shows something"
    assert not any(extensions.iterdir()), "a numbered file compiled C++"


@pytest.mark.parametrize("name", LADDER)
def test_each_file_imports_only_the_files_before_it(name):
    source = open(os.path.join(ROOT, name)).read()
    assert not re.search(r"^\s*(import|from)\s+(nano_kernels|engine)\b|import_module\(\"(nano_kernels|engine)", source, re.M)
    for imported in re.findall(r'import_module\("(\d\d)_', source):
        assert imported < name[:2], f"{name} imports {imported}_*"


def test_budgets():
    """Proxies for readability: 01-07 together at most 2,800 lines and none over 600; engine.py at
    most 600; the README at most 250."""
    count = lambda f: sum(1 for _ in open(os.path.join(ROOT, f)))   # noqa: E731
    sizes = {f: count(f) for f in LADDER}
    assert sum(sizes.values()) <= 2800 and max(sizes.values()) <= 600, sizes
    assert count("engine.py") <= 600 and count("README.md") <= 250


def test_no_cpp_in_python_strings():
    """C++ lives in nano_kernels/csrc/*.cpp, never in Python strings."""
    for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True):
        if "/tests/" in path:
            continue
        source = open(path).read()
        assert not re.search(r"#include <|TORCH_LIBRARY|load_inline", source), path
