"""Shared test setup: the numbered files are imported by name, the way each file imports the ones before it."""
import importlib
import os
import sys

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

# Generated checkpoints (presets `tiny`, `demo`) go to a throwaway folder, never the user's cache.
if "NANO_VLLM_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile
    os.environ["NANO_VLLM_CACHE"] = tempfile.mkdtemp(prefix="nano-vllm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["NANO_VLLM_CACHE"], True)
