"""`rkvsim validate-transfer`: how far attention measured on one GPU and shape carries to another
(and, validation/gpu_transfer.py, how far dense operators carry to a GPU nobody profiled).

Both directions between the two attention tables measured for real: the paper's A6000 FP16 table
(LLaMA-2-7B, 32 query / 32 KV heads, TP 1) and Vidur's A100 table (LLaMA-2-70B at TP 2: 32 query /
4 KV heads per GPU). The source table is fitted as the simulator fits it (physics law x boosted
trees on the FLOP/byte features, calibration/steps/fit.py); every row of the other table is then
predicted as the simulator predicts it: the source fit at the source's head layout for the row's
batch and context, times the datasheet roofline of the row's work on its GPU over that of the
source layout's work on the source GPU (calibration/steps/compile.hw_scale). Printed per direction and stage: mean absolute
percentage error, its median and p90, over every row; the datasheet roofline alone beside it.

    rkvsim validate-transfer [--a6000 ../shared/data/rethink-kv/profiles/a6000]
                             [--a100 ../shared/data/vidur-profiles/older-a100] [--out DIR]
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_A6000 = SHARED / "rethink-kv" / "profiles" / "a6000"
DEFAULT_A100 = SHARED / "vidur-profiles" / "older-a100"


def load_table(folder: Path, model: str, suffix: str | None) -> pd.DataFrame:
    """One Vidur attention.csv as rkvprof attention rows (fp16)."""
    from rkvsim.models import resolve_model
    from rkvsim.profiler.vidur_import import Folder, convert_attention
    import pandas as pd     # here: `rkvsim` mounts this module's parser at every start

    path = folder / f"{suffix}" / "attention.csv" if suffix else folder / "attention.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no attention table; pass the folder with --a6000 / --a100")
    return convert_attention(pd.read_csv(path), Folder(path.parent, model, "fp16", "fp16", "fp16"),
                             resolve_model(model), f"vidur:{path.name}")


def _fit(rows: pd.DataFrame, stage: str):
    from rkvsim.calibration.steps.fit import attention_time, attention_work, fit_op
    from rkvsim.calibration.steps.features import DECODE_FEATURES, PREFILL_FEATURES
    g = rows[(rows["stage"] == stage) & (rows["time_s_median"] > 0)]
    feats = DECODE_FEATURES if stage == "decode" else PREFILL_FEATURES
    fam = "decode" if stage == "decode" else "prefill"
    return fit_op(fam, "fp16", "attention", attention_work(stage, "fp16", g, 2), attention_time(g), feats,
                  only=("physics+gbt",))


def carry(src: pd.DataFrame, src_hw, dst: pd.DataFrame, dst_hw) -> dict:
    from rkvsim.calibration.steps.compile import anchored, carry_time, hw_scale
    from rkvsim.calibration.steps.features import decode_work, prefill_work
    from rkvsim.calibration.steps.fit import attention_time
    from rkvsim.models import parse_method
    fp16 = parse_method("fp16")
    out = {}
    for stage in ("decode", "prefill"):
        f = _fit(src, stage)
        g = dst[(dst["stage"] == stage) & (dst["time_s_median"] > 0)]
        hq, hkv, d = (int(g[c].iloc[0]) for c in ("num_q_heads", "num_kv_heads", "head_dim"))
        if stage == "decode":
            def build(batch, ctx):
                c = np.asarray(ctx).round().astype(np.int64)
                return decode_work(fp16, batch, c, hq, hkv, d, prompt=c)
            inputs = {"batch": g["batch_size"].to_numpy(float), "ctx": g["kv_len"].to_numpy(float)}
        else:
            def build(tokens, past):
                return prefill_work(fp16, np.asarray(tokens).round().astype(np.int64),
                                    np.asarray(past).round().astype(np.int64), hq, hkv, d)
            inputs = {"tokens": g["new_tokens"].to_numpy(float), "past": g["kv_len"].to_numpy(float)}
        work = build(**inputs)
        s = src[src["stage"] == stage]
        shq, shkv, sd = (int(s[c].iloc[0]) for c in ("num_q_heads", "num_kv_heads", "head_dim"))
        if stage == "decode":
            def src_build(batch, ctx):
                c = np.asarray(ctx).round().astype(np.int64)
                return decode_work(fp16, batch, c, shq, shkv, sd, prompt=c)
        else:
            def src_build(tokens, past):
                return prefill_work(fp16, np.asarray(tokens).round().astype(np.int64),
                                    np.asarray(past).round().astype(np.int64), shq, shkv, sd)
        # As the simulator does (calibration/steps/compile._shape_carry): the source fit at its own
        # head layout, carried by the roofline of each shape's work on each GPU.
        pred = carry_time(f, anchored(f, src_build, False, **inputs), hw_scale(work, src_hw, dst_hw, src_build(**inputs)))
        roof = np.maximum(work["flops"] / dst_hw.dense_flops, work["kv_bytes"] / dst_hw.mem_bandwidth)
        y = attention_time(g)
        err = np.abs(pred - y) / y
        roof_err = np.abs(roof - y) / y
        out[stage] = {"rows": int(len(y)), "mape": float(err.mean()), "median_ape": float(np.median(err)),
                      "p90_ape": float(np.quantile(err, 0.9)), "bias": float(np.median(pred / y)),
                      "datasheet_roofline_mape": float(roof_err.mean())}
    return out


def run(a6000: Path = DEFAULT_A6000, a100: Path = DEFAULT_A100) -> dict:
    from rkvsim.models import resolve_hardware
    t6 = load_table(Path(a6000), "llama-2-7b", "Llama-2-7b-fp16")
    t1 = load_table(Path(a100), "llama-2-70b", None)
    h6, h1 = resolve_hardware("a6000"), resolve_hardware("a100-80g")
    return {"a6000 llama-2-7b tp1 -> a100 llama-2-70b tp2": carry(t6, h6, t1, h1),
            "a100 llama-2-70b tp2 -> a6000 llama-2-7b tp1": carry(t1, h1, t6, h6)}


def add_parser(sub) -> None:
    v = sub.add_parser("validate-transfer", help="carry measured attention across GPUs and shapes, both ways, "
                                                 "and score it against the other table")
    v.add_argument("--a6000", type=Path, default=DEFAULT_A6000, help="folder with Llama-2-7b-fp16/attention.csv")
    v.add_argument("--a100", type=Path, default=DEFAULT_A100, help="folder with Vidur's A100 attention.csv")
    v.add_argument("--out", type=Path, default=None, help="write attention_transfer.json here")
    v.add_argument("--trust-out", type=Path, default=None,
                   help="write the figures simulations quote as their trust (cost_trust) to this file, e.g. "
                        "calibration/data/trust/transfer.json (the shipped one)")
    v.set_defaults(func=cmd)


def cmd(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from rkvsim.models.files import write_json
    from rkvsim.validation import gpu_transfer
    try:
        res = run(args.a6000, args.a100)
    except FileNotFoundError as e:
        print(f"rkvsim: error: {e}")
        return 2
    dense = gpu_transfer.run(args.a6000)
    t = Table(title="attention carried across GPU and shape (every row of the other table)")
    for c in ("direction", "stage", "rows", "MAPE %", "median %", "p90 %", "median pred/meas", "datasheet roofline MAPE %"):
        t.add_column(c)
    for direction, st in res.items():
        for stage, r in st.items():
            t.add_row(direction, stage, str(r["rows"]), f"{100 * r['mape']:.1f}", f"{100 * r['median_ape']:.1f}",
                      f"{100 * r['p90_ape']:.1f}", f"{r['bias']:.2f}", f"{100 * r['datasheet_roofline_mape']:.1f}")
    Console().print(t)
    t = Table(title="dense operators carried to another GPU (step dense time, every shape the destination measured)")
    for c in ("to", "from", "points", "MAPE %", "median %", "p90 %"):
        t.add_column(c)
    for r in dense:
        via = r["from"] + (" (donor rule's pick)" if r["picked"] else "") if r["from"] != "prior" else "roofline prior"
        t.add_row(r["to"], via, str(r["points"]), f"{100 * r['mape']:.1f}", f"{100 * r['median_ape']:.1f}",
                  f"{100 * r['p90_ape']:.1f}")
    Console().print(t)
    if args.out:
        write_json(Path(args.out) / "attention_transfer.json", {**res, "dense_gpu_carry": dense})
    if args.trust_out:
        write_json(Path(args.trust_out), trust_document(res, dense, args.a6000, args.a100))
    return 0


def trust_document(attention: dict, dense: list, a6000: Path, a100: Path) -> dict:
    """What calibration/steps/trust.py reads: the checks, with where they came from."""
    import time

    from rkvsim.calibration.steps.trust import TRUST_SCHEMA
    return {"schema_version": TRUST_SCHEMA,
            "command": "rkvsim validate-transfer --trust-out calibration/data/trust/transfer.json",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "sources": {"a6000_attention": _rel(a6000), "a100_attention": _rel(a100),
                        "dense": "the shipped profiler/data/*/vidur imports, and the A6000's LLaMA-2-7B table"},
            "attention": attention, "dense_gpu_carry": dense}


def _rel(p: Path) -> str:
    """A source folder as the shared data names it (no machine's absolute path)."""
    parts = Path(p).resolve().parts
    return "/".join(parts[parts.index("shared"):]) if "shared" in parts else str(p)
