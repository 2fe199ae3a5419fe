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

# Generated checkpoints (presets `tiny`, `demo`) go to a throwaway folder, never the user's cache.
if "NANO_VLLM_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile
    os.environ["NANO_VLLM_CACHE"] = tempfile.mkdtemp(prefix="nano-vllm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["NANO_VLLM_CACHE"], True)
