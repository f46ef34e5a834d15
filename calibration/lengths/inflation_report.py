"""`rkvsim lengths report|fit`: length differences per config beside the paper's Table 9,
and fitting the length-inflation model (rkvsim.calibration.lengths.inflation) with held-out scores.

The argparse definitions live in calibration/cli.py; this module holds the handlers.
"""
from __future__ import annotations

import json
import math
import sys
import zlib
from pathlib import Path

import numpy as np

from rkvsim.calibration.generation.meta import load_meta
from rkvsim.calibration.lengths.inflation import (SHIPPED_DATA, d_shares, finite_or_none, fit_inflation, load_dataset, pairs_from_rows,
                        save_model)

DEFAULT_DATA = SHIPPED_DATA

# Reference figures for display only (the paper's Table 9, Mistral-7B, 1000 ShareGPT
# prompts, max 1024 new tokens; each method sampled independently of the baseline):
# shares (%) of D >= 50% and D <= -50%. Nothing is fitted to them.
PAPER_TABLE9 = {"T=0.9": (45.1, 17.7), "T=1.1": (45.9, 20.0), "KIVI": (2.8, 44.9),
                "GEAR": (0.8, 49.4), "H2O": (11.0, 14.3), "StreamingLLM": (17.3, 16.3)}
# Table 4 (LLaMA-7B, 200 ShareGPT requests where compression lengthened the output):
# mean length increase at the paper's settings. Display only.
PAPER_TABLE4 = {"kivi": ("KIVI-4", 1.69), "gear": ("GEAR-4", 1.70), "h2o": ("H2O-512", 1.55),
                "streamingllm": ("Stream-512", 1.76)}
# The paper's Table 9 rows, by kind (methods the paper did not run have none).
KIND_NAME = {"kivi": "KIVI", "gear": "GEAR", "h2o": "H2O", "streamingllm": "StreamingLLM"}


def paper_row(label: str, kind: str) -> str | None:
    """Which Table 9 row a config is compared with (None: the paper has no such row)."""
    if label == "fp16-t0.9":
        return "T=0.9"
    if label == "fp16-t1.1":
        return "T=1.1"
    return KIND_NAME.get(kind)


BOOTSTRAP = 2000   # resamples of the prompts for the Σ-tokens-ratio interval
CI = 0.90


def token_ratio_interval(pairs, label: str) -> tuple[float, float]:
    """Bootstrap (over prompts) CI of Σ L_config / Σ L_baseline; seeded by the label, so a
    report is reproducible."""
    if len(pairs) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(zlib.crc32(label.encode()))
    a = np.array([p.len for p in pairs], dtype=float)
    b = np.array([max(p.base_len, 1) for p in pairs], dtype=float)
    idx = rng.integers(0, len(a), size=(BOOTSTRAP, len(a)))
    ratios = a[idx].sum(axis=1) / b[idx].sum(axis=1)
    lo, hi = np.quantile(ratios, [(1 - CI) / 2, (1 + CI) / 2])
    return float(lo), float(hi)


def verdict(lo: float, hi: float) -> str:
    """'longer' / 'shorter' when the whole interval is on one side of 1, else 'n.s.'."""
    if math.isnan(lo):
        return "–"
    return "longer" if lo > 1 else "shorter" if hi < 1 else "n.s."


def resample_accuracy(pairs, noise: str = "fp16-reseed") -> dict | None:
    """The paper's length-predictor metric (clipped at 0) when one FP16 reply predicts the
    length of another, independent FP16 reply to the same prompt: a yardstick for a
    predictor that sees only the prompt (one that knew each prompt's typical length exactly
    would score somewhat more; one learnt from data, less)."""
    from rkvsim.calibration.lengths.metrics import paper_accuracy

    ps = [p for p in pairs if p.label == noise]
    if not ps:
        return None
    return {"n": len(ps), "accuracy_clipped": paper_accuracy([max(p.base_len, 1) for p in ps],
                                                             [max(p.len, 1) for p in ps])}


def build_report(rows, meta: dict | None, baseline: str = "fp16") -> dict:
    pairs = pairs_from_rows(rows, baseline)
    labels = list((meta or {}).get("configs", {})) or sorted({p.label for p in pairs} | {baseline})
    base_rows = [r for r in rows if r["config"] == baseline]
    per = []
    for lb in labels:
        if lb == baseline:
            continue
        ps = [p for p in pairs if p.label == lb]
        kind = ps[0].kind if ps else (meta or {}).get("configs", {}).get(lb, {}).get("method", "")
        r = np.array([p.ratio for p in ps]) if ps else np.array([])
        longer = r[r > 1]
        pr = paper_row(lb, kind)
        lo, hi = token_ratio_interval(ps, lb)
        stopped = [p for p in ps if not p.base_cap]
        t4 = PAPER_TABLE4.get(kind) if not lb.startswith("fp16") else None
        per.append({"config": lb, "kind": kind, **d_shares(ps),
                    "mean_ratio": float(r.mean()) if len(r) else float("nan"),
                    "median_ratio": float(np.median(r)) if len(r) else float("nan"),
                    # total tokens over total baseline tokens: what serving cost sees, and
                    # not dominated by prompts whose baseline reply was a few tokens
                    "token_ratio": (sum(p.len for p in ps) / max(1, sum(p.base_len for p in ps)))
                                   if ps else float("nan"),
                    "token_ratio_ci": [lo, hi], "verdict": verdict(lo, hi),
                    # Censoring-free view of lengthening: where the baseline ended on its own,
                    # how often did this config run on to the cap?
                    "base_stopped": len(stopped),
                    "cap_share_when_base_stopped": float(np.mean([p.cap for p in stopped])) if stopped
                                                   else float("nan"),
                    "mean_ratio_when_longer": float(longer.mean()) if len(longer) else float("nan"),
                    "cap_share": float(np.mean([p.cap for p in ps])) if ps else float("nan"),
                    "censored_share": float(np.mean([p.cap or p.base_cap for p in ps])) if ps else float("nan"),
                    "paper_row": pr,
                    "paper_d_ge_50": PAPER_TABLE9[pr][0] / 100 if pr in PAPER_TABLE9 else None,
                    "paper_d_le_m50": PAPER_TABLE9[pr][1] / 100 if pr in PAPER_TABLE9 else None,
                    "paper_table4": {"setting": t4[0], "mean_increase": t4[1]} if t4 else None})
    n_configs = len((meta or {}).get("configs", {})) or len(labels)
    by_prompt: dict[str, int] = {}
    for r in rows:
        by_prompt[str(r["prompt_id"])] = by_prompt.get(str(r["prompt_id"]), 0) + 1
    complete = sum(1 for c in by_prompt.values() if c >= n_configs)
    target = int((meta or {}).get("n", 0))
    return {"baseline": baseline, "model": (meta or {}).get("model", {}).get("name"),
            "max_new_tokens": (meta or {}).get("settings", {}).get("max_new_tokens"),
            "n_rows": len(rows), "n_prompts": len(by_prompt), "n_complete_prompts": complete,
            "n_target": target, "incomplete": bool(meta) and complete < target,
            "baseline_cap_share": float(np.mean([bool(r.get("hit_cap")) for r in base_rows])) if base_rows else None,
            "resample_accuracy": resample_accuracy(pairs),
            "configs": per}


def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def _x(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}×"


def render(rep: dict, con) -> None:
    from rich.table import Table

    t = Table(title=f"response-length change vs '{rep['baseline']}' (same prompt, same random stream)")
    for name, just in (("config", "left"), ("n", "right"), ("D≥50%", "right"), ("D≤−50%", "right"),
                       ("median r", "right"), ("Σ tokens\nratio", "right"),
                       (f"{CI:.0%} CI\n(prompts)", "right"), ("longer?", "left"), ("hit cap", "right"),
                       ("to cap |\nbase ends", "right"), ("paper T9\nrow", "left"), ("paper\nD≥50%", "right"),
                       ("paper\nD≤−50%", "right"), ("paper T4\nincrease", "right")):
        t.add_column(name, justify=just)
    for c in rep["configs"]:
        t4 = c["paper_table4"]
        note = " (noise floor)" if c["config"] == "fp16-reseed" else ""
        t.add_row(c["config"] + note, str(c["n"]), _pct(c["d_ge_50"]), _pct(c["d_le_m50"]),
                  _x(c["median_ratio"]), _x(c["token_ratio"]),
                  "–" if math.isnan(c["token_ratio_ci"][0]) else
                  f"{c['token_ratio_ci'][0]:.2f}–{c['token_ratio_ci'][1]:.2f}", c["verdict"],
                  _pct(c["cap_share"]), _pct(c["cap_share_when_base_stopped"]), c["paper_row"] or "–", _pct(c["paper_d_ge_50"]),
                  _pct(c["paper_d_le_m50"]), f"{t4['mean_increase']:.2f}×" if t4 else "–")
    con.print(t)
    status = (f"still being collected: {rep['n_complete_prompts']} of {rep['n_target']} prompts complete"
              if rep["incomplete"] else "collection complete")
    con.print(f"N = {rep['n_prompts']} prompts ({rep['n_rows']} rows), model {rep['model']}, "
              f"max_new_tokens {rep['max_new_tokens']}; {status}.", highlight=False)
    con.print(f"r = L_config / L_{rep['baseline']}, D = 1 − r. Baseline hit the cap in "
              f"{_pct(rep['baseline_cap_share'])} of prompts. Rows that hit the cap are kept: r is a "
              "lower bound when the config hit it, an upper bound when the baseline did. (The mean of r, in --json, "
              "is dominated by prompts with very short baseline replies.) Σ tokens ratio = Σ L_config / Σ L_baseline, with a "
              f"bootstrap {CI:.0%} interval over prompts ('longer?' says whether it excludes 1). 'to cap | base ends': "
              "share of the prompts whose baseline reply ended on its own where this config ran to the cap. "
              f"Across {len(rep['configs'])} configs about {len(rep['configs']) * (1 - CI):.1f} intervals "
              "would exclude 1 by chance alone.",
              highlight=False)
    ra = rep.get("resample_accuracy")
    if ra:
        con.print(f"One FP16 reply predicting the length of another to the same prompt scores "
                  f"{ra['accuracy_clipped']:.1f}% in the paper's length-predictor metric ({ra['n']} prompts): "
                  "a yardstick for any predictor of this model's lengths from the prompt alone.", highlight=False)
    con.print("Paper: Mistral-7B (Table 9) / LLaMA-7B (Table 4: mean increase of KIVI-4, GEAR-4, H2O-512, "
              "Stream-512 over requests that got longer) at the paper's settings, each method "
              "sampled independently of the baseline; ours share the baseline's random stream, so "
              "compare our controls with fp16-reseed (independent stream = sampling-noise floor). "
              "Eviction budgets are scaled (64/128 vs 512), see meta.json 'scaling'.", highlight=False)


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 170)


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return finite_or_none(obj)


def cmd_report(args) -> int:
    data = Path(args.data) if args.data else DEFAULT_DATA
    if not data.is_dir():
        print(f"error: --data {data} is not a generation folder; pass one written by "
              "python -m rkvsim.calibration.generation.collect", file=sys.stderr)
        return 2
    rows = load_dataset(data)
    rep = build_report(rows, load_meta(data), args.baseline)
    if args.json:
        print(json.dumps(_clean(rep), indent=2))
    else:
        render(rep, _console())
    if getattr(args, "html", None):
        from rkvsim.calibration.lengths.inflation_html import write_html
        print(f"report: {write_html(args.html, rep, rows)}", file=sys.stderr)
    return 0


def heldout_table(model):
    from rich.table import Table

    t = Table(title=f"held-out prompts ({model.info['n_test_prompts']} of {model.info['n_prompts']}, "
                    f"split seed {model.seed}): FP16 lengths mapped by the training prompts' quantile map; "
                    f"the simulator uses the map refitted on all {model.info['n_prompts']} prompts")
    for name in ("config", "n train", "bins", "n test", "Σ tok ratio obs", "Σ tok ratio pred", "KS lengths",
                 "mean log err", "MAE log", "test hit cap"):
        t.add_column(name, justify="left" if name == "config" else "right")
    for lb in model.labels():
        d, h = model.configs[lb], model.heldout.get(lb)
        cells = ([str(h["n_train"]), str(h["bins_train"]), str(h["n"]), _x(h["token_ratio_obs"]), _x(h["token_ratio_pred"]), f"{h['ks']:.2f}",
                  f"{h['mean_log_err']:+.3f}", f"{h['mae_log']:.3f}", _pct(h["cap_share"])]
                 if h else [str(d.n), str(d.bins), "0"] + ["–"] * 6)
        t.add_row(lb, *cells)
    return t


def cmd_fit(args) -> int:
    data = Path(args.data) if args.data else DEFAULT_DATA
    model = fit_inflation(load_dataset(data), baseline=args.baseline, seed=args.seed,
                          test_fraction=args.test_fraction)
    model.info["data"] = str(data)
    if args.json:
        print(json.dumps(_clean(model.heldout), indent=2))
    else:
        _console().print(heldout_table(model))
    if args.out:
        print(f"saved {save_model(model, args.out)}", file=sys.stderr)
    return 0


def cli_main(args) -> int:
    from rkvsim.models.files import UnreadableFile

    handlers = {"report": cmd_report, "fit": cmd_fit}
    try:
        return handlers[args.lengths_cmd](args)
    except (UnreadableFile, FileNotFoundError) as e:   # a generation folder or file that cannot be read
        print(f"rkvsim lengths {args.lengths_cmd}: error: {e}", file=sys.stderr)
        return 2
