"""Measured tensor-parallel communication: all-reduce and send/recv time by message size and
workers, from Vidur's network tables (microsoft/vidur, MIT licence), and the lines shipped with
rkvsim (calibration/data/comm/vidur.json).

Each table holds repeated timings per (size in bytes, workers, devices per node). Only rows with
every worker on one node are kept (a TP group never spans nodes here). Per (host, collective,
workers) the medians are reduced to one time per size bin (a third of an octave); the simulator interpolates log time over
log size between measured sizes, clamps below the smallest (the latency floor) and extends past
the largest at the bandwidth of the last two points. An alpha-beta line (latency + size /
bandwidth, least squares on relative error) is fitted beside it, for reports.

    python -m rkvsim.calibration.steps.comm ../shared/data/vidur-profiles/network \
        --out calibration/data/comm/vidur.json

The product reads only the JSON (never ../shared); `lookup()` gives the curve for a host.
"""
from __future__ import annotations

import argparse
import math
from bisect import bisect_right
from functools import lru_cache
from pathlib import Path

import numpy as np

from rkvsim.calibration.steps import data_files
from rkvsim.models.files import sha256_file, write_json

COLLECTIVES = ("all_reduce", "send_recv")
BINS_PER_OCTAVE = 3


def _alpha_beta(size: np.ndarray, t: np.ndarray) -> tuple[float, float, float]:
    w = 1.0 / t
    A = np.c_[np.ones_like(size), size] * w[:, None]
    (a, b), *_ = np.linalg.lstsq(A, t * w, rcond=None)
    a, b = max(float(a), 0.0), max(float(b), 1e-18)
    pred = a + b * size
    return a, 1.0 / b, float(np.mean(np.abs(pred - t) / t))


def fit_table(csv: Path, collective: str) -> dict:
    import pandas as pd

    d = pd.read_csv(csv)
    d = d[d["devices_per_node"] == d["num_workers"]]
    col = f"time_stats.{collective}.median"
    out = {}
    for w, g in d.groupby("num_workers"):
        # Sizes binned at BINS_PER_OCTAVE per doubling (median size and time per bin): the
        # tables hold ~1,000 sizes with noisy neighbours, a curve needs a few dozen.
        lb = np.floor(np.log2(g["size"].to_numpy(np.float64)) * BINS_PER_OCTAVE)
        per = g.assign(_bin=lb).groupby("_bin").agg(size=("size", "median"), t=(col, "median")).sort_values("size")
        size = per["size"].to_numpy(np.float64)
        t = per["t"].to_numpy(np.float64) / 1e3
        lat, bw, err = _alpha_beta(size, t)
        # How well the binned curve reproduces every measured size's median (held in, a fit check).
        raw = g.groupby("size")[col].median() / 1e3
        curve = (tuple(np.log(size)), tuple(np.log(t)))
        pred = np.array([curve_time(curve, float(x)) for x in raw.index])
        out[str(int(w))] = {"size_bytes": size.tolist(), "time_s": t.tolist(), "rows": int(len(g)),
                            "alpha_s": lat, "bandwidth_Bps": bw, "alpha_beta_mape": err,
                            "curve_mape": float(np.mean(np.abs(pred - raw.to_numpy()) / raw.to_numpy()))}
    return out


def fit_folder(src: Path) -> dict:
    hosts, files = {}, {}
    for d in sorted(p for p in Path(src).iterdir() if p.is_dir()):
        for c in COLLECTIVES:
            f = d / f"{c}.csv"
            if f.exists():
                hosts.setdefault(d.name, {})[c] = fit_table(f, c)
                files[f"{d.name}/{c}.csv"] = sha256_file(f)
    return {"source": {"repository": "microsoft/vidur", "licence": "MIT", "files": files},
            "model": "time(size) = exp(interp(log size, log measured median)); beyond the largest size, "
                     "the last two points' bandwidth; below the smallest, its time",
            "hosts": hosts}


def packaged() -> Path:
    return data_files.packaged("comm", "vidur.json")


def _load(path: str) -> dict:
    return data_files.load(path, "communication fits (calibration/data/comm)")


@lru_cache(maxsize=64)
def lookup(network: str | None, workers: int, collective: str = "all_reduce"):
    """(log sizes, log times, source label) measured for this host, or None where the host or that
    worker count was not measured (the caller keeps its ring formula)."""
    if not network or workers <= 1:
        return None
    fits = _load(str(packaged()))["hosts"].get(network, {}).get(collective, {})
    f = fits.get(str(int(workers)))
    if f is None:
        return None
    return (tuple(np.log(f["size_bytes"]).tolist()), tuple(np.log(f["time_s"]).tolist()),
            f"measured({network} {collective} x{workers})")


def curve_time(curve, nbytes: float) -> float:
    """Seconds of one collective of `nbytes` on a measured curve (see the module docstring).
    Plain Python (bisect, math): the simulator calls it per distinct step size."""
    ls, lt = curve[0], curve[1]
    if nbytes <= 0:
        return 0.0
    x = math.log(nbytes)
    if x <= ls[0]:
        return math.exp(lt[0])
    if x >= ls[-1]:
        s1, s0, t1, t0 = math.exp(ls[-1]), math.exp(ls[-2]), math.exp(lt[-1]), math.exp(lt[-2])
        return t1 + (nbytes - s1) * max((t1 - t0) / (s1 - s0), 0.0)
    i = bisect_right(ls, x) - 1
    f = (x - ls[i]) / (ls[i + 1] - ls[i])
    return math.exp(lt[i] + f * (lt[i + 1] - lt[i]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="Vidur's network/ folder (one sub-folder per host)")
    ap.add_argument("--out", type=Path, default=packaged())
    a = ap.parse_args(argv)
    res = fit_folder(a.src)
    write_json(a.out, res)
    for host, cs in res["hosts"].items():
        for c, ws in cs.items():
            for w, f in ws.items():
                print(f"{host:22s} {c:10s} x{w}: {f['alpha_s'] * 1e6:7.1f} us + size / {f['bandwidth_Bps'] / 1e9:6.1f} GB/s "
                      f"(alpha-beta MAPE {f['alpha_beta_mape']:.1%}; curve MAPE {f['curve_mape']:.1%} over "
                      f"{f['rows']} rows, {len(f['size_bytes'])} bins)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
