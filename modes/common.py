"""What the modes share, so that a size or a token reads the same in every one of them.

fmt_bytes is 03_kv_cache.py's own (the file where bytes per token first come up): one function,
imported the way the numbered files import each other.
"""
from __future__ import annotations

import importlib

NBSP = "\u00a0"            # a no-break space: text wrapping never splits a line there

fmt_bytes = importlib.import_module("03_kv_cache").fmt_bytes     # 114688 -> '112 KiB', 2064384 -> '1.97 MiB'


def token_piece(tokenizer, token_id: int, space: str = " ") -> str:
    """How one token reads: special tokens as themselves, others quoted (a partial UTF-8 byte as
    <0xE6>). space: what a space inside a quoted token becomes (NBSP keeps a wrapped line from
    breaking inside a token)."""
    if token_id >= getattr(tokenizer, "vocab_size", float("inf")):
        return "<unused>"           # Qwen3's embedding has 151936 rows for 151669 tokens: padding ids
    s = tokenizer.decode([token_id], skip_special_tokens=False)
    if "\ufffd" in s and hasattr(tokenizer, "token_bytes"):
        return "".join(f"<0x{b:02X}>" for b in tokenizer.token_bytes(token_id))
    if s.startswith("<") and s.endswith(">") and len(s) > 2 and " " not in s:
        return s
    return repr(s).replace(" ", space)
