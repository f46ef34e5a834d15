"""How far a calibrated forecast can be trusted where it stands: for each way a step-cost part was
obtained (profiled, transferred to an unprofiled model, carried to an unprofiled GPU, attention
carried across shape or GPU), the error that way showed where it could be measured.

Every figure is read from what measured it, never assumed:
- the profile's own scoring, `fit.json` beside it (`rkvprof fit DIR`): the whole-layer dense time
  with each profiled model held out of the fit (several models), or the k-fold held-out error of
  each operator (one model);
- the shipped transfer checks, `calibration/data/trust/transfer.json`, written by
  `rkvsim validate-transfer --trust-out ...`: each measured GPU's dense fit carried to the other
  measured GPUs, the roofline prior against them, and FP16 attention carried between the A6000
  (LLaMA-2-7B, TP 1) and A100 (LLaMA-2-70B, TP 2) tables both ways.
Where nothing measured a way (a compression method's A6000 ratio carried to another GPU, a profile
nobody scored), the figure says so and carries no number.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from rkvsim.models.files import UnreadableFile

from rkvsim.calibration.steps.data_files import load, packaged, profiler_data

TRUST_FILE = ("trust", "transfer.json")
TRUST_SCHEMA = 1
CHECKS_BY = "calibration/data/trust/transfer.json (rkvsim validate-transfer)"


@dataclass(frozen=True)
class Trust:
    part: str                     # dense | attention | method ratio
    how: str                      # what was measured, in words
    median_pct: float | None      # typical error (MAPE, %) over the cases; None: not measured
    worst_pct: float | None
    cases: int                    # held-out models, GPU pairs or table directions summarised
    measured_by: str              # the file and command the figures come from


def _pct(values: list[float]) -> tuple[float, float]:
    return round(100 * statistics.median(values), 2), round(100 * max(values), 2)


def transfer_checks() -> dict | None:
    """The shipped transfer checks (None when absent: a tree that never wrote them)."""
    p = packaged(*TRUST_FILE)
    return load(str(p), "transfer checks (rkvsim validate-transfer --trust-out)") if p.exists() else None


def _fit_json(profile_dir: str) -> tuple[dict | None, str]:
    """fit.json beside a profile (read once per process), or None where it is missing or unreadable."""
    from rkvsim.calibration.steps.fit import FIT_JSON, fit_folder
    p = fit_folder(profile_dir) / FIT_JSON
    try:
        return (load(str(p), "fit report (rkvprof fit)") if p.exists() else None), str(p)
    except UnreadableFile:
        return None, str(p)


def _doc_scores(doc: dict | None, keep) -> list[float]:
    """The held-out error of the kept estimator of each fit.json operator row `keep(row)` accepts."""
    errs = [op.get(f"heldout_mape_{op.get('chosen')}") for op in (doc or {}).get("operators", []) if keep(op)]
    return [e for e in errs if isinstance(e, (int, float)) and e == e]


def _shown(path: str) -> str:
    """A shipped profile's path as the source tree names it (profiler/data/...): the same in every
    checkout and install; a user's own profile keeps its path."""
    root = profiler_data().resolve().parent.parent
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


def _scored(f) -> float | None:
    """An operator fit's held-out error of the estimator it kept (NaN or absent: not scored)."""
    v = (getattr(f, "heldout", None) or {}).get(getattr(f, "chosen", None))
    return float(v) if isinstance(v, (int, float)) and v == v else None


def dense_trust(fit, profile_dir: str, model_name: str) -> Trust:
    """The dense part from a profile (`fit`: its StepFit): the scoring the fit holds, else the fit.json
    `rkvprof fit` wrote beside the profile (a shipped multi-model profile is fitted unscored where it
    runs). With several models, the whole-layer leave-one-model-out error (the model's own when it was
    profiled: an upper bound, the fit saw its rows; else over every held-out model); with one, the
    k-fold error of each dense operator."""
    doc, path = _fit_json(profile_dir)
    shown = _shown(profile_dir)
    by_doc = f"{_shown(path)} (rkvprof fit {shown} --leave-one-model-out)"
    layer, by = (getattr(fit, "layer_heldout", None) or {}).get("shape+gbt"), f"the fit of {shown}"
    if not layer and doc is not None:
        layer, by = (doc.get("layer_leave_one_model_out") or {}).get("shape+gbt"), by_doc
    if layer:
        if model_name in layer:
            v = round(100 * layer[model_name], 2)
            return Trust("dense", f"whole-layer dense time with {model_name} held out of the fit (an upper bound: "
                                  "the fit saw its rows)", v, v, 1, by)
        med, worst = _pct(list(layer.values()))
        return Trust("dense", f"whole-layer dense time of a model never profiled: each of the {len(layer)} profiled "
                              f"models ({', '.join(sorted(layer))}) held out of the fit", med, worst, len(layer), by)
    errs = [e for (fam, _m, _op), f in sorted(getattr(fit, "ops", {}).items()) if fam == "dense"
            for e in [_scored(f)] if e is not None]
    by = f"the fit of {shown} (k-fold)"
    if not errs and doc is not None:
        errs, by = _doc_scores(doc, lambda op: op.get("family") == "dense"), by_doc
    if not errs:
        return Trust("dense", f"not scored: run rkvprof fit {shown}", None, None, 0, by_doc)
    how = f"k-fold held-out error of each dense operator of {', '.join(fit.model_names)}"
    if model_name not in fit.model_names:
        how += f" (applied to {model_name} through its shape: that transfer is not scored on one model)"
    med, worst = _pct(errs)
    return Trust("dense", how, med, worst, len(errs), by)


def _carry_rows(source: str) -> list[dict]:
    """The shipped dense-carry checks from `source` (a GPU, or 'prior' for the roofline prior)."""
    return [r for r in (transfer_checks() or {}).get("dense_gpu_carry", []) if r.get("from") == source]


def carry_trust(donor: str, to: str | None = None) -> Trust:
    """Dense operators carried from `donor` to a GPU nobody profiled: the donor's fit carried to each
    other GPU that was measured, step dense time (rkvsim validate-transfer); where the destination
    itself was measured apart (the paper's A6000 table), that very pair."""
    rows = _carry_rows(donor)
    pair = [r for r in rows if r.get("to") == to]
    if pair:
        v = round(100 * pair[0]["mape"], 2)
        return Trust("dense carry", f"{donor}'s dense fit carried by the datasheet roofline to {to}, scored on "
                                    f"{to}'s own measured dense step time ({pair[0]['points']} points)", v, v, 1,
                     CHECKS_BY)
    if not rows:
        return Trust("dense carry", f"{donor}'s operators carried by the datasheet roofline: not measured", None,
                     None, 0, CHECKS_BY)
    med, worst = _pct([r["mape"] for r in rows])
    return Trust("dense carry", f"{donor}'s dense fit carried by the datasheet roofline to each other measured GPU "
                                f"({', '.join(r['to'] for r in rows)}), step dense time", med, worst, len(rows),
                 CHECKS_BY)


def prior_trust() -> Trust:
    """The roofline prior's dense time against every measured GPU's."""
    rows = _carry_rows("prior")
    if not rows:
        return Trust("dense", "roofline prior: not measured", None, None, 0, CHECKS_BY)
    med, worst = _pct([r["mape"] for r in rows])
    return Trust("dense", f"roofline prior against each measured GPU's dense step time "
                          f"({', '.join(r['to'] for r in rows)})", med, worst, len(rows), CHECKS_BY)


def roofline_attention_trust() -> Trust:
    """The roofline prior's attention (its efficiency factors on the datasheet) has no shipped check: the
    transfer checks score the raw datasheet roofline, not the prior, so no number is given."""
    return Trust("attention", "roofline prior: not measured here (rkvsim validate scores it against measured "
                              "engine steps)", None, None, 0, "")


def attention_trust(kind: str, fit, profile_dir: str, method: str) -> Trust:
    """kind: 'profile' (a table of this shape on this GPU: the k-fold error of its decode and prefill
    fits), else carried across shape or GPU (the A6000 <-> A100 checks, both ways)."""
    if kind == "profile":
        errs = [e for fam in ("decode", "prefill") for f in [fit.get(fam, method, "attention")]
                if f is not None for e in [_scored(f)] if e is not None]
        by = f"the fit of {_shown(profile_dir)} (k-fold)"
        if not errs:
            doc, path = _fit_json(profile_dir)
            errs = _doc_scores(doc, lambda op: op.get("op") == "attention" and op.get("method") == method)
            by = f"{_shown(path)} (rkvprof fit {_shown(profile_dir)})"
        if not errs:
            return Trust("attention", "measured table of this shape; its fit not scored", None, None, 0, by)
        med, worst = _pct(errs)
        return Trust("attention", f"k-fold held-out error of the {method} attention fit (decode, prefill)", med, worst,
                     len(errs), by)
    cells = [st["mape"] for d in (transfer_checks() or {}).get("attention", {}).values() for st in d.values()]
    if not cells:
        return Trust("attention", "carried across shape or GPU: not measured", None, None, 0, CHECKS_BY)
    med, worst = _pct(cells)
    return Trust("attention", "FP16 attention carried across shape and GPU by the roofline (A6000 LLaMA-2-7B TP 1 "
                              "<-> A100 LLaMA-2-70B TP 2, decode and prefill, both ways)", med, worst, len(cells),
                 CHECKS_BY)


def ratio_trust() -> Trust:
    """A compression method's attention as FP16's times its A6000 ratio: nothing measured the ratio elsewhere."""
    return Trust("method ratio", "the compression method's attention over FP16's, measured on the A6000 and applied "
                                 "to this GPU's FP16 attention: the ratio's carry to another GPU is not measured",
                 None, None, 0, "calibration/data/method_ratios/a6000.json")


def cpu_trust(fit: dict, host: str, tp: int, engine: str) -> Trust:
    """Per-step CPU time from Vidur's measured vLLM V0 host tables: the fitted line `fit`
    (calibration/steps/cpu_overheads.line) and its error on the measured medians. What it cannot say:
    V1's own CPU time (the parts V1 keeps in its step loop are taken from V0's measurements)."""
    v = round(100 * fit["mape"], 2)
    gen = "vLLM V0's step loop" if engine == "v0" else "the parts vLLM V1 keeps in its step loop (input preparation, " \
                                                      "sampler), as V0 timed them"
    return Trust("cpu", f"per-step CPU time, fixed + per-sequence line on Vidur's {host} host at TP {tp}: {gen}; "
                        f"error of the line on the {fit['rows']} measured batch sizes", v, v, 1,
                 "calibration/data/cpu_overheads/vidur.json (python -m rkvsim.calibration.steps.cpu_overheads)")
