"""
run.py - the command line: every request goes through engine.LLMEngine.

    python run.py                                   # Qwen/Qwen3-0.6B (offline: the `demo` model, with a banner)
    python run.py --model demo --prompt "Hi" --prompt "Why is the sky blue?" --max-tokens 32
    python run.py --model ./my-qwen3-folder --temperature 0.7 --top-p 0.9 --seed 1 --stream
    python run.py --model tiny --output json        # one JSON object on stdout, humans' text on stderr

Bad input exits with code 2 and one `error:` line on stderr (no traceback). A prompt that cannot
be served (empty, longer than the context) is rejected alone: the other prompts still run, and
the exit code is 2.
"""
from __future__ import annotations

import argparse
import json
import sys

import engine as engine_mod

DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."

OFFLINE_BANNER = """\
*** {model} is not in the local Hugging Face cache and the Hub cannot be reached. ***
Running the built-in `demo` model instead: exactly Qwen3-0.6B's architecture (28 layers, 16 query /
8 KV heads of 128 dims, the real Qwen3 tokenizer) with RANDOM weights. Every mechanism you see is
real - tokenization, prefill, paged KV cache, sampling - but the text is noise. With network access,
the first run downloads the real weights (~1.5 GB); or pass --model PATH to a downloaded Qwen3 folder.
"""


class UsageError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py", description="nano-vllm-py: a small, readable Qwen3 serving engine.")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="local HF folder, hub id, or a random-weight preset: demo (Qwen3-0.6B shape), tiny (default: %(default)s)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bf16 on CUDA and on CPUs with bf16 units (avx512_bf16/amx_bf16), else fp32")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    g = p.add_argument_group("requests")
    g.add_argument("--prompt", action="append", help="a prompt; repeat for several requests (default: a question)")
    g.add_argument("--raw", action="store_true", help="send the prompt as is (default: apply the chat template)")
    g.add_argument("--think", action="store_true", help="let Qwen3 think first (chat template with thinking on)")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per request (default: %(default)s)")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set with this much probability (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability (0 = off)")
    g.add_argument("--seed", type=int, default=None, help="request i samples with seed + i (default: unseeded)")
    g.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    g = p.add_argument_group("engine")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: %(default)s)")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks (default: from memory)")
    g.add_argument("--kv-cache-memory-gb", type=float, default=None,
                   help="KV pool size in GiB, when --num-kv-blocks is not given (default: CUDA free memory; "
                        f"CPU {engine_mod.CPU_KV_CACHE_GB:g} GiB, or less where every sequence slot at max length needs less)")
    g.add_argument("--max-num-seqs", type=int, default=16, help="sequences per step (default: %(default)s)")
    g.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per step (default: %(default)s)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: min(model, 4096))")
    g.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    g.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (minutes of compilation at start; docs/performance.md)")
    g = p.add_argument_group("speculative decoding (07_speculative.py)")
    g.add_argument("--speculative", action="store_true",
                   help="a draft model proposes tokens, the target checks them in one pass (same outputs)")
    g.add_argument("--draft-model", default=None,
                   help="the draft: local folder, hub id or preset with the target's vocabulary; implies "
                        "--speculative (default: the target's first 7/8 of layers)")
    g.add_argument("--num-speculative-tokens", type=int, default=4,
                   help="draft tokens per sequence per step, k (default: %(default)s)")
    g = p.add_argument_group("teaching modes (combinable)")
    g.add_argument("--narrate", action="store_true", help="plain-language commentary of what the engine does, with its real numbers")
    g.add_argument("--xray", action="store_true", help="the tensors of each stage: shapes, dtypes, stats, top candidates")
    g.add_argument("--xray-every", type=int, default=16, help="x-ray every Nth decode step after the first (default: %(default)s)")
    g.add_argument("--xray-layer", type=int, default=0, help="which layer's attention the x-ray shows (default: %(default)s)")
    g.add_argument("--dashboard", action="store_true", help="a live view of the engine (rich), refreshed ~10 times a second")
    g.add_argument("--tutorial", action="store_true", help="a 12-chapter interactive course that runs on the engine")
    g.add_argument("--chapter", type=int, default=None, help="tutorial: start at chapter N (1-12)")
    g.add_argument("--progress-file", default=None, help="tutorial: where progress is saved (default: user data folder)")
    g = p.add_argument_group("output")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("--output", default="text", choices=["text", "json"],
                   help="json: exactly one JSON object on stdout when all requests finish")
    return p


def check_args(args) -> None:
    """Refuse bad values before anything is loaded."""
    if args.prompt is not None:
        for i, prompt in enumerate(args.prompt):
            if not prompt.strip():
                raise UsageError(f"--prompt #{i + 1} is empty: give some text")
    if args.max_tokens <= 0:
        raise UsageError(f"--max-tokens must be a positive integer, got {args.max_tokens}")
    if args.xray_every <= 0:
        raise UsageError(f"--xray-every must be a positive integer, got {args.xray_every}")
    if args.num_speculative_tokens < 1:
        raise UsageError(f"--num-speculative-tokens must be a positive integer, got {args.num_speculative_tokens}")
    if args.chapter is not None and not 1 <= args.chapter <= 12:
        raise UsageError(f"--chapter must be between 1 and 12, got {args.chapter}")
    if args.kv_cache_memory_gb is not None and not args.kv_cache_memory_gb > 0:
        raise UsageError(f"--kv-cache-memory-gb must be a positive number, got {args.kv_cache_memory_gb}")
    for flag in ("block_size", "max_num_seqs", "max_num_batched_tokens", "num_kv_blocks", "max_model_len"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")


def load_engine(args, info):
    """The engine for --model; the default model falls back to `demo` (loudly) when it cannot be had."""
    model = args.model
    try:
        folder = engine_mod.qwen3.resolve_model(model)
    except engine_mod.qwen3.CheckpointError:
        if model != DEFAULT_MODEL:
            raise
        print(OFFLINE_BANNER.format(model=model), file=sys.stderr)
        model = "demo"
        folder = engine_mod.qwen3.resolve_model("demo")
    config = engine_mod.EngineConfig(
        model=folder, dtype=args.dtype, device=args.device, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, kv_cache_memory_gb=args.kv_cache_memory_gb, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching, enforce_eager=args.enforce_eager, compile=args.compile,
        speculative=args.speculative or args.draft_model is not None, draft_model=args.draft_model,
        num_speculative_tokens=args.num_speculative_tokens)
    engine = engine_mod.LLMEngine(config)
    fmt = engine_mod.kv_cache_lesson.fmt_bytes
    info(f"model {model} ({folder}) on {engine.device}, {str(engine.dtype).removeprefix('torch.')}: "
         f"weights {fmt(engine.weights_bytes)}, KV pool {fmt(engine.kv_cache_bytes)} "
         f"({engine.num_kv_blocks} blocks of {args.block_size} tokens = {engine.num_kv_blocks * args.block_size:,} tokens)")
    if engine.speculative is not None:
        draft = args.draft_model or (f"built-in: the target's first {engine.draft_model.config.num_hidden_layers} "
                                     f"of {engine.model_config.num_hidden_layers} layers")
        info(f"speculative decoding: draft {draft}, k = {args.num_speculative_tokens}")
    return engine, model


def attach_modes(args, engine):
    """Subscribe the teaching modes to the engine's hook points. They write to stdout, or to
    stderr under --output json. Returns the dashboard's live view (a context manager) or a no-op."""
    from contextlib import nullcontext

    from rich.console import Console
    console = Console(file=sys.stderr if args.output == "json" else sys.stdout, highlight=False)
    if args.narrate:
        from modes.narrator import Narrator
        engine.observers.append(Narrator(engine, console))
        args.stream = False      # the narrator streams the text itself, between its sentences
    if args.xray:
        from modes.xray import XRay
        engine.observers.append(XRay(engine, console, every=args.xray_every, layer=args.xray_layer))
    if args.dashboard:
        from modes.dashboard import Dashboard
        args.stream = False      # the dashboard shows the text as it grows; streaming it too would redraw per token
        dashboard = Dashboard(engine, console)
        engine.observers.append(dashboard)
        return dashboard
    return nullcontext()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Generated text goes to stdout (to stderr under --output json, where stdout is the JSON alone);
    # everything about the run goes to stderr.
    def show_text(msg: str = "", end="\n") -> None:   # sys.stdout looked up now: --dashboard's Live redirects it
        print(msg, end=end, file=sys.stderr if args.output == "json" else sys.stdout, flush=True)

    def info(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        check_args(args)
        params = engine_mod.SamplingConfig(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
            max_tokens=args.max_tokens, stop=list(args.stop), ignore_eos=args.ignore_eos)
        params.validate()
        if args.tutorial:
            from modes import tutorial
            return tutorial.main(args)
        engine, model_name = load_engine(args, info)
        live_view = attach_modes(args, engine)
    except (UsageError, ValueError) as e:   # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2

    prompts = args.prompt or [DEFAULT_PROMPT]
    status = 0
    accepted = []
    for i, prompt in enumerate(prompts):
        text = prompt if args.raw else engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, enable_thinking=args.think)
        p = engine_mod.SamplingConfig(**{**params.__dict__, "seed": None if args.seed is None else args.seed + i})
        try:
            rid = engine.add_request(text, p)
        except ValueError as e:
            print(f"error: prompt #{i + 1}: {e}", file=sys.stderr)
            status = 2
            continue
        accepted.append((rid, prompt))

    outputs = {}
    last = None
    with live_view:
        for delta, o in engine.stream([], None):
            if args.stream and delta:
                if len(accepted) > 1 and last != o.request_id:
                    show_text(f"\n[{o.request_id}] ", end="")
                last = o.request_id
                show_text(delta, end="")
            if o.finished:
                outputs[o.request_id] = o
    if args.stream:
        show_text()

    stats = engine.stats_summary()
    if args.output == "json":
        doc = {"model": model_name, "requests": [
            {"prompt": prompt, "prompt_token_ids": outputs[rid].prompt_token_ids, "token_ids": outputs[rid].token_ids,
             "text": outputs[rid].text, "finish_reason": outputs[rid].finish_reason} for rid, prompt in accepted],
            "stats": stats}
        print(json.dumps(doc, ensure_ascii=False))
    elif not args.stream:
        for rid, prompt in accepted:
            if len(accepted) > 1:
                show_text(f"=== [{rid}] {prompt}")
            show_text(outputs[rid].text)
    info(f"[{stats['prompt_tokens']} prompt tokens, {stats['generated_tokens']} generated; "
          f"prefill {stats['prefill_tokens_per_s']:.1f} tok/s, decode {stats['decode_tokens_per_s']:.1f} tok/s, "
          f"prefix-cache hits {stats['prefix_cache_hit_tokens']} tokens, {stats['preemptions']} preemptions]")
    if "spec_num_drafts" in stats:
        info(f"[speculative: {stats['spec_accepted_tokens']} of {stats['spec_draft_tokens']} draft tokens accepted "
             f"({stats['spec_acceptance_rate']:.1%}), mean acceptance length {stats['spec_mean_acceptance_length']:.2f}]")
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:   # Ctrl-C: the modes have restored the terminal; no traceback
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
