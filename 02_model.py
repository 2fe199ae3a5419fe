"""
02 - Qwen3 in plain PyTorch, and loading it from a Hugging Face checkpoint.

A decoder-only transformer turns token ids into next-token logits:

    ids (N,) -> embed_tokens -> [ decoder layer ] x L -> norm -> lm_head -> logits (N, vocab)

and each Qwen3 decoder layer is two residual sub-blocks, each behind an RMSNorm:

    x = x + o_proj(attention(rope(q_norm(q)), rope(k_norm(k)), v))     q, k, v = x W_q, x W_k, x W_v
    x = x + down_proj(silu(gate_proj(x)) * up_proj(x))                  (SwiGLU MLP)

What is particular to Qwen3 (and where people copying a Llama get it wrong):
  - grouped-query attention: 16 query heads share 8 key/value heads in Qwen3-0.6B, so the
    KV cache (files 03, 04) is half the size it would be with one KV head per query head;
  - `head_dim` is read from the config, it is NOT hidden_size / num_heads
    (Qwen3-0.6B: 16 heads x 128 = 2048 != hidden 1024, so q_proj is 1024 -> 2048);
  - each head's query and key get their own RMSNorm (`q_norm`, `k_norm`) before RoPE;
  - RoPE with theta = 1,000,000, rotating the two halves of each head (HF's "rotate_half");
  - small models tie `lm_head` to the embedding matrix (one 151936 x hidden matrix used twice).

The model works on a flat, "packed" list of tokens: `forward(input_ids (N,), positions (N,))`.
That is the layout the serving engine uses (many sequences back to back, no padding), and with
one sequence it is simply that sequence.

The seam later files use: attention is the one step that needs to see other tokens, so each
layer calls `attend(q, k, v, layer_idx, context)`. With `context=None` it is plain causal
attention over the tokens given (this file). File 03 passes a contiguous KV cache, file 04 a
paged one; both reuse this model unchanged.

Loading: `download_model` fetches config.json, *.safetensors and the tokenizer files from the
Hub (local cache first, so an offline machine never hangs); `load_model` reads single or
sharded safetensors (never pickle) and checks every tensor name and shape against the model.
`make_random_checkpoint` writes real HF-layout folders with random weights (`tiny`, `demo`) so
everything above is exercised offline. `naive_generate` is the slow, obviously correct
reference every later file is tested against.

    python 02_model.py          # architecture with parameter counts, one next-token prediction
"""
from __future__ import annotations

import importlib
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- config


@dataclass
class ModelConfig:
    """The fields of a Qwen3 config.json this model needs (defaults: Qwen3-0.6B)."""
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V one token leaves in the cache: 2 x layers x kv_heads x head_dim x bytes.
        Qwen3-0.6B in bf16: 2 x 28 x 8 x 128 x 2 = 114688 bytes = 112 KiB."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * elem


class CheckpointError(ValueError):
    """A model folder or file that cannot be used, with a message that says why."""


def load_config(path: str) -> ModelConfig:
    """Read `config.json` from a local folder (see `download_model` for hub ids)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"model folder {path!r} does not exist")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path!r} has no config.json (expected a Hugging Face model folder)")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {cfg_path}: {e}") from None
    if raw.get("model_type") != "qwen3":
        raise CheckpointError(f"{cfg_path} has model_type {raw.get('model_type')!r}; only 'qwen3' is supported")
    # Newer configs nest rope_theta under rope_parameters.
    if "rope_theta" not in raw and isinstance(raw.get("rope_parameters"), dict):
        raw["rope_theta"] = raw["rope_parameters"].get("rope_theta", ModelConfig.rope_theta)
    known = {f.name for f in fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in raw.items() if k in known})
    if "head_dim" not in raw:  # old configs: derive it, the one case where hidden/heads is right
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    return cfg


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """x / rms(x) * weight, rms(x) = sqrt(mean(x^2) + eps): normalised in fp32 and cast back, then
    scaled by the weight in the model's dtype, exactly as HF does. F.rms_norm is that same
    normalisation in one fused kernel, instead of the five ops of
    x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) (a decode step runs 113 norms)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables for rotary embeddings at the given positions: each (N, head_dim).

    Pair i of a head (dims i and i + head_dim/2) rotates by angle pos * theta^(-2i/head_dim):
    low dims spin fast (local order), high dims slowly (long range). Computed in fp32, then cast.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]       # (N, head_dim/2)
    emb = torch.cat((angles, angles), dim=-1)                      # (N, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each head of x (N, heads, d) by its position's angles (cos/sin: (N, d))."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # "rotate_half"
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal attention over one sequence: q (N, H, d), k/v (N, H_kv, d) -> (N, H, d).

    Token t attends to tokens 0..t. GQA: each group of H/H_kv query heads shares one KV head,
    which SDPA handles without copying K/V (`enable_gqa`).
    """
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),  # (H, N, d)
        is_causal=True, enable_gqa=True,
    )
    return out.transpose(0, 1)                                      # (N, H, d)


def attend(q, k, v, layer_idx: int, context=None):
    """The attention seam: no context = causal attention over the given tokens; otherwise the
    context (a KV cache, file 03; a paged block pool, file 04) stores k/v and attends."""
    if context is None:
        return causal_attention(q, k, v)
    return context.attend(layer_idx, q, k, v)


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)  # one norm per head vector
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context=None) -> torch.Tensor:
        N = x.shape[0]
        q = self.q_proj(x).view(N, self.n_heads, self.head_dim)               # (N, H, d)
        k = self.k_proj(x).view(N, self.n_kv, self.head_dim)                  # (N, H_kv, d)
        v = self.v_proj(x).view(N, self.n_kv, self.head_dim)                  # (N, H_kv, d)
        q, k = self.norm_and_rotate(q, k, cos, sin)
        o = attend(q, k, v, self.layer_idx, context)                          # (N, H, d)
        return self.o_proj(o.reshape(N, self.n_heads * self.head_dim))        # (N, hidden)

    def norm_and_rotate(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Qwen3's RMSNorm of every query and key head, then RoPE: what q and k go through between
        their projections and attention. One method, so that a faster engine can do it in one call."""
        return apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (N, hidden)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen3MLP(cfg)

    def forward(self, x, cos, sin, context=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, context)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3ForCausalLM(nn.Module):
    """Module names mirror the HF checkpoint (`model.layers.3.self_attn.q_proj.weight`, ...),
    so loading is a name-for-name copy and forward hooks can find layers by their HF names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Qwen3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, context=None) -> torch.Tensor:
        """input_ids, positions: (N,) packed tokens -> final hidden states (N, hidden).
        Logits are a separate step (`compute_logits`) so a server computes them only where it samples."""
        cfg = self.config
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, self.model.embed_tokens.weight.dtype)
        x = self.model.embed_tokens(input_ids)                     # (N, hidden)
        for layer in self.model.layers:
            x = layer(x, cos, sin, context)                        # (N, hidden)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)                                # (N, vocab)


# ----------------------------------------------------------------------------- reference generation


@torch.inference_mode()
def naive_generate(model: Qwen3ForCausalLM, prompt_ids: list[int], max_new_tokens: int,
                   eos_token_ids=()) -> list[int]:
    """Greedy decoding, batch of one, no cache: every step runs the whole sequence again.

    Quadratic work, but obviously correct: the reference every faster path must equal token for token.
    Returns only the generated ids (stops after an eos id, which is included).
    """
    device = model.model.embed_tokens.weight.device
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        x = torch.tensor(ids, device=device)
        hidden = model(x, torch.arange(len(ids), device=device))
        next_id = int(model.compute_logits(hidden[-1:]).argmax(-1))
        out.append(next_id)
        ids.append(next_id)
        if next_id in eos_token_ids:
            break
    return out


# ----------------------------------------------------------------------------- devices and dtypes


def cpu_has_bf16() -> bool:
    """True when the CPU has bf16 arithmetic units (AVX512-BF16 or AMX-BF16); without them a
    bf16 matmul on CPU is emulated and ~100x slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was asked for but no CUDA GPU is available (allowed: auto, cpu, cuda, mps)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise CheckpointError("--device mps was asked for but MPS is not available (allowed: auto, cpu, cuda, mps)")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA and on CPUs with bf16 units, else fp32 (fp16 is never auto: on CPU it is pathological)."""
    if name == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()):
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


# ----------------------------------------------------------------------------- loading


HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json"]


def download_model(repo_id: str, revision: str = "main", cache_dir: str | None = None) -> str:
    """A local folder for `repo_id`: the folder itself if it exists, else the Hub snapshot
    (config, safetensors and tokenizer files only). The local cache is tried first, so an
    offline machine answers at once instead of waiting on the network."""
    if os.path.isdir(repo_id):
        return repo_id
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                 allow_patterns=HUB_PATTERNS, local_files_only=True)
    except Exception:
        pass
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_PATTERNS)
    except Exception as e:
        raise CheckpointError(f"model {repo_id!r} is not a local folder and could not be downloaded "
                              f"from the Hugging Face Hub ({type(e).__name__})") from None


def safetensors_files(path: str) -> list[str]:
    """The checkpoint's weight files: model.safetensors, or the shards model.safetensors.index.json lists."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        names = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path!r} has no model.safetensors or model.safetensors.index.json")
    files = [os.path.join(path, name) for name in names]
    for file in files:
        if not os.path.isfile(file):
            raise CheckpointError(f"shard {os.path.basename(file)} listed in the index is missing from {path!r}")
    return files


# The element types a safetensors header names, as torch dtypes.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
CHUNK_BYTES = 16 * 2**20      # a dtype-converting read goes through a buffer of this size


def read_safetensors(path: str, destination):
    """Read every tensor of a checkpoint folder into place: destination(file, name, shape, dtype)
    returns the tensor to fill (or None to skip this one).

    A safetensors file is an 8-byte little-endian header length, a JSON header ({name: {dtype,
    shape, data_offsets}}) and the raw bytes of every tensor. Each tensor is read with plain file
    reads straight into its destination (through a small buffer when its dtype changes on the
    way), so loading holds one copy of the weights: reading through a memory map instead keeps
    the file's pages resident next to the weights until the file is closed."""
    import numpy as np   # a writable buffer view of a tensor's bytes, for readinto
    for file in safetensors_files(path):
        try:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 2 <= size <= os.path.getsize(file) - 8:
                    raise ValueError(f"a header of {size} bytes does not fit the file")
                header = json.loads(f.read(size))
                base = 8 + size
                for name, entry in header.items():
                    if name == "__metadata__":
                        continue
                    dtype, (start, end) = SAFETENSORS_DTYPES[entry["dtype"]], entry["data_offsets"]
                    shape = torch.Size(entry["shape"])
                    if end - start != shape.numel() * dtype.itemsize:
                        raise ValueError(f"tensor {name}: {end - start} bytes for shape {list(shape)} of {entry['dtype']}")
                    out = destination(file, name, shape, dtype)
                    if out is None:
                        continue
                    f.seek(base + start)
                    direct = out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu"
                    flat = out.view(-1)
                    step = shape.numel() if direct else max(1, CHUNK_BYTES // dtype.itemsize)
                    for i in range(0, shape.numel(), step):
                        part = flat[i:i + step] if direct else torch.empty(min(step, shape.numel() - i), dtype=dtype)
                        view = memoryview(np.asarray(part.view(torch.uint8)))
                        if f.readinto(view) != len(view):
                            raise ValueError(f"tensor {name}: the file ends early")
                        if not direct:
                            flat[i:i + len(part)].copy_(part)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:   # JSON and header errors among them
            raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None


def load_model(path: str, dtype: torch.dtype = torch.float32, device="cpu", allocate=None) -> Qwen3ForCausalLM:
    """Build the model from a local HF folder, checking every tensor's name and shape.

    The model is built on the meta device (shapes, no memory), its weights are allocated once in
    the run's dtype - by allocate(shapes: {name: shape}, dtype) -> {name: tensor} where given (the
    engine puts them on huge pages), else torch.empty on the device - and each checkpoint tensor
    is copied into its place as it is read, converting its dtype on the way. Peak memory: the
    weights plus one tensor."""
    cfg = load_config(path)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    shapes = {n: p.shape for n, p in model.named_parameters()}  # tied: lm_head.weight is not listed
    weights = (allocate or (lambda s, dt: {n: torch.empty(shape, dtype=dt, device=device) for n, shape in s.items()}))(shapes, dtype)
    seen = set()

    def destination(file, name, shape, _):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            return None  # some tied checkpoints still store the copy
        if name not in shapes:
            raise CheckpointError(f"checkpoint {path!r} has unexpected tensor(s): {name}")
        if shape != shapes[name]:
            raise CheckpointError(f"tensor {name} in {file} has shape {tuple(shape)}, the config needs {tuple(shapes[name])}")
        seen.add(name)
        return weights[name]
    read_safetensors(path, destination)
    missing = sorted(set(shapes) - seen)
    if missing:
        raise CheckpointError(f"checkpoint {path!r} is missing tensor(s): {', '.join(missing[:5])}")
    model.load_state_dict(weights, strict=False, assign=True)
    if cfg.tie_word_embeddings:  # assign=True replaced the shared Parameter: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


# ----------------------------------------------------------------------------- random checkpoints


PRESETS = {
    # Small but with every Qwen3 quirk: kv heads < heads, head_dim != hidden / heads, the real vocab.
    "tiny": ModelConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32, max_position_embeddings=4096),
    "tiny-untied": ModelConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                               tie_word_embeddings=False),
    "demo": ModelConfig(),  # exactly Qwen3-0.6B's architecture
}


def hf_config_dict(cfg: ModelConfig, dtype: str = "bfloat16") -> dict:
    """The config.json a Hugging Face Qwen3 checkpoint carries."""
    d = {f.name: getattr(cfg, f.name) for f in fields(ModelConfig)}
    d.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu", attention_bias=False,
             attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645, initializer_range=0.02,
             use_cache=True, use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_hidden_layers,
             rope_scaling=None, torch_dtype=dtype)
    return d


def random_tensors(cfg: ModelConfig, seed: int):
    """Random fp32 weights in HF names, yielded one at a time (name, tensor) in the model's order.

    Embedding and lm_head ~ N(0, 0.02); the layers' linear weights ~ N(0, 1/fan_in), so every
    layer changes the residual stream as much as the embedding does (with 0.02 a small model
    just copies its input token, and greedy text is one token repeated); norm weights near 1
    but not equal (a mixed-up norm would show). The final norm is scaled so the logits spread
    over ~8 units: the top-1 token then wins by a margin far above float rounding, and greedy
    comparisons between implementations are never decided by a near-tie."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Qwen3ForCausalLM(cfg).named_parameters()}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
            if name == "model.norm.weight":
                t *= 8.0 / (0.02 * math.sqrt(cfg.hidden_size))
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            t = 0.02 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        yield name, t


def random_state_dict(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """All of random_tensors at once (for a model in memory, as the tests build)."""
    return dict(random_tensors(cfg, seed))


def make_random_checkpoint(folder: str, preset: str = "tiny", seed: int = 0, dtype: str = "bfloat16",
                           shard_bytes: int | None = None) -> str:
    """Write a real HF-layout checkpoint with random weights: config.json, model.safetensors
    (or shards + index when `shard_bytes` is given), generation_config.json and the tokenizer.
    Tensors are made shard by shard, so writing holds one shard in memory, not the model."""
    from safetensors.torch import save_file
    cfg = PRESETS[preset]
    os.makedirs(folder, exist_ok=True)
    with torch.device("meta"):
        sizes = {n: p.numel() * DTYPES[dtype].itemsize for n, p in Qwen3ForCausalLM(cfg).named_parameters()}
    shards, size = [[]], 0                                 # tensor names, shard by shard
    for name, nbytes in sizes.items():
        if shard_bytes is not None and shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    tensors = random_tensors(cfg, seed)
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for names, fname in zip(shards, files):
        shard = {}
        for name, t in itertools.islice(tensors, len(names)):
            shard[name] = t.to(DTYPES[dtype]).contiguous()
        save_file(shard, os.path.join(folder, fname), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {name: fname for names, fname in zip(shards, files) for name in names}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config_dict(cfg, dtype), f, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": False}, f, indent=2)
    tokenize = importlib.import_module("01_tokenize")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(tokenize.ASSETS, name), "rb") as src, open(os.path.join(folder, name), "wb") as dst:
            dst.write(src.read())
    return folder


def cache_root() -> str:
    """Where generated checkpoints live: $NANO_VLLM_CACHE, else ~/.cache/nano-vllm-py."""
    return os.environ.get("NANO_VLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nano-vllm-py")


# Presets are written in shards of at most this size: writing one holds a shard in memory, not the model.
PRESET_SHARD_BYTES = 2**29


def preset_checkpoint(preset: str, seed: int = 0) -> str:
    """The folder of a random preset checkpoint, written once and reused (atomically renamed into place)."""
    folder = os.path.join(cache_root(), f"{preset}-seed{seed}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        tmp = f"{folder}.tmp{os.getpid()}"
        make_random_checkpoint(tmp, preset, seed, shard_bytes=PRESET_SHARD_BYTES)
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process won the race: use its folder
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ----------------------------------------------------------------------------- demo


def count_parameters(model: nn.Module) -> list[tuple[str, int]]:
    """(part, parameter count) rows; a tied lm_head counts 0 because it is the embedding."""
    cfg = model.config
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    layer = model.model.layers[0]
    rows = [("embed_tokens", n(model.model.embed_tokens)),
            (f"attention x {cfg.num_hidden_layers}", n(layer.self_attn) * cfg.num_hidden_layers),
            (f"mlp x {cfg.num_hidden_layers}", n(layer.mlp) * cfg.num_hidden_layers),
            (f"norms x {2 * cfg.num_hidden_layers + 1}", n(layer.input_layernorm) * 2 * cfg.num_hidden_layers + n(model.model.norm)),
            ("lm_head" + (" (tied)" if cfg.tie_word_embeddings else ""), 0 if cfg.tie_word_embeddings else n(model.lm_head))]
    return rows + [("total", sum(n for _, n in rows))]


def main() -> None:
    import tempfile
    import time
    from rich.console import Console
    from rich.table import Table
    console = Console()
    tokenize = importlib.import_module("01_tokenize")

    with torch.device("meta"):  # shapes only: no memory, no time
        demo = Qwen3ForCausalLM(PRESETS["demo"])
    cfg = demo.config
    console.print(f"[bold]Qwen3-0.6B architecture[/]: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                  f"{cfg.num_attention_heads} query heads / {cfg.num_key_value_heads} KV heads of {cfg.head_dim} dims "
                  f"(q_proj: {cfg.hidden_size} -> {cfg.num_attention_heads * cfg.head_dim}), MLP {cfg.intermediate_size}")
    table = Table("part", "parameters", "share")
    rows = count_parameters(demo)
    for part, count in rows:
        table.add_row(part, f"{count:,}", f"{100 * count / rows[-1][1]:.1f}%")
    console.print(table)
    attn = demo.model.layers[0].self_attn
    console.print(f"layer 0 attention: q_proj {tuple(attn.q_proj.weight.shape)}, k_proj {tuple(attn.k_proj.weight.shape)}, "
                  f"v_proj {tuple(attn.v_proj.weight.shape)}, o_proj {tuple(attn.o_proj.weight.shape)}  (out, in)")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = make_random_checkpoint(tmp, "tiny", seed=0)
        model = load_model(folder, torch.float32)
        tok = tokenize.load_tokenizer(folder)
        prompt = "The capital of France is"
        ids = tok.encode(prompt)
        with torch.inference_mode():
            logits = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)))[-1])
        probs = logits.softmax(-1)
        top = probs.topk(5)
        console.print(f"\n[bold]one next-token prediction[/] with the `tiny` preset (random weights, so the words "
                      f"are noise; the mechanics are real), {time.perf_counter() - t0:.2f}s including writing and loading it:")
        console.print(f"prompt {prompt!r} -> ids {ids}")
        for p, i in zip(top.values.tolist(), top.indices.tolist()):
            console.print(f"  {i:>6}  {tok.decode([i], skip_special_tokens=False)!r:<20} p={p:.3f}")


if __name__ == "__main__":
    sys.exit(main())
