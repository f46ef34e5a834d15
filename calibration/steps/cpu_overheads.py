"""Per-step CPU time of a serving engine, fitted by batch size on measured tables, and the fitted
lines shipped with rkvsim (calibration/data/cpu_overheads/vidur.json).

The tables are Vidur's (microsoft/vidur, MIT licence: `cpu_overheads*.csv`, measured on vLLM's
V0 engine on an A100 host and an A40 host): per step, the scheduler, input preparation, the sampler
(launch to result) and output processing, in ms, by batch size, model and TP degree. Two sums are
fitted as `a + b * batch` per host and TP degree (least squares on the medians):
- `v0`: all four (vLLM V0 does them in the step loop);
- `v1`: input preparation and the sampler only. V1 moved output processing (detokenising,
  streaming) into its front-end process, overlapped with the next step (vllm/v1/engine/async_llm.py
  output handler), and rewrote the scheduler around per-request token counts
  (vllm/v1/core/sched/scheduler.py): V0's scheduler time, which grows 15 us per sequence in these
  tables, is not V1's, and no table here measures V1's, so it is left out rather than guessed.

    python -m rkvsim.calibration.steps.cpu_overheads ../shared/data/vidur-profiles/older-a100 \
        --out calibration/data/cpu_overheads/vidur.json

The product reads only the JSON (never ../shared); `lookup()` gives the line for a host and TP.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from rkvsim.calibration.steps import data_files
from rkvsim.models.files import sha256_file, write_json

TABLES = {"a100": "cpu_overheads.csv", "a40": "cpu_overheads_a40.csv"}
PARTS = {"v0": ("schedule", "prepare_inputs_e2e", "sampler_e2e", "process_model_outputs"),
         "v1": ("prepare_inputs_e2e", "sampler_e2e")}
# Which measured host stands for a GPU: datacenter parts with NVLink hosts -> the A100 host;
# PCIe workstation and inference cards -> the A40 host.
HOST_OF = {"a100-40g": "a100", "a100-80g": "a100", "h100-sxm": "a100", "h200": "a100",
           "a40": "a40", "a6000": "a40", "l40s": "a40", "l4": "a40", "rtx-4090": "a40"}


def fit_table(csv: Path) -> dict:
    import pandas as pd

    d = pd.read_csv(csv)
    out = {}
    for tp, g in d.groupby("tensor_parallel_degree"):
        A = np.c_[np.ones(len(g)), g["batch_size"].to_numpy(float)]
        fits = {}
        for name, parts in PARTS.items():
            y = sum(g[f"{p}_median"].to_numpy(float) for p in parts)
            (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
            pred = A @ np.array([a, b])
            fits[name] = {"fixed_ms": float(a), "per_seq_ms": float(b),
                          "mape": float(np.mean(np.abs(pred - y) / y)), "rows": int(len(g)),
                          "batch_range": [int(g["batch_size"].min()), int(g["batch_size"].max())]}
        out[str(int(tp))] = fits
    return out


def fit_folder(src: Path) -> dict:
    return {"source": {"repository": "microsoft/vidur", "licence": "MIT", "engine": "vLLM V0",
                       "files": {host: {"name": f, "sha256": sha256_file(src / f)} for host, f in TABLES.items()}},
            "model": "seconds = (fixed_ms + per_seq_ms * batch) / 1000, least squares on the medians",
            "hosts": {host: fit_table(src / f) for host, f in TABLES.items()}}


def packaged() -> Path:
    return data_files.packaged("cpu_overheads", "vidur.json")


def _load(path: str) -> dict:
    return data_files.load(path, "CPU-overhead fits (calibration/data/cpu_overheads)")


def line(hardware: str, tp: int, engine: str) -> tuple[dict, str, int] | None:
    """The fitted line (fixed_ms, per_seq_ms, its MAPE on the medians, rows) standing for this GPU's
    host, TP degree (the nearest measured) and engine generation, with the host and that TP."""
    host = HOST_OF.get(hardware)
    if host is None:
        return None
    fits = _load(str(packaged()))["hosts"][host]
    tps = sorted(int(t) for t in fits)
    t = min(tps, key=lambda x: (abs(x - tp), x))
    return fits[str(t)][engine], host, t


def lookup(hardware: str, tp: int, engine: str) -> tuple[float, float, str] | None:
    """(fixed seconds, seconds per sequence, source label) per step for this GPU's host, TP degree
    and engine generation ("v0" or "v1"), or None where no measured host stands for the GPU."""
    hit = line(hardware, tp, engine)
    if hit is None:
        return None
    f, host, t = hit
    return f["fixed_ms"] / 1e3, f["per_seq_ms"] / 1e3, f"measured(vidur {host} host, tp{t})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="folder with cpu_overheads.csv and cpu_overheads_a40.csv")
    ap.add_argument("--out", type=Path, default=packaged())
    a = ap.parse_args(argv)
    res = fit_folder(a.src)
    write_json(a.out, res)
    for host, fits in res["hosts"].items():
        for tp, f in fits.items():
            print(host, f"tp{tp}", {k: f"{v['fixed_ms']:.3f} + {v['per_seq_ms']:.4f}*bs ms (MAPE {v['mape']:.1%})"
                                    for k, v in f.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
