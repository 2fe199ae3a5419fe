"""Shared test setup: the numbered files are imported by name, the way each file imports the ones before it."""
import importlib
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


def load(name: str):
    """importlib.import_module for a numbered file, e.g. load("02_model")."""
    return importlib.import_module(name)


def hf_saved_checkpoint(folder: str, preset: str = "tiny", seed: int = 3) -> str:
    """A checkpoint written by transformers' own save_pretrained (its config.json and safetensors
    layout), random weights of a 02_model preset. Needs transformers (a test-only dependency)."""
    import transformers
    M = load("02_model")
    cfg = transformers.Qwen3Config(**{k: v for k, v in M.hf_config_dict(M.PRESETS[preset]).items()
                                      if k not in ("architectures", "model_type", "torch_dtype")})
    hf = transformers.Qwen3ForCausalLM(cfg)
    hf.load_state_dict(M.random_state_dict(M.PRESETS[preset], seed), strict=False)
    hf.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- nano_kernels/ (the C++ fast paths)

HAS_COMPILER = shutil.which("c++") is not None
NEEDS_COMPILER = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler to build nano_kernels/csrc")


def built_cpu_extension():
    """nano_kernels/csrc's extension. No C++ compiler here: the test skips. A compiler is here: it must
    have built (a failed build is a failure, never a skip)."""
    if not HAS_COMPILER:
        pytest.skip("no C++ compiler to build nano_kernels/csrc")
    from nano_kernels.extension import cpu_extension
    ext = cpu_extension()
    assert ext is not None, "a C++ compiler is here, so nano_kernels/csrc must build"
    return ext


@pytest.fixture
def no_extension():
    """A machine where nano_kernels/csrc cannot be built (no compiler, no ninja): every build raises,
    cpu_extension() warns once and is None. Its cache is cleared before and after, so the tests
    after this one see the real extension again."""
    import torch.utils.cpp_extension
    from nano_kernels.extension import cpu_extension

    def cannot_build(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.utils.cpp_extension, "load", cannot_build)
            cpu_extension.cache_clear()
            with pytest.warns(UserWarning, match="could not be built") as warned:
                assert cpu_extension() is None
            assert len(warned) == 1
            yield
    finally:
        cpu_extension.cache_clear()


# Generated checkpoints (presets `tiny`, `demo`) go to a throwaway folder, never the user's cache.
if "NANO_VLLM_CACHE" not in os.environ:
    import atexit
    import tempfile
    os.environ["NANO_VLLM_CACHE"] = tempfile.mkdtemp(prefix="nano-vllm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["NANO_VLLM_CACHE"], True)
