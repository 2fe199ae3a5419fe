"""
run.py - the command line: every request goes through engine.LLMEngine.

    python run.py                                   # Qwen/Qwen3-0.6B (offline: the `demo` model, with a banner)
    python run.py --model demo --prompt "Hi" --prompt "Why is the sky blue?" --max-tokens 32
    python run.py --model ./my-qwen3-folder --temperature 0.7 --top-p 0.9 --seed 1 --stream
    python run.py --model tiny --output json        # one JSON object on stdout, humans' text on stderr

Exit codes:
  0    every request was served.
  2    bad input: one `error:` line on stderr that names the value and what is allowed, no traceback.
       Every flag's type and range is checked before anything is loaded (check_args). A prompt that
       cannot be served (empty, not valid UTF-8, longer than the context) is refused alone: the other
       prompts still run, and the exit code is 2 at the end.
  1    the output cannot be written, which is not bad input: stdout closed or on a full disk gives one
       `error: cannot write the output ...` line; a pipe closed by its reader (`| head`) ends the run
       quietly, as Python's own recipe for BrokenPipeError does.
  130  interrupted (Ctrl-C).

--output json prints exactly one JSON object on stdout once serving has begun: a refused prompt keeps
its place in "requests" (an "error", no tokens, "finish_reason": null), and on Ctrl-C the requests not
finished yet have "finish_reason": "abort" (vLLM's name) with the tokens they had.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass


def hold_standard_streams() -> None:
    """A standard stream the process started without (`>&-`, `<&-`): /dev/null holds its number, so that no
    file opened later (a checkpoint, a compiler's output) takes fd 0, 1 or 2. Python has set sys.stdin /
    sys.stdout / sys.stderr to None for it, which main() reads as "closed"."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)   # the lowest free number: fd itself


if __name__ == "__main__":
    hold_standard_streams()   # before the imports below open any file

import engine as engine_mod  # noqa: E402

DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."
DEFAULT_SPECULATIVE_TOKENS = 4

# The integer flags' ranges, checked before anything is loaded. The upper bounds keep every count and
# size clear of overflow in the tensors and lists it sizes (int32's range for counts).
MAX_INT = 2**31 - 1
MAX_BLOCK_SIZE = 1024          # vLLM's blocks are 8-128 tokens; the C++ decode kernel takes up to 64, torch's path any
MAX_SPECULATIVE_TOKENS = 64    # 07 keeps a counter per draft position; long drafts are almost never all accepted
SEED_LIMIT = 2**64             # torch.Generator.manual_seed takes [0, 2**64): so must every request's seed + i
INT_RANGES = {                 # flag: (smallest, largest); a flag left at None keeps the engine's default
    "max_tokens": (1, MAX_INT), "top_k": (0, MAX_INT), "block_size": (1, MAX_BLOCK_SIZE),
    "num_kv_blocks": (1, MAX_INT), "max_num_seqs": (1, MAX_INT), "max_num_batched_tokens": (1, MAX_INT),
    "max_model_len": (2, MAX_INT), "num_speculative_tokens": (1, MAX_SPECULATIVE_TOKENS),
    "xray_every": (1, MAX_INT), "xray_layer": (0, MAX_INT), "chapter": (1, 12),
}

OFFLINE_BANNER = """\
*** {model} is not in the local Hugging Face cache and the Hub cannot be reached. ***
Running the built-in `demo` model instead: exactly Qwen3-0.6B's architecture (28 layers, 16 query /
8 KV heads of 128 dims, the real Qwen3 tokenizer) with RANDOM weights. Every mechanism you see is
real - tokenization, prefill, paged KV cache, sampling - but the text is noise. With network access,
the first run downloads the real weights (~1.5 GB); or pass --model PATH to a downloaded Qwen3 folder.
"""


class UsageError(ValueError):
    pass


class OutputError(Exception):
    """stdout cannot be written (closed, a full disk, a pipe its reader closed): exit 1, not 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """argparse's own refusals (a value of the wrong type, an unknown flag) as run.py's: one `error:` line, exit 2."""
        print(f"error: {message} (python run.py --help lists the flags)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="run.py", description="nano-vllm-py: a small, readable Qwen3 serving engine.")
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
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off; at most the vocabulary)")
    g.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set with this much probability, in (0, 1] (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability, in [0, 1] (0 = off)")
    g.add_argument("--seed", type=int, default=None,
                   help="request i samples with seed + i, which must be in [0, 2**64) (default: unseeded)")
    g.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    g = p.add_argument_group("engine")
    g.add_argument("--block-size", type=int, default=16,
                   help=f"tokens per KV block, at most {MAX_BLOCK_SIZE} (default: %(default)s)")
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
    g.add_argument("--num-speculative-tokens", type=int, default=None,   # None: not given (it implies --speculative)
                   help=f"draft tokens per sequence per step, k, 1 to {MAX_SPECULATIVE_TOKENS}; implies --speculative "
                        f"(default: {DEFAULT_SPECULATIVE_TOKENS})")
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


def utf8_problem(text: str) -> str | None:
    """None for text that is valid UTF-8, else what is wrong with it. Python hands argv's bytes that are
    not UTF-8 over as lone surrogates (surrogateescape): they can be neither tokenized nor printed."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        try:
            raw = text.encode("utf-8", "surrogateescape")      # back to the bytes the user gave
        except UnicodeEncodeError:
            raw = text.encode("utf-8", "backslashreplace")
        shown = repr(raw) if len(raw) <= 40 else repr(raw[:40])[:-1] + "...'"
        return f"{shown} is not valid UTF-8 (at byte {len(text[:e.start].encode())}): give UTF-8 text"


def printable(text: str) -> str:
    """text as valid UTF-8 (bytes that were not are U+FFFD), for JSON and the terminal."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def check_args(args) -> None:
    """Refuse bad values before anything is loaded: every flag's range (argparse checked the types), the
    seeds of all requests, the stop strings. Fills in the defaults that depend on other flags. The prompts
    are checked one by one when they are added (check_prompt): a bad one fails alone."""
    k_given = args.num_speculative_tokens is not None
    if not k_given:
        args.num_speculative_tokens = DEFAULT_SPECULATIVE_TOKENS
    for flag, (lo, hi) in INT_RANGES.items():
        value = getattr(args, flag)
        name = "--" + flag.replace("_", "-")
        if value is not None and value < lo == 1:
            raise UsageError(f"{name} must be a positive integer, got {value}")
        if value is not None and not lo <= value <= hi:
            raise UsageError(f"{name} must be between {lo} and {hi}, got {value}")
    gb = args.kv_cache_memory_gb
    if gb is not None and not (math.isfinite(gb) and gb > 0):
        raise UsageError(f"--kv-cache-memory-gb must be a finite positive number, got {gb}")
    if args.seed is not None:
        n = len(args.prompt or [DEFAULT_PROMPT])
        if not 0 <= args.seed <= SEED_LIMIT - n:
            raise UsageError(f"--seed must be between 0 and {SEED_LIMIT - n} (request i samples with the 64-bit seed "
                             f"seed + i, here for {n} prompt{'s' if n > 1 else ''}), got {args.seed}")
    for i, stop in enumerate(args.stop):
        problem = utf8_problem(stop)
        if problem:
            raise UsageError(f"--stop #{i + 1}: {problem}")
    # --draft-model and --num-speculative-tokens only mean something with speculation: they turn it on
    args.speculative_implied_by = None
    if not args.speculative and (args.draft_model is not None or k_given):
        args.speculative_implied_by = "--draft-model" if args.draft_model is not None else "--num-speculative-tokens"
        args.speculative = True


def check_prompt(prompt: str) -> None:
    """Raise ValueError for a prompt that no model can serve (the engine refuses the rest in add_request)."""
    if not prompt.strip():
        raise ValueError("the prompt is empty: give some text")
    problem = utf8_problem(prompt)
    if problem:
        raise ValueError(problem)


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
    k = args.num_speculative_tokens or DEFAULT_SPECULATIVE_TOKENS
    config = engine_mod.EngineConfig(
        model=folder, dtype=args.dtype, device=args.device, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, kv_cache_memory_gb=args.kv_cache_memory_gb, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching, enforce_eager=args.enforce_eager, compile=args.compile,
        speculative=args.speculative or args.draft_model is not None, draft_model=args.draft_model,
        num_speculative_tokens=k)
    engine = engine_mod.LLMEngine(config)
    fmt = engine_mod.kv_cache_lesson.fmt_bytes
    info(f"model {model} ({folder}) on {engine.device}, {str(engine.dtype).removeprefix('torch.')}: "
         f"weights {fmt(engine.weights_bytes)}, KV pool {fmt(engine.kv_cache_bytes)} "
         f"({engine.num_kv_blocks} blocks of {args.block_size} tokens = {engine.num_kv_blocks * args.block_size:,} tokens)")
    if engine.speculative is not None:
        draft = args.draft_model or (f"built-in: the target's first {engine.draft_model.config.num_hidden_layers} "
                                     f"of {engine.model_config.num_hidden_layers} layers")
        implied = getattr(args, "speculative_implied_by", None)
        info(f"speculative decoding{f' (implied by {implied})' if implied else ''}: draft {draft}, k = {k}")
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


@dataclass
class Request:
    """One --prompt on its way through the run, in the order given."""
    prompt: str
    text: str | None = None          # what the engine got (after the chat template)
    request_id: int | None = None    # once the engine accepted it
    error: str | None = None         # why it was refused
    output: engine_mod.RequestOutput | None = None   # the engine's, as it grows

    def as_json(self, tokenizer) -> dict:
        """The request's entry of --output json's "requests"; an unfinished one (Ctrl-C) is "abort"."""
        if self.error is not None:
            return {"prompt": printable(self.prompt), "prompt_token_ids": [], "token_ids": [], "text": "",
                    "finish_reason": None, "error": self.error}
        out = self.output
        if out is not None and out.finished:      # "error": the model's logits were not finite (out.error says)
            return {"prompt": printable(self.prompt), "prompt_token_ids": out.prompt_token_ids,
                    "token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason,
                    **({"error": out.error} if out.error else {})}
        ids = list(out.token_ids) if out is not None else []
        prompt_ids = (list(out.prompt_token_ids) if out is not None else
                      tokenizer.encode(self.text) if tokenizer is not None and self.text is not None else [])
        return {"prompt": printable(self.prompt), "prompt_token_ids": prompt_ids, "token_ids": ids,
                "text": tokenizer.decode(ids) if ids else "", "finish_reason": "abort"}


class GuardedStdout:
    """sys.stdout while main() runs: a write or flush that fails raises OutputError, so that it is told
    apart from the OSErrors of the files the engine reads and writes. Everything written to stdout goes
    through it: the text, the JSON, the modes' and the tutorial's rich consoles."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s):
        try:
            try:
                return self.stream.write(s)
            except UnicodeEncodeError:   # a terminal that is not UTF-8 (PYTHONIOENCODING=ascii): escapes, no crash
                enc = self.stream.encoding or "ascii"
                return self.stream.write(s.encode(enc, "backslashreplace").decode(enc))
        except OSError as e:
            raise OutputError(e) from e

    def flush(self):
        try:
            self.stream.flush()
        except OSError as e:
            raise OutputError(e) from e

    def __getattr__(self, name):
        return getattr(self.stream, name)


def silence_stdout(stream) -> None:
    """Point stdout's file descriptor at /dev/null after a failed write, so that the interpreter's last
    flush of what is still buffered does not fail again (Python's recipe for BrokenPipeError)."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):   # not a real file (a test's capture): nothing to do
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv=None) -> int:
    if sys.stderr is None:   # stderr closed: print(file=None) would write humans' text to stdout
        sys.stderr = open(os.devnull, "w")
    args = build_parser().parse_args(argv)
    if sys.stdout is None:
        print("error: cannot write the output: stdout is closed", file=sys.stderr)
        return 1
    stdout = sys.stdout
    sys.stdout = GuardedStdout(stdout)
    try:
        return serve(args)
    except OutputError as e:
        sys.stdout = stdout
        silence_stdout(stdout)
        cause = e.__cause__
        if not isinstance(cause, BrokenPipeError):   # a reader that stopped reading (`| head`): quietly
            print(f"error: cannot write the output to stdout: {getattr(cause, 'strerror', None) or cause}",
                  file=sys.stderr)
        return 1
    finally:
        sys.stdout = stdout


def serve(args) -> int:
    # Generated text goes to stdout (to stderr under --output json, where stdout is the JSON alone);
    # everything about the run goes to stderr.
    def show_text(msg: str = "", end="\n") -> None:   # sys.stdout looked up now: --dashboard's Live redirects it
        print(msg, end=end, file=sys.stderr if args.output == "json" else sys.stdout, flush=True)

    def info(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def print_json(model_name, engine) -> None:
        tokenizer = engine.tokenizer if engine is not None else None
        doc = {"model": printable(model_name), "requests": [r.as_json(tokenizer) for r in requests],
               "stats": engine.stats_summary() if engine is not None else {}}
        utf8 = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "") == "utf8"
        print(json.dumps(doc, ensure_ascii=not utf8))   # \u escapes where stdout cannot take UTF-8
        sys.stdout.flush()

    requests = [Request(prompt) for prompt in args.prompt or [DEFAULT_PROMPT]]
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
        vocab = engine.model_config.vocab_size
        if args.top_k > vocab:
            raise UsageError(f"--top-k must be between 0 and {vocab} (the vocabulary of {model_name}), got {args.top_k}")
        live_view = attach_modes(args, engine)
    except (UsageError, ValueError) as e:   # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:               # while loading: under --output json, still the one object
        if args.output != "json" or args.tutorial:
            raise
        print_json(args.model, None)
        info("\ninterrupted")
        return 130

    status = 0
    by_id: dict[int, Request] = {}
    last = None
    try:
        for i, r in enumerate(requests):
            try:
                check_prompt(r.prompt)
                r.text = r.prompt if args.raw else engine.tokenizer.apply_chat_template(
                    [{"role": "user", "content": r.prompt}], add_generation_prompt=True, enable_thinking=args.think)
                p = engine_mod.SamplingConfig(**{**params.__dict__, "seed": None if args.seed is None else args.seed + i})
                r.request_id = engine.add_request(r.text, p)
            except ValueError as e:
                r.error = str(e)
                print(f"error: prompt #{i + 1}: {e}", file=sys.stderr)
                status = 2
                continue
            by_id[r.request_id] = r
        accepted = list(by_id.values())
        with live_view:
            for delta, o in engine.stream([], None):
                by_id[o.request_id].output = o
                if args.stream and delta:
                    if len(accepted) > 1 and last != o.request_id:
                        show_text(f"\n[{o.request_id}] ", end="")
                    last = o.request_id
                    show_text(delta, end="")
        if args.stream:
            show_text()
    except KeyboardInterrupt:   # Ctrl-C: under --output json, what was generated so far
        if args.output != "json":
            raise
        print_json(model_name, engine)
        info("\ninterrupted")
        return 130

    for i, r in enumerate(requests):
        if r.output is not None and r.output.finish_reason == "error":
            print(f"error: prompt #{i + 1}: {r.output.error}", file=sys.stderr)
            status = 2
    stats = engine.stats_summary()
    if args.output == "json":
        print_json(model_name, engine)
    elif not args.stream:
        for r in accepted:
            if len(accepted) > 1:
                show_text(f"=== [{r.request_id}] {r.prompt}")
            show_text(r.output.text)
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
