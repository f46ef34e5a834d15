"""Running llama.cpp's `llama-batched-bench` and reading its results.

One invocation times, for every (prompt tokens pp, generated tokens tg, parallel sequences
pl) of its lists: the prefill of pl prompts of pp tokens (t_pp) and tg decode steps of pl
sequences (t_tg). With `--output-format jsonl` (this version has it) each configuration is
one JSON line; the markdown table of older versions is parsed as a fallback.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from rkvsim.profiler.device import ProfilerError

# Fields every result needs, whichever format it came from.
RESULT_FIELDS = ("pp", "tg", "pl", "n_kv", "t_pp", "t_tg")


@dataclass(frozen=True)
class BenchSettings:
    ctx_size: int = 16384
    n_batch: int = 2048
    n_ubatch: int = 512
    threads: int = 1       # one thread: no per-step barrier for the host's noise to stretch
    flash_attn: str = "on"
    poll: int = 0          # --poll: 0 = threads sleep between tasks (see simulator/slots_config.py)
    pin: bool = True       # engine on the first `threads` cores, the rest left to the load generator

    def cores(self) -> tuple[int, ...]:
        from rkvsim.profiler.cpu_affinity import split
        return split(self.threads, self.pin).engine

    def args(self, kv_type: str) -> list[str]:
        return ["-c", str(self.ctx_size), "-b", str(self.n_batch), "-ub", str(self.n_ubatch),
                "-ctk", kv_type, "-ctv", kv_type, "-fa", self.flash_attn, "-t", str(self.threads),
                "-tb", str(self.threads), "--poll", str(self.poll), "-ngl", "0"]


def bench_command(binary: Path, gguf: Path, kv_type: str, pp: list[int], tg: list[int], pl: list[int],
                  settings: BenchSettings) -> list[str]:
    join = lambda xs: ",".join(str(x) for x in xs)  # noqa: E731
    return [str(binary), "-m", str(gguf), *settings.args(kv_type),
            "-npp", join(pp), "-ntg", join(tg), "-npl", join(pl), "--output-format", "jsonl"]


def parse_jsonl(text: str) -> list[dict]:
    """Result lines of `--output-format jsonl` (log lines in between are ignored)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if all(k in row for k in RESULT_FIELDS):
            out.append(row)
    return out


_TABLE_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|" + r"\s*([\d.]+)\s*\|" * 6 + r"\s*$")


def parse_table(text: str) -> list[dict]:
    """Rows of the markdown table: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |."""
    out = []
    for line in text.splitlines():
        m = _TABLE_ROW.match(line.strip())
        if m:
            pp, tg, pl, n_kv = (int(m.group(i)) for i in range(1, 5))
            t_pp, s_pp, t_tg, s_tg, t, s = (float(m.group(i)) for i in range(5, 11))
            out.append({"pp": pp, "tg": tg, "pl": pl, "n_kv": n_kv, "t_pp": t_pp, "speed_pp": s_pp,
                        "t_tg": t_tg, "speed_tg": s_tg, "t": t, "speed": s})
    return out


def parse_output(text: str) -> list[dict]:
    rows = parse_jsonl(text)
    return rows if rows else parse_table(text)


def run_bench(cmd: list[str], timeout_s: float = 900, cores: tuple[int, ...] = ()) -> tuple[list[dict], str]:
    """Run one invocation (pinned to `cores` if any); (parsed rows, raw output). Refuses an
    output with no results."""
    from rkvsim.profiler.cpu_affinity import preexec
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, preexec_fn=preexec(cores))
    except subprocess.TimeoutExpired:
        raise ProfilerError(f"llama-batched-bench ran past {timeout_s:.0f} s: {' '.join(cmd)}") from None
    text = proc.stdout + "\n" + proc.stderr
    if proc.returncode != 0:
        tail = " | ".join(text.strip().splitlines()[-3:])
        raise ProfilerError(f"llama-batched-bench failed (exit {proc.returncode}): {tail}")
    rows = parse_output(text)
    if not rows:
        raise ProfilerError("llama-batched-bench printed no results (context too small for the grid?)")
    return rows, text


def prefill_steps(pl: int, pp: int, n_batch: int) -> int:
    """llama_decode calls batched-bench makes for the prefill of pl prompts of pp tokens."""
    return max(1, math.ceil(pl * pp / n_batch))
