"""
01 - Tokenization: text -> token ids -> text.

A language model never sees characters. It sees integers ("token ids"), each one a row of its
embedding table, and it predicts the next integer. The tokenizer, learned once before the model was
trained, translates between the two: encode() turns a string into ids, decode() ids back into a string.

Qwen3 uses byte-level BPE (byte pair encoding), like GPT-2 and GPT-4:

1. Normalize the text (Unicode NFC, so "e" + combining accent and "é" give the same ids).
2. Pre-tokenize: a regex cuts the text into chunks (words with their leading space, single digits,
   punctuation runs, whitespace runs). BPE never merges across two chunks.
3. Each chunk becomes its UTF-8 bytes. Every one of the 256 byte values is a token, so any string
   can be encoded: nothing is ever "unknown", emoji and Chinese included.
4. BPE: repeatedly merge the adjacent pair of pieces whose merged bytes form the most important token,
   until no adjacent pair forms a token. The vocabulary is a ranked list of byte strings (151,643 for
   Qwen), and "most important" means "lowest rank": the rank order *is* the merge order, because
   training added tokens one merge at a time, most frequent first.

Worked example, "Hello" (one chunk), bytes H e l l o:

    H e l l o   --merge "el"   (rank 301)-->   H el l o
    H el l o    --merge "lo"   (rank 385)-->   H el lo
    H el lo     --merge "ello" (rank 4791)-->  H ello
    H ello      --merge "Hello" (rank 9707)--> Hello       ==> [9707]

and " Paris" ends as the single token 12095 (the leading space is part of the word). Text the model
saw rarely is left in smaller pieces; a character whose UTF-8 bytes are not merged is split across
several tokens, each holding a partial UTF-8 sequence (run this file on some emoji to see it).

After the regular tokens come 26 added tokens (ids 151643..151668) such as <|im_start|> and
<|im_end|>: the chat format is written with them, and they are matched as whole strings in the
text before any BPE happens.

The ranks come as a plain tiktoken file (`base64(bytes) rank` per line). The Hugging Face `tokenizers`
library, which does the actual work here (fast, in Rust), wants a `tokenizer.json` instead: a vocab
(piece -> id) and an ordered list of merges (left piece, right piece). build_tokenizer_json() derives
both from the ranks; the result ships in assets/ and also loads with transformers.AutoTokenizer
(tests/test_01_tokenize.py checks both agree with tiktoken).

    python 01_tokenize.py "some text"                 # show the tokens and the chat prompt
    python 01_tokenize.py --rebuild qwen.tiktoken     # regenerate assets/*.json from a tiktoken rank file
"""

import argparse
import base64
import json
import os
import sys

from rich.console import Console
from rich.table import Column, Table
from rich.text import Text
from tokenizers import Tokenizer as HFTokenizer

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

# The pre-tokenizer regex of Qwen2/2.5/3. Note \p{N} alone: every digit is its own chunk, so
# "12345" is always five tokens (numbers get a consistent representation).
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The added tokens, in id order after the 151,643 BPE ranks, all matched as whole strings in the text.
# The "special" flag is copied from the real Qwen3 tokenizer: decode(skip_special_tokens=True) drops the
# control tokens, but keeps the tool-call, fill-in-the-middle and thinking markers, so a reply's
# <think>...</think> or <tool_call>...</tool_call> stays visible to whoever parses it.
CONTROL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
TEXT_MARKER_TOKENS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]

# The same format as Tokenizer.apply_chat_template below, for transformers (which wants Jinja).
# Like real Qwen3's template, an undefined enable_thinking means thinking on; only an explicit false
# adds the empty think block. Our Python API defaults to thinking off instead.
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table. tokenizer.json stores pieces as JSON strings, and raw bytes
    (a lone 0x0A, half of a UTF-8 sequence) are not valid text, so each byte gets a stand-in
    character. Printable Latin-1 bytes stand for themselves; the other 68 (control characters,
    space, ...) get chr(256), chr(257), ... in byte order, which is why a space shows up as 'Ġ'."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) if b in printable else chr(256 + others.index(b)) for b in range(256)}


def load_ranks(path: str) -> dict[bytes, int]:
    """Read a tiktoken file: one `base64(token bytes) rank` per line."""
    with open(path, "rb") as f:
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}


def bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Split `token` into pieces the way tiktoken encodes, allowing only tokens ranked below max_rank:
    start from single bytes and keep merging the adjacent pair whose concatenation has the lowest rank."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None  # (rank, position) of the best adjacent pair so far
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return parts
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def build_tokenizer_json(ranks: dict[bytes, int]) -> dict:
    """The Hugging Face tokenizer.json for these BPE ranks, as a plain dict.

    vocab:  every token's bytes, spelled with bytes_to_unicode(), mapped to its rank (= its id).
    merges: one per multi-byte token, in rank order (a merge's position is its priority, like a rank):
            the two pieces BPE restricted to lower-ranked tokens makes of it, the last step tiktoken
            takes to build it ("Hello" (9707) = "H" + "ello", as in the worked example at the top).
    """
    byte_char = bytes_to_unicode()
    piece = lambda b: "".join(byte_char[x] for x in b)  # noqa: E731   bytes -> their tokenizer.json spelling
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    assert [rank for _, rank in by_rank] == list(range(len(by_rank))), "ranks must be 0..n-1"
    merges = []
    for token, rank in by_rank:
        if len(token) > 1:
            left, right = bpe(ranks, token, rank)  # unpacking checks there are exactly two parts
            # Pieces never contain a space (byte 0x20 is spelled 'Ġ'), so "left right" is unambiguous.
            merges.append(f"{piece(left)} {piece(right)}")

    n = len(by_rank)
    added = [(t, True) for t in CONTROL_TOKENS] + [(t, False) for t in TEXT_MARKER_TOKENS]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        # normalized: false -> matched against the raw text, before NFC.
        "added_tokens": [{"id": n + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": special} for i, (t, special) in enumerate(added)],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
            # use_regex false: the Split above already chunked the text; this step only maps bytes to chars.
            byte_level,
        ]},
        "post_processor": None,  # nothing is added around encoded text: no BOS/EOS
        "decoder": byte_level,  # chars -> bytes -> UTF-8 (invalid sequences become U+FFFD)
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {piece(token): rank for token, rank in by_rank}, "merges": merges,
        },
    }


def build_tokenizer_config(tokenizer_json: dict) -> dict:
    """tokenizer_config.json: what transformers.AutoTokenizer needs on top of tokenizer.json."""
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {
            str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for t in tokenizer_json["added_tokens"]
        },
        "bos_token": None, "add_bos_token": False, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None,  # byte-level BPE can spell anything (Qwen2Tokenizer would default one)
        "clean_up_tokenization_spaces": False,  # decode must give back the text exactly
        "model_max_length": 40960,
        "chat_template": CHAT_TEMPLATE,
    }


def write_json(obj: dict, path: str) -> None:
    """Fixed options, so rebuilding from the same ranks gives a byte-identical file."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def rebuild(tiktoken_path: str, out_dir: str = ASSETS) -> None:
    """Regenerate tokenizer.json and tokenizer_config.json in out_dir from a tiktoken rank file."""
    tokenizer_json = build_tokenizer_json(load_ranks(tiktoken_path))
    os.makedirs(out_dir, exist_ok=True)
    write_json(tokenizer_json, os.path.join(out_dir, "tokenizer.json"))
    write_json(build_tokenizer_config(tokenizer_json), os.path.join(out_dir, "tokenizer_config.json"))


class ChatPrompt(str):
    """apply_chat_template's text, carrying the ids Tokenizer.encode gives it (`ids`); a plain str stays plain (--raw)."""


class Tokenizer:
    """The few operations the engine needs, on top of a `tokenizers.Tokenizer`."""

    def __init__(self, path: str):
        try:
            self.hf = HFTokenizer.from_file(path)
        except Exception as e:   # not JSON, not a tokenizer ("key must be a string"): the library raises Exception
            raise ValueError(f"{path} is not a usable tokenizer.json: {e}") from None
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        # Generation ends at the end of the assistant turn, or at end-of-text.
        self.eos_token_ids = [self.hf.token_to_id("<|im_end|>"), self.hf.token_to_id("<|endoftext|>")]
        if None in self.eos_token_ids or self.hf.token_to_id("<|im_start|>") is None:
            raise ValueError(f"{path} is not a Qwen tokenizer.json: it lacks <|im_start|>, <|im_end|> or <|endoftext|>")
        self._char_byte = {c: b for b, c in bytes_to_unicode().items()}
        self._added_ids = set(self.hf.get_added_tokens_decoder())

    def encode(self, text: str) -> list[int]:
        # Added tokens in the text (e.g. "<|im_start|>") become their ids (run.py --raw); no BOS or EOS is added.
        return list(text.ids) if isinstance(text, ChatPrompt) else self.hf.encode(text).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (may be a partial UTF-8 sequence)."""
        piece = self.hf.id_to_token(token_id)
        if token_id in self._added_ids:
            return piece.encode("utf-8")  # added tokens are stored as plain text
        return bytes(self._char_byte[c] for c in piece)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            enable_thinking: bool = False) -> ChatPrompt:
        """Qwen3's chat format. Thinking is off by default here (short, direct answers); with it off, the prompt
        already contains an empty think block, so the model skips straight to the answer. The ids come along: only
        the format's markers are control tokens, a "<|im_end|>" typed in a message is text (split_special_tokens)."""
        pieces = [p for m in messages for p in ("<|im_start|>", f"{m['role']}\n{m['content']}", "<|im_end|>", "\n")]
        if add_generation_prompt:
            pieces += ["<|im_start|>", "assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n")]
        prompt, self.hf.encode_special_tokens = ChatPrompt("".join(pieces)), True   # for the odd pieces
        try:
            prompt.ids = [t for i, p in enumerate(pieces) for t in (self.hf.encode(p).ids if i % 2 else [self.hf.token_to_id(p)])]
        finally:
            self.hf.encode_special_tokens = False
        return prompt


def load_tokenizer(model_dir: str | None = None) -> Tokenizer:
    """A model folder's own tokenizer.json wins; otherwise the Qwen3 tokenizer shipped in assets/."""
    if model_dir is not None:
        path = os.path.join(model_dir, "tokenizer.json")
        if os.path.isfile(path):
            return Tokenizer(path)
        print(f"no tokenizer.json in {model_dir}: using the shipped Qwen3 tokenizer", file=sys.stderr)
    return Tokenizer(os.path.join(ASSETS, "tokenizer.json"))


def show(tok: Tokenizer, text: str) -> None:
    """Print each token of `text`, then the chat prompt built around it."""
    console = Console()
    ids = tok.encode(text)
    console.print(Text(f"{text!r} is {len(ids)} tokens:", style="bold"))  # Text: no rich markup in user text
    table = Table(Column("pos", justify="right"), Column("id", justify="right"), "piece")
    for pos, token_id in enumerate(ids):
        raw = tok.token_bytes(token_id)
        try:
            piece = repr(raw.decode("utf-8"))
        except UnicodeDecodeError:
            piece = repr(raw)  # part of a multi-byte character: show the bytes, not a U+FFFD
        table.add_row(str(pos), str(token_id), Text(piece))
    console.print(table)
    prompt = tok.apply_chat_template([{"role": "user", "content": text}])
    console.print("chat prompt (user message, thinking off):", style="bold")
    console.print(Text(prompt))
    console.print(f"{len(tok.encode(prompt))} tokens", style="bold")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Show how Qwen3's tokenizer splits text.")
    parser.add_argument("text", nargs="*", help="text to tokenize (joined by spaces)")
    parser.add_argument("--rebuild", metavar="TIKTOKEN_FILE",
                        help="regenerate assets/tokenizer.json and tokenizer_config.json from a qwen.tiktoken file")
    args = parser.parse_args()
    if args.rebuild:
        rebuild(args.rebuild)
        print(f"wrote {ASSETS}/tokenizer.json and tokenizer_config.json")
    else:
        show(load_tokenizer(), " ".join(args.text) or "Hello world! 12345 東京 👋🏽 <think>")
