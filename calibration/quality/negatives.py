"""Negative samples (Algorithm 1 of arXiv 2503.24000) from per-sample LongBench scores.

Score files are `{PREFIX}_{task}_eval.json`, each a JSON list of `{"id", "score"}`;
the baseline (uncompressed) run and every compressed method have one prefix each.

Strict mode (the default) follows the definition:
- a sample is *benign* when its baseline score is >= the median baseline score of
  its task AND > 0;
- a benign sample is *negative* for a set of methods at threshold theta when every
  member scores <= (1 - theta) x baseline (the boundary counts as a failure);
- samples are matched by id within a task, and each task is counted once.

Paper mode (`compat="paper"`) reproduces the artifact's own counting. Its code could
not be consulted, so the mode rests on two stated assumptions about it:
(a) its task list names passage_count twice, so passage_count's negatives (and its
    benign samples) are counted twice;
(b) its benign filter has no `baseline > 0` term: where a task's median is 0, a
    sample with baseline 0 and every member 0 counts as a failure, 0 <= (1-theta)*0.
Nothing else differs, so per method or set: paper = strict + passage_count's second
copy + 0-vs-0 ties, exactly; `NegativeCounts.decomposition()` gives the three terms.
"""
from __future__ import annotations

import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from rkvsim.models.files import read_json

Scores = dict[str, dict[str, float]]  # task -> sample id -> score

# LongBench's task types (its dataset card); the Chinese tasks are listed only so that
# their files are recognised, the paper's runs use the English ones.
TASK_TYPES: dict[str, str] = {
    "narrativeqa": "single-doc QA", "qasper": "single-doc QA", "multifieldqa_en": "single-doc QA",
    "multifieldqa_zh": "single-doc QA",
    "hotpotqa": "multi-doc QA", "2wikimqa": "multi-doc QA", "musique": "multi-doc QA", "dureader": "multi-doc QA",
    "gov_report": "summarization", "qmsum": "summarization", "multi_news": "summarization",
    "vcsum": "summarization",
    "trec": "few-shot", "triviaqa": "few-shot", "samsum": "few-shot", "lsht": "few-shot",
    "passage_count": "synthetic", "passage_retrieval_en": "synthetic", "passage_retrieval_zh": "synthetic",
    "lcc": "code", "repobench-p": "code",
}
TYPE_ORDER = ("single-doc QA", "multi-doc QA", "summarization", "few-shot", "synthetic", "code")
OTHER_TYPE = "other"
MODES = ("strict", "paper")
PAPER_DOUBLED_TASK = "passage_count"
_SUFFIX = "_eval.json"


class ScoresNotFoundError(ValueError):
    """No score file in the folder carries the prefix."""

    def __init__(self, directory: Path, prefix: str, available: list[str]):
        self.directory, self.prefix, self.available = directory, prefix, available
        super().__init__(f"no files {prefix}_{{task}}{_SUFFIX} in {directory}")


class MissingTaskWarning(UserWarning):
    """A method lacks score files for some of the baseline's tasks."""


def task_type(task: str) -> str:
    return TASK_TYPES.get(task, OTHER_TYPE)


def split_filename(name: str) -> tuple[str, str] | None:
    """`(prefix, task)` of a score file name, or None when it names no known task.

    Only known task names may end a prefix: otherwise a shorter prefix such as
    `gear_..._b1` would swallow `gear_..._b1_4bits_qasper` as a task "4bits_qasper".
    """
    if not name.endswith(_SUFFIX):
        return None
    stem = name[: -len(_SUFFIX)]
    # Longest first, in case one task name ever ends another.
    for task in sorted(TASK_TYPES, key=len, reverse=True):
        if stem.endswith("_" + task) and len(stem) > len(task) + 1:
            return stem[: -len(task) - 1], task
    return None


def available_prefixes(directory: Path | str) -> list[str]:
    d = Path(directory)
    found = {parts[0] for p in d.glob("*" + _SUFFIX) if (parts := split_filename(p.name))}
    return sorted(found)


def load_scores(directory: Path | str, prefix: str) -> Scores:
    """Every task file of one prefix: {task: {id: score}}; ids are compared as strings."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"scores folder {d} does not exist")
    out: Scores = {}
    for path in sorted(d.glob(f"{_glob_escape(prefix)}_*{_SUFFIX}")):
        parts = split_filename(path.name)
        if parts is None or parts[0] != prefix:
            continue
        out[parts[1]] = _read_task(path)
    if not out:
        raise ScoresNotFoundError(d, prefix, available_prefixes(d))
    return out


def _glob_escape(s: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in s)


def _read_task(path: Path) -> dict[str, float]:
    rows = read_json(path, "per-sample score file")
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of {{id, score}}")
    scores: dict[str, float] = {}
    for row in rows:
        try:
            key, score = str(row["id"]), float(row["score"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: bad row {row!r}: needs an id and a numeric score") from e
        if key in scores:
            # A repeated id would make matching ambiguous; refuse rather than pick one.
            raise ValueError(f"{path}: id {key!r} appears twice")
        scores[key] = score
    return scores


@dataclass
class NegativeCounts:
    """Negative samples per method or set at one threshold.

    In paper mode, `by_task["passage_count"]` holds its doubled count, so that
    `counts[name] == sum(by_task[name].values())` in both modes.
    """

    threshold: float
    mode: str
    counts: dict[str, int]
    by_task: dict[str, dict[str, int]]
    by_type: dict[str, dict[str, int]]
    benign: int  # benign samples in the baseline, over the mode's task list
    benign_by_task: dict[str, int]
    doubled: dict[str, int] = field(default_factory=dict)  # paper: passage_count's second copy
    zero_ties: dict[str, int] = field(default_factory=dict)  # paper: 0-vs-0 ties, first copies
    skipped: dict[str, list[str]] = field(default_factory=dict)  # name -> tasks left out
    warnings: list[str] = field(default_factory=list)

    def decomposition(self) -> dict[str, dict[str, int]]:
        """Per name: paper (or strict) count, the two paper-only terms, and what remains."""
        return {
            name: {
                "count": n,
                "passage_count_doubled": self.doubled.get(name, 0),
                "zero_ties": self.zero_ties.get(name, 0),
                "strict": n - self.doubled.get(name, 0) - self.zero_ties.get(name, 0),
            }
            for name, n in self.counts.items()
        }


@dataclass
class ThresholdCurve:
    thresholds: list[float]
    counts: dict[str, list[int]]
    mode: str


@dataclass
class _TaskArrays:
    """One task's benign samples that every member of a set scored, ready to compare."""

    baseline: np.ndarray
    worst: np.ndarray  # the best member's score: all fail iff the best one fails
    weight: int  # 2 for passage_count in paper mode


def _benign_ids(task_scores: Mapping[str, float], mode: str) -> list[str]:
    median = statistics.median(task_scores.values())
    return [i for i, b in task_scores.items() if b >= median and (mode == "paper" or b > 0)]


def _groups(methods: Mapping[str, Scores], sets: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    groups = {name: [name] for name in methods}
    for name, members in (sets or {}).items():
        if name in methods:
            raise ValueError(f"set {name!r} has the name of a method")
        if not members:
            raise ValueError(f"set {name!r} has no members")
        unknown = [m for m in members if m not in methods]
        if unknown:
            raise ValueError(f"set {name!r}: unknown method(s) {', '.join(unknown)}; known: {', '.join(methods)}")
        groups[name] = list(dict.fromkeys(members))
    return groups


def _prepare(baseline: Scores, methods: Mapping[str, Scores], sets, mode: str):
    if mode not in MODES:
        raise ValueError(f"compat must be one of {MODES}, not {mode!r}")
    groups = _groups(methods, sets)
    benign = {task: _benign_ids(s, mode) for task, s in baseline.items() if s}
    weights = {task: 2 if mode == "paper" and task == PAPER_DOUBLED_TASK else 1 for task in benign}
    notes: list[str] = []
    for name, scores in methods.items():
        missing = sorted(t for t in benign if t not in scores)
        if missing:
            notes.append(f"{name}: no scores for task(s) {', '.join(missing)}; skipped")
        extra = sorted(t for t in scores if t not in benign)
        if extra:
            notes.append(f"{name}: task(s) {', '.join(extra)} have no baseline scores; ignored")
    arrays: dict[str, dict[str, _TaskArrays]] = {}
    skipped: dict[str, list[str]] = {}
    for name, members in groups.items():
        per_task = {}
        for task, ids in benign.items():
            if any(task not in methods[m] for m in members):
                skipped.setdefault(name, []).append(task)
                continue
            # Only ids every member scored can be judged; the rest are left out.
            ids = [i for i in ids if all(i in methods[m][task] for m in members)]
            b = np.array([baseline[task][i] for i in ids], dtype=float)
            w = np.array([max(methods[m][task][i] for m in members) for i in ids], dtype=float)
            per_task[task] = _TaskArrays(b, w, weights[task])
        arrays[name] = per_task
    for name in methods:
        unmatched = {t: len(benign[t]) - len(a.baseline) for t, a in arrays[name].items()}
        for task, n in unmatched.items():
            if n:
                notes.append(f"{name}: {n} benign {task} sample(s) have no score under this method; skipped")
    benign_by_task = {t: len(ids) * weights[t] for t, ids in benign.items()}
    return arrays, benign_by_task, skipped, notes


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be within [0, 1], not {threshold}")


def _failing(a: _TaskArrays, threshold: float) -> np.ndarray:
    # Same expression as the definition so that the boundary (<=) matches it bit for bit.
    return a.worst <= (1.0 - threshold) * a.baseline


def count_negatives(
    baseline: Scores,
    methods: Mapping[str, Scores],
    sets: Mapping[str, Sequence[str]] | None = None,
    threshold: float = 0.1,
    compat: str = "strict",
) -> NegativeCounts:
    """Negatives per method (alone) and per set of methods (every member fails)."""
    _check_threshold(threshold)
    arrays, benign_by_task, skipped, notes = _prepare(baseline, methods, sets, compat)
    for note in notes:
        warnings.warn(note, MissingTaskWarning, stacklevel=2)
    counts, by_task, by_type, doubled, ties = {}, {}, {}, {}, {}
    for name, per_task in arrays.items():
        by_task[name], doubled[name], ties[name] = {}, 0, 0
        for task, a in per_task.items():
            fail = _failing(a, threshold)
            n = int(fail.sum())
            by_task[name][task] = n * a.weight
            if a.weight > 1:
                doubled[name] += n * (a.weight - 1)
            if compat == "paper":
                # Strict benign samples have baseline > 0; the rest are paper-only.
                ties[name] += int((fail & (a.baseline <= 0)).sum())
        counts[name] = sum(by_task[name].values())
        by_type[name] = _by_type(by_task[name])
    return NegativeCounts(
        threshold=threshold, mode=compat, counts=counts, by_task=by_task, by_type=by_type,
        benign=sum(benign_by_task.values()), benign_by_task=benign_by_task,
        doubled=doubled, zero_ties=ties, skipped=skipped, warnings=notes,
    )


def _by_type(by_task: Mapping[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for task, n in by_task.items():
        out[task_type(task)] = out.get(task_type(task), 0) + n
    order = {t: i for i, t in enumerate(TYPE_ORDER)}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))


def default_thresholds(step: float = 0.01) -> list[float]:
    n = round(1.0 / step)
    return [round(i * step, 10) for i in range(n + 1)]


def threshold_curve(
    baseline: Scores,
    methods: Mapping[str, Scores],
    sets: Mapping[str, Sequence[str]] | None = None,
    thresholds: Iterable[float] | None = None,
    compat: str = "strict",
) -> ThresholdCurve:
    """Negative count per method or set at each threshold (the paper's Figure 5 / 17)."""
    ths = list(default_thresholds() if thresholds is None else thresholds)
    for t in ths:
        _check_threshold(t)
    arrays, _, _, notes = _prepare(baseline, methods, sets, compat)
    for note in notes:
        warnings.warn(note, MissingTaskWarning, stacklevel=2)
    counts = {
        name: [sum(int(_failing(a, t).sum()) * a.weight for a in per_task.values()) for t in ths]
        for name, per_task in arrays.items()
    }
    return ThresholdCurve(thresholds=ths, counts=counts, mode=compat)
