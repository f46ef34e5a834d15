"""Where a sweep's rows live: one Parquet part per finished (point, seed), written atomically as
it finishes, so a killed sweep keeps every finished point and a resumed one redoes none.

    OUT/sweep.json            what sweep this folder holds (its fingerprint); resume checks it
    OUT/parts/p00012-<key>-s1.parquet
    OUT/rows.parquet          every part, one tidy row per (point, set-up, seed), sorted
"""
from __future__ import annotations

import json
from pathlib import Path

from rkvsim.models.files import atomic_path, read_json
from rkvsim.simulator.config import ScenarioError

from rkvsim.planning.spec import Point, Sweep

STORE_VERSION = 1


def part_name(point: Point, seed: int) -> str:
    return f"p{point.index:05d}-{point.key}-s{seed}.parquet"


class Store:
    def __init__(self, out: Path, sweep: Sweep):
        self.out = Path(out)
        self.parts = self.out / "parts"
        meta = self.out / "sweep.json"
        if meta.is_file():
            old = read_json(meta, "sweep record")
            if old.get("fingerprint") != sweep.fingerprint:
                raise ScenarioError(f"--out {self.out}: holds another sweep ({old.get('name')}, fingerprint "
                                    f"{old.get('fingerprint')}); pick another --out or delete that folder")
        else:
            body = json.dumps({"store_version": STORE_VERSION, "name": sweep.name, "fingerprint": sweep.fingerprint,
                               "points": len(sweep.points), "seeds": sweep.seeds,
                               "axes": list(sweep.axes)}, indent=2).encode()
            atomic_path(meta, lambda tmp: Path(tmp).write_bytes(body))
        self.parts.mkdir(parents=True, exist_ok=True)
        for stale in self.parts.glob(".*.tmp"):  # a write cut short by a kill
            stale.unlink(missing_ok=True)

    def done(self) -> set[str]:
        return {p.name for p in self.parts.glob("p*.parquet")}

    def write_part(self, point: Point, seed: int, rows: list[dict]) -> None:
        import pandas as pd
        df = pd.DataFrame(rows)
        atomic_path(self.parts / part_name(point, seed), lambda tmp: df.to_parquet(tmp, index=False))

    def consolidate(self, sweep: Sweep):
        """Every part of this sweep as one frame, sorted; written to rows.parquet."""
        import pandas as pd
        names = {part_name(pt, s) for pt, s in sweep.tasks}
        frames = [pd.read_parquet(p) for p in sorted(self.parts.glob("p*.parquet")) if p.name in names]
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if len(df):
            for col in df.columns:
                if df[col].dtype == object and df[col].map(type).nunique() > 1:
                    df[col] = df[col].astype(str)  # an axis mixing numbers and words
            df = df.sort_values(["point", "seed", "method"], kind="stable").reset_index(drop=True)
        atomic_path(self.out / "rows.parquet", lambda tmp: df.to_parquet(tmp, index=False))
        return df
