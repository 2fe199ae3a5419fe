"""
02 - Qwen3 in plain PyTorch, and loading it from a Hugging Face checkpoint.

A decoder-only transformer turns token ids into next-token logits:

    ids (N,) -> embed_tokens -> [ decoder layer ] x L -> norm -> lm_head -> logits (N, vocab)

and each Qwen3 decoder layer is two residual sub-blocks, each behind an RMSNorm:

    x = x + o_proj(attention(rope(q_norm(q)), rope(k_norm(k)), v))     q, k, v = x W_q, x W_k, x W_v
    x = x + down_proj(silu(gate_proj(x)) * up_proj(x))                  (SwiGLU MLP)

What is particular to Qwen3 (and where people copying a Llama get it wrong):
  - grouped-query attention: Qwen3-0.6B's 16 query heads share 8 key/value heads, halving the KV cache;
  - `head_dim` comes from the config, it is NOT hidden_size / num_heads (16 heads x 128 = 2048 != 1024);
  - each head's query and key get their own RMSNorm (`q_norm`, `k_norm`) before RoPE;
  - RoPE with theta = 1,000,000, rotating the two halves of each head (HF's "rotate_half");
  - small models tie `lm_head` to the embedding matrix (one 151936 x hidden matrix used twice).

The model works on a flat, "packed" list of tokens, `forward(input_ids (N,), positions (N,))`: the
engine's layout (many sequences back to back, no padding). Attention is the one step that sees other
tokens, so each layer calls the seam `attend(q, k, v, layer_idx, context)`: no context is plain causal
attention (this file); file 03 passes a contiguous KV cache, file 04 a paged one, both reusing this model.

Loading reads Hugging Face folders of safetensors (never pickle) and checks every tensor against
the model; `make_random_checkpoint` writes such folders with random weights (`tiny`, `demo`), so all
of it runs offline. `naive_generate` is the slow, obviously correct reference later files test against.

    python 02_model.py          # architecture with parameter counts, one next-token prediction
"""
from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, fields, replace

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
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype.itemsize


class CheckpointError(ValueError):
    """A model folder or file that cannot be used, with a message that says why."""


def load_config(path: str) -> ModelConfig:
    """Read and check `config.json` from a local folder (see `download_model` for hub ids)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"model folder {path!r} does not exist")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path!r} has no config.json (expected a Hugging Face model folder)")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:   # not JSON, not UTF-8
        raise CheckpointError(f"cannot read {cfg_path}: {e}") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else f"none: it holds a JSON {type(raw).__name__}"
    if model_type != "qwen3":
        raise CheckpointError(f"{cfg_path} has model_type {model_type!r}; only 'qwen3' is supported")
    if "rope_theta" not in raw and isinstance(raw.get("rope_parameters"), dict):  # newer configs nest it
        raw["rope_theta"] = raw["rope_parameters"].get("rope_theta", ModelConfig.rope_theta)
    values = {f.name: raw.get(f.name, f.default) for f in fields(ModelConfig)}

    def require(ok: bool, name: str, allowed: str):
        if not ok:
            raise CheckpointError(f"config.json in {path!r}: {name} must be {allowed}, got {json.dumps(values[name])[:80]}")
    for f in fields(ModelConfig):   # integers >= 1 (not true, 2.5 or "3"), but for:
        low, v = {"max_position_embeddings": 2, "rope_theta": 1, "rms_norm_eps": 1e-30}.get(f.name, 1), values[f.name]
        kinds, allowed = {"bool": ((bool,), "true or false"), "int": ((int,), f"an integer >= {low}")}.get(
            f.type, ((int, float), f"a finite number >= {low}"))
        require(type(v) in kinds and (f.type == "bool" or low <= v < math.inf), f.name, allowed)
    if "head_dim" not in raw:  # old configs: derive it, the one case where hidden/heads is right
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    require(values["head_dim"] % 2 == 0 and values["head_dim"] > 0, "head_dim", "even (RoPE turns pairs) and >= 2")
    require(values["num_attention_heads"] % values["num_key_value_heads"] == 0, "num_attention_heads",
            f"a multiple of num_key_value_heads ({values['num_key_value_heads']})")
    return ModelConfig(**values)


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: normalised in fp32 and cast back, then scaled in the model's
    dtype, as HF does. F.rms_norm runs x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) as one kernel."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables (N, head_dim) at the given positions, computed in fp32, then cast. Pair i of a head
    (dims i and i + head_dim/2) turns by pos * theta^(-2i/head_dim): low dims fast (local order), high slowly."""
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
    """Causal attention over one sequence, token t sees 0..t: q (N, H, d), k/v (N, H_kv, d) -> (N, H, d).
    GQA: each group of H/H_kv query heads shares one KV head, which SDPA does without copying K/V."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),  # (H, N, d)
        is_causal=True, enable_gqa=True,
    )
    return out.transpose(0, 1)                                      # (N, H, d)


def attend(q, k, v, layer_idx: int, context=None):
    """The seam: no context = causal attention over these tokens; else the context stores k/v and attends."""
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
        """Qwen3's RMSNorm of every query and key head, then RoPE: one method, so a faster engine can fuse it."""
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
    """Greedy decoding, batch of one, no cache: every step runs the whole sequence again. Quadratic, but
    obviously correct: the reference every faster path must equal token for token. Returns the generated
    ids only (stopping after an eos id, which is included)."""
    device = model.model.embed_tokens.weight.device
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        hidden = model(torch.tensor(ids, device=device), torch.arange(len(ids), device=device))  # (N, hidden)
        ids.append(int(model.compute_logits(hidden[-1:]).argmax(-1)))
        if ids[-1] in eos_token_ids:
            break
    return ids[len(prompt_ids):]


# ----------------------------------------------------------------------------- devices, dtypes and loading

def cpu_has_bf16() -> bool:
    """True when the CPU has bf16 units (AVX512-BF16, AMX-BF16): without, bf16 matmuls are emulated, ~100x slower."""
    flags = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:   # no such file: not Linux
        flags = f.read()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name in ("cuda", "mps") and not (torch.cuda if name == "cuda" else torch.backends.mps).is_available():
        raise CheckpointError(f"--device {name} was asked for but is not available here (allowed: auto, cpu, cuda, mps)")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA and on CPUs with bf16 units, else fp32 (fp16 is never auto: on CPU it is pathological)."""
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()) else torch.float32


HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json"]


def download_model(repo_id: str, revision: str = "main", cache_dir: str | None = None) -> str:
    """A local folder for `repo_id`: itself if it is one, else its Hub snapshot (config, weights, tokenizer)."""
    if os.path.isdir(repo_id):
        return repo_id
    from huggingface_hub import snapshot_download
    for local in (True, False):  # the local cache first: offline, it answers at once instead of waiting
        try:
            return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                     allow_patterns=HUB_PATTERNS, local_files_only=local)
        except Exception as e:
            error = e
    raise CheckpointError(f"model {repo_id!r} is not a local folder and could not be downloaded "
                          f"from the Hugging Face Hub ({type(error).__name__})")


def safetensors_files(path: str) -> list[str]:
    """The checkpoint's weight files: model.safetensors, or the shards model.safetensors.index.json lists."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:   # a weight_map of 5 or [...]: AttributeError; a value 5: no file "5"
                names = sorted({str(name) for name in json.load(f)["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} must be a JSON object whose weight_map maps tensor names to file names "
                                  f"({type(e).__name__}: {e})") from None
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        names = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path!r} has no model.safetensors or model.safetensors.index.json")
    for name in names:   # inside by name: a hub snapshot's files are symlinks into ../../blobs, which is fine
        if os.path.isabs(name) or ".." in name.split("/") or not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"shard {name!r} listed in the index is not a file inside {path!r}")
    return [os.path.join(path, name) for name in names]


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
CHUNK_BYTES = 16 * 2**20      # a dtype-converting read goes through a buffer of this size


def read_safetensors(path: str, destination):
    """Read every tensor of a checkpoint folder into place: destination(file, name, shape, dtype) returns the
    tensor to fill, or None to skip it. A file is an 8-byte little-endian header length, a JSON header ({name:
    {dtype, shape, data_offsets}}), then the raw bytes, read with plain reads straight into place (through a
    buffer when the dtype changes): a memory map would keep the file's pages resident beside the weights."""
    import numpy as np   # a writable buffer view of a tensor's bytes, for readinto
    buffer = torch.empty(CHUNK_BYTES, dtype=torch.uint8)   # one for every dtype-changing read
    for file in safetensors_files(path):
        try:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 2 <= size <= os.path.getsize(file) - 8:
                    raise ValueError(f"a header of {size} bytes does not fit the file")
                header = json.loads(f.read(size))
                header.pop("__metadata__", None)
                for name, entry in header.items():
                    dtype, (start, end) = SAFETENSORS_DTYPES[entry["dtype"]], entry["data_offsets"]
                    shape = torch.Size(entry["shape"])
                    if end - start != shape.numel() * dtype.itemsize:
                        raise ValueError(f"tensor {name}: {end - start} bytes for shape {list(shape)} of {entry['dtype']}")
                    if not 0 <= start <= end <= os.path.getsize(file) - 8 - size:
                        raise ValueError(f"tensor {name}: the file ends early")
                    out = destination(file, name, shape, dtype)
                    if out is None:
                        continue
                    f.seek(8 + size + start)
                    direct = out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu"
                    flat = out.view(-1)
                    step = max(1, shape.numel() if direct else CHUNK_BYTES // dtype.itemsize)
                    for i in range(0, shape.numel(), step):
                        n = min(step, shape.numel() - i)
                        part = flat[i:i + n] if direct else buffer[:n * dtype.itemsize].view(dtype)
                        view = memoryview(np.asarray(part.view(torch.uint8)))
                        if f.readinto(view) != len(view):
                            raise ValueError(f"tensor {name}: the file ends early")
                        if not direct:
                            flat[i:i + len(part)].copy_(part)
                    if out.is_floating_point() and not torch.stack(torch.aminmax(flat)).isfinite().all():   # NaN spreads
                        raise CheckpointError(f"tensor {name} in {file} has NaN or infinite values")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:   # JSON and header errors among them
            raise e if isinstance(e, CheckpointError) else CheckpointError(
                f"{file} is not a readable safetensors file: {e}") from None


def load_model(path: str, dtype: torch.dtype = torch.float32, device="cpu", allocate=None) -> Qwen3ForCausalLM:
    """Build the model from a local HF folder, checking every tensor's name and shape. Built on the meta
    device (shapes, no memory); the weights are allocated once, by allocate(shapes, dtype) -> {name: tensor}
    (which then decides where they live: the engine's huge pages) or torch.empty on `device`, and read into
    place: peak memory is the weights + one buffer."""
    cfg = load_config(path)
    size = sum(map(os.path.getsize, safetensors_files(path)))   # a byte a weight at least: refuse a far too big config
    if (cfg.vocab_size + cfg.num_hidden_layers * (cfg.head_dim + cfg.intermediate_size)) * cfg.hidden_size > size:
        raise CheckpointError(f"config.json in {path!r} describes more weights than its safetensors hold ({size:,} bytes)")
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    shapes = {n: p.shape for n, p in model.named_parameters()}  # tied: lm_head.weight is not listed
    weights = (allocate(shapes, dtype) if allocate is not None else
               {n: torch.empty(s, dtype=dtype, device=device) for n, s in shapes.items()})
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
    "demo": ModelConfig(),  # exactly Qwen3-0.6B's architecture
}
PRESETS["tiny-untied"] = replace(PRESETS["tiny"], tie_word_embeddings=False)


def hf_config_dict(cfg: ModelConfig, dtype: str = "bfloat16") -> dict:
    """The config.json a Hugging Face Qwen3 checkpoint carries."""
    return dict({f.name: getattr(cfg, f.name) for f in fields(ModelConfig)},
                architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu", attention_bias=False,
                attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645, initializer_range=0.02,
                use_cache=True, use_sliding_window=False, sliding_window=None,
                max_window_layers=cfg.num_hidden_layers, rope_scaling=None, torch_dtype=dtype)


def random_tensors(cfg: ModelConfig, seed: int):
    """Random fp32 weights in HF names, yielded (name, tensor) in the model's order. Embedding and lm_head ~
    N(0, 0.02); linear weights ~ N(0, 1/fan_in), so each layer moves the residual stream as much as the
    embedding (with 0.02 a small model copies its input token); norms near 1, not equal, so a mixed-up norm
    shows; the final norm spreads logits over ~8 units, so no greedy comparison hinges on a near-tie."""
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
    """Write a real HF-layout checkpoint with random weights: config, generation config, tokenizer and
    model.safetensors (shards + index with `shard_bytes`), made shard by shard: one shard in memory at a time."""
    from safetensors.torch import save_file
    cfg = PRESETS[preset]
    os.makedirs(folder, exist_ok=True)
    with torch.device("meta"):
        sizes = {n: p.numel() * DTYPES[dtype].itemsize for n, p in Qwen3ForCausalLM(cfg).named_parameters()}
    shards = [[]]                                          # tensor names, shard by shard
    for name, nbytes in sizes.items():
        if shard_bytes is not None and shards[-1] and sum(sizes[n] for n in shards[-1]) + nbytes > shard_bytes:
            shards.append([])
        shards[-1].append(name)
    tensors = random_tensors(cfg, seed)
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for names, fname in zip(shards, files):
        shard = {name: t.to(DTYPES[dtype]).contiguous() for name, t in itertools.islice(tensors, len(names))}
        save_file(shard, os.path.join(folder, fname), metadata={"format": "pt"})
    meta = {"config.json": hf_config_dict(cfg, dtype),
            "generation_config.json": {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": False}}
    if len(shards) > 1:
        meta["model.safetensors.index.json"] = {"metadata": {"total_size": sum(sizes.values())}, "weight_map":
                                                {name: fname for names, fname in zip(shards, files) for name in names}}
    for fname, obj in meta.items():
        with open(os.path.join(folder, fname), "w") as f:
            json.dump(obj, f, indent=2)
    tokenize = importlib.import_module("01_tokenize")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(tokenize.ASSETS, name), os.path.join(folder, name))
    return folder


def cache_root() -> str:
    """Where generated checkpoints live: $NANO_VLLM_CACHE, else ~/.cache/nano-vllm-py."""
    return os.environ.get("NANO_VLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nano-vllm-py")


# Presets are written in shards of at most this size: writing one holds a shard in memory, not the model.
PRESET_SHARD_BYTES = 2**29


def preset_checkpoint(preset: str, seed: int = 0) -> str:
    """A random preset's folder: written once (in a private folder renamed into place), reused, rewritten if damaged."""
    folder = os.path.join(root := cache_root(), f"{preset}-seed{seed}")
    try:
        for name in os.listdir(root) if os.path.isdir(root) and os.path.isdir("/proc/self") else []:   # Linux
            stem, _, pid = name.rpartition(".tmp")   # the private folder of a run stopped while writing, process gone
            if stem.rpartition("-seed")[0] in PRESETS and pid.isdigit() and not os.path.isdir(f"/proc/{pid}"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        with contextlib.suppress(CheckpointError):
            if load_config(folder) == PRESETS[preset] and os.path.isfile(os.path.join(folder, "tokenizer.json")):
                read_safetensors(folder, lambda *tensor: None)   # headers only: each tensor inside its file
                return folder
        shutil.rmtree(folder, ignore_errors=True)
        make_random_checkpoint(tmp := f"{folder}.tmp{os.getpid()}", preset, seed, shard_bytes=PRESET_SHARD_BYTES)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process won the race: use its folder
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise CheckpointError(f"cannot write the {preset!r} checkpoint in {root!r} ({e.strerror or e}): "
                              "set NANO_VLLM_CACHE to a writable folder") from None
    return folder


def resolve_model(name: str) -> str:
    """A local folder for a preset name (written on first use), a folder, or a hub id (download_model)."""
    if name in PRESETS:
        return preset_checkpoint(name)
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") != 1:
        path = os.path.expanduser(name)
        if not os.path.isdir(path):
            raise CheckpointError(f"model folder {name!r} does not exist "
                                  "(allowed: a local folder, a hub id like Qwen/Qwen3-0.6B, demo or tiny)")
        return path
    return download_model(name)


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
    from rich.console import Console
    from rich.table import Table
    console = Console()
    tokenize = importlib.import_module("01_tokenize")

    with torch.device("meta"):  # shapes only: no memory, no time
        demo = Qwen3ForCausalLM(PRESETS["demo"])
    cfg, attn = demo.config, demo.model.layers[0].self_attn
    console.print(f"[bold]Qwen3-0.6B architecture[/]: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                  f"{cfg.num_attention_heads} query heads / {cfg.num_key_value_heads} KV heads of {cfg.head_dim} dims, "
                  f"MLP {cfg.intermediate_size}; layer 0 weights (out, in): q_proj {tuple(attn.q_proj.weight.shape)}, "
                  f"k_proj and v_proj {tuple(attn.k_proj.weight.shape)}, o_proj {tuple(attn.o_proj.weight.shape)}")
    table = Table("part", "parameters", "share")
    for part, count in (rows := count_parameters(demo)):
        table.add_row(part, f"{count:,}", f"{100 * count / rows[-1][1]:.1f}%")
    console.print(table)

    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(make_random_checkpoint(tmp, "tiny", seed=0), torch.float32)
        tok = tokenize.load_tokenizer(tmp)
    prompt = "The capital of France is"
    ids = tok.encode(prompt)
    with torch.inference_mode():
        logits = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)))[-1])  # (vocab,)
    console.print(f"\n[bold]one next-token prediction[/] with the `tiny` preset (random weights, so the words "
                  f"are noise; the mechanics are real):\nprompt {prompt!r} -> ids {ids}")
    top = logits.softmax(-1).topk(5)
    for p, i in zip(top.values.tolist(), top.indices.tolist()):
        console.print(f"  {i:>6}  {tok.decode([i], skip_special_tokens=False)!r:<20} p={p:.3f}")


if __name__ == "__main__":
    sys.exit(main())
