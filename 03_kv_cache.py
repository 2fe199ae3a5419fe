"""
03 - The KV cache: compute each token's keys and values once, keep them, reuse them.

Greedy generation appends one token at a time, and the model has to run again for every new
token. Without a cache (`naive_generate` in file 02) each step runs the *whole* sequence again:

    step t:  ids[0 .. P+t)  -> every layer recomputes K and V for all P+t tokens -> 1 new token

so producing T tokens after a P-token prompt runs the model over P + (P+1) + ... + (P+T-1) tokens,
O(T * (P + T)): quadratic. But in a causal model the keys and values of token j depend only on
tokens 0..j, so they are the same at every later step. Compute them once and keep them:

    prefill:  ids[0 .. P)  -> write K, V of the P prompt tokens into the cache   (one forward)
    decode:   ids[P+t]     -> write K, V of that ONE token, its query attends over the cache

Now every token goes through the projections and the MLP exactly once: P + T tokens of work, linear.
(Attention still reads all previous keys, O(P + t) per step, but that is a cheap dot product per token.)

The price is memory. Each token leaves, in every layer, one key and one value vector per KV head:

    bytes per token = 2 (K and V) x layers x kv_heads x head_dim x bytes per element
    Qwen3-0.6B, bf16: 2 x 28 x 8 x 128 x 2 = 114688 bytes = 112 KiB

so a 4096-token conversation holds 448 MiB of cache, about 40% of the model's own 1.2 GB of bf16
weights (grouped-query attention already halved it: one KV head per query head would double it).

This file's cache is the simplest one: per sequence, one preallocated tensor filled from position 0 up,

    kv: (layers, 2, max_len, kv_heads, head_dim)        `length` positions in use

and the model is reused unchanged: each layer calls `context.attend(layer_idx, q, k, v)` (file 02's
seam), which writes k/v at positions [length, length + N) and attends the N new queries to positions
[0, length + N), causally. After the forward, `length` moves on by N.

The limitation that motivates file 04: `max_len` has to be reserved up front, for the longest the
sequence *might* get. A server with many sequences of unknown length either reserves the worst case
for each (most of it never used) or runs out; freed caches of different sizes fragment memory; and
two requests with the same prompt prefix (a shared system prompt) cannot share it, because each cache
is one private contiguous tensor. Paged attention (file 04) hands out fixed-size blocks on demand.

    python 03_kv_cache.py       # KV bytes per token for Qwen3-0.6B, a cache filling up, cached vs uncached speed
"""
from __future__ import annotations

import importlib
import sys
import time

import torch
import torch.nn.functional as F

M = importlib.import_module("02_model")

# ----------------------------------------------------------------------------- the cache

class CacheFullError(ValueError):
    """More tokens than the cache's preallocated `max_len` positions."""


class KVCache:
    """A contiguous, preallocated KV cache for one sequence, usable as the model's attention context:
    `kv[layer, 0]` holds keys, `kv[layer, 1]` values. `cached_forward` runs a forward, then `advance`."""

    def __init__(self, cfg: M.ModelConfig, max_len: int, dtype: torch.dtype = torch.float32, device="cpu"):
        self.cfg, self.max_len, self.length = cfg, max_len, 0
        self.kv = torch.zeros(cfg.num_hidden_layers, 2, max_len, cfg.num_key_value_heads, cfg.head_dim,
                              dtype=dtype, device=device)  # (L, 2, max_len, H_kv, d)

    @property
    def bytes_per_token(self) -> int:
        return self.cfg.kv_bytes_per_token(self.kv.dtype)

    @property
    def bytes_used(self) -> int:
        return self.length * self.bytes_per_token

    @property
    def bytes_allocated(self) -> int:
        return self.kv.nbytes  # = max_len * bytes_per_token, whether used or not

    def check_room(self, n: int) -> None:
        if self.length + n > self.max_len:
            raise CacheFullError(f"KV cache full: {self.length} positions used + {n} new tokens "
                                 f"> max_len={self.max_len} (allocate a larger cache)")

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the N new tokens' k/v for this layer, attend their queries over the whole cache.
        q: (N, H, d), k/v: (N, H_kv, d), already normed and rotated -> (N, H, d)."""
        N = q.shape[0]
        start, end = self.length, self.length + N
        self.check_room(N)
        self.kv[layer_idx, 0, start:end] = k                       # (N, H_kv, d)
        self.kv[layer_idx, 1, start:end] = v                       # (N, H_kv, d)
        keys = self.kv[layer_idx, 0, :end]                         # (T, H_kv, d), T = end
        values = self.kv[layer_idx, 1, :end]                       # (T, H_kv, d)
        # New token i sits at position start + i and may see positions 0 .. start + i. SDPA's
        # is_causal aligns the triangle to the top-left (query 0 sees key 0 only), right only
        # when start == 0, so the mask is written out. One new token (decode) sees everything.
        mask = None
        if N > 1:
            key_pos = torch.arange(end, device=q.device)             # (T,)
            query_pos = torch.arange(start, end, device=q.device)    # (N,)
            mask = key_pos[None, :] <= query_pos[:, None]            # (N, T) True = may attend
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),  # (H, N, d), (H_kv, T, d)
            attn_mask=mask, enable_gqa=True,
        )                                                          # (H, N, d)
        return out.transpose(0, 1)                                 # (N, H, d)

    def advance(self, n: int) -> None:
        """Mark n more positions as filled (after a forward over n new tokens)."""
        self.check_room(n)
        self.length += n


def cached_forward(model: M.Qwen3ForCausalLM, cache: KVCache, input_ids: torch.Tensor) -> torch.Tensor:
    """Run the N tokens that come next in the sequence (input_ids (N,)) through the model with the
    cache as attention context: positions continue from `cache.length`, and the cache then holds
    them. Returns hidden states (N, hidden)."""
    N = input_ids.shape[0]
    cache.check_room(N)  # fail before any layer has written anything
    positions = torch.arange(cache.length, cache.length + N, device=input_ids.device)  # (N,)
    hidden = model(input_ids, positions, context=cache)        # (N, hidden)
    cache.advance(N)
    return hidden


# ----------------------------------------------------------------------------- generation

@torch.inference_mode()
def greedy_steps(model: M.Qwen3ForCausalLM, prompt_ids: list[int], max_new_tokens: int,
                 eos_token_ids=(), max_len: int | None = None, cache: KVCache | None = None):
    """Yield (next_id, logits (vocab,)) once per generated token: one prefill forward over the
    prompt, then one single-token forward per step. `max_len` defaults to exactly what is needed
    (prompt + max_new_tokens); pass `cache` to watch it fill up."""
    if len(prompt_ids) == 0:
        raise ValueError("the prompt must have at least one token")
    weight = model.model.embed_tokens.weight
    if cache is None:
        cache = KVCache(model.config, max_len or len(prompt_ids) + max_new_tokens, weight.dtype, weight.device)
    if cache.length + len(prompt_ids) + max_new_tokens > cache.max_len:
        raise CacheFullError(f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new tokens needs "
                             f"{len(prompt_ids) + max_new_tokens} cache positions, but the cache has "
                             f"max_len={cache.max_len} ({cache.length} already used)")
    x = torch.tensor(prompt_ids, device=weight.device)               # (P,) prefill: the whole prompt
    for _ in range(max_new_tokens):
        hidden = cached_forward(model, cache, x)                     # (N, hidden)
        logits = model.compute_logits(hidden[-1])                    # (vocab,) only the last token's
        next_id = int(logits.argmax())
        yield next_id, logits
        if next_id in eos_token_ids:
            return
        x = torch.tensor([next_id], device=weight.device)           # (1,) decode: just the new token


def generate_with_cache(model: M.Qwen3ForCausalLM, prompt_ids: list[int], max_new_tokens: int,
                        eos_token_ids=(), max_len: int | None = None) -> list[int]:
    """Greedy decoding with a KV cache, batch of one. Same result as `naive_generate`: only the
    generated ids, stopping after an eos id (included)."""
    return [i for i, _ in greedy_steps(model, prompt_ids, max_new_tokens, eos_token_ids, max_len)]


# ----------------------------------------------------------------------------- demo

def fmt_bytes(n: float, sep: str = " ") -> str:
    """Binary units, trailing zeros dropped: 1536 -> '1.5 KiB', 114688 -> '112 KiB', 2064384 -> '1.97 MiB'
    (one decimal for KiB, two for MiB and GiB). The teaching modes (modes/) print sizes with it too;
    sep="\u00a0" (a no-break space) keeps number and unit on one line when text is wrapped."""
    units, i = ("B", "KiB", "MiB", "GiB"), 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    number = f"{n:.{min(i, 2)}f}"
    if i:
        number = number.rstrip("0").rstrip(".")
    return f"{number}{sep}{units[i]}"


def main() -> None:
    import tempfile
    from rich.console import Console
    from rich.table import Table
    console = Console()
    tokenize = importlib.import_module("01_tokenize")

    # 1. What one token costs, from the config alone.
    demo = M.PRESETS["demo"]
    console.print(f"[bold]KV cache per token, Qwen3-0.6B architecture[/]: 2 (K, V) x {demo.num_hidden_layers} layers "
                  f"x {demo.num_key_value_heads} KV heads x {demo.head_dim} dims x bytes")
    table = Table("dtype", "per token", "4096 tokens", f"{demo.max_position_embeddings} tokens (max context)")
    for dtype in (torch.bfloat16, torch.float32):
        b = demo.kv_bytes_per_token(dtype)
        table.add_row(str(dtype).removeprefix("torch."), f"{b:,} B = {fmt_bytes(b)}", fmt_bytes(4096 * b),
                      fmt_bytes(demo.max_position_embeddings * b))
    console.print(table)

    with tempfile.TemporaryDirectory() as tmp:
        model = M.load_model(M.make_random_checkpoint(tmp, "tiny", seed=0, dtype="float32"), torch.float32)
        tok = tokenize.load_tokenizer(tmp)
    cfg = model.config

    # 2. A cache filling up: one prefill writes the prompt, each decode step one position.
    prompt = tok.encode("The capital of France is")
    cache = KVCache(cfg, max_len=len(prompt) + 12)
    console.print(f"\n[bold]a cache filling up[/]: `tiny` preset ({cfg.num_hidden_layers} layers, "
                  f"{cfg.num_key_value_heads} KV heads x {cfg.head_dim} dims), fp32 = {cache.bytes_per_token} B/token, "
                  f"kv {tuple(cache.kv.shape)} preallocated = {fmt_bytes(cache.bytes_allocated)}")
    table = Table("step", "tokens in", "length", "KiB used", "positions")
    for step, _ in enumerate(greedy_steps(model, prompt, 12, cache=cache)):
        fed = len(prompt) if step == 0 else 1
        bar = "#" * cache.length + "." * (cache.max_len - cache.length)
        if step < 4 or step == 11:
            table.add_row("prefill" if step == 0 else f"decode {step}", str(fed), f"{cache.length}/{cache.max_len}",
                          f"{cache.bytes_used / 1024:.1f} / {cache.bytes_allocated / 1024:.1f}", bar)
        elif step == 4:
            table.add_row("...", "", "", "", "")
    console.print(table)
    console.print("(12 tokens generated, 11 cached: the last one is never fed back)")

    # 3. Cached vs uncached decode: the same ids, far less work.
    prompt = tok.encode("A KV cache stores the keys and values of every token the model has already seen. " * 30)
    n_new = 32

    def best_of_3(generate):  # the fastest of three runs: the least disturbed by whatever else runs
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = generate(model, prompt, n_new)
            times.append(time.perf_counter() - t0)
        return out, min(times)

    ref, t_naive = best_of_3(M.naive_generate)
    ids, t_cached = best_of_3(generate_with_cache)
    P = len(prompt)
    table = Table("", "tokens through the model", "time", "tokens/s")
    table.add_row("naive_generate (no cache)", f"{sum(P + t for t in range(n_new)):,}", f"{t_naive:.3f} s",
                  f"{n_new / t_naive:.0f}")
    table.add_row("generate_with_cache", f"{P + n_new - 1:,}", f"{t_cached:.3f} s", f"{n_new / t_cached:.0f}")
    console.print(f"\n[bold]{n_new} new tokens after a {P}-token prompt[/] (`tiny` preset, fp32, "
                  f"{torch.get_num_threads()} CPU threads): {t_naive / t_cached:.1f}x faster with the cache")
    console.print(table)
    console.print(f"identical ids: {ids == ref}  ({ids[:6]} ...)")
    if ids != ref:
        raise SystemExit("cached and uncached generation disagree")


if __name__ == "__main__":
    sys.exit(main())
