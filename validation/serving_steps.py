"""The real server's iterations, rebuilt from streamed token times, against the step cost model.

A llama-server iteration samples one token for every generating slot and streams them all at
once, so the token arrival times of a replay (tokens_measured.json, written by
validate-serving) fall into tight clusters, one per iteration. Between two clusters lies one
iteration's wall time. Its batch is known from the requests' own records: every request that
had received its first token and still had tokens to come fed one decode token (its context is
prompt + tokens so far), and a request whose first token is in the cluster had its prompt
processed in it (prompts here fit one n_batch, so a prompt is one chunk).

This is what tells a latency error apart by cause: a cost model that is right per step but
wrong per request is a scheduling error; one that is wrong on steps of a given shape is a cost
error, and the shape says which.

    python -m rkvsim.validation.serving_steps RUN_DIR [--gap-ms 4]
"""
from __future__ import annotations

import argparse
import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rkvsim.simulator.cost_model import StepBatch
from rkvsim.models.files import read_json

_EMPTY = np.zeros(0, np.int64)


@dataclass
class Iteration:
    end: float                 # when its tokens arrived (first of the cluster)
    wall: float                # since the previous cluster, or since the arrival that woke an idle server
    decode_ctx: np.ndarray     # context of each decode token fed
    prefill: np.ndarray        # prompt lengths processed whole in it
    decode_seq: np.ndarray | None = None    # server slots, when the server log told them
    prefill_seq: np.ndarray | None = None

    @property
    def batch(self) -> StepBatch:
        n = len(self.prefill)
        return StepBatch(prefill_new=self.prefill if n else _EMPTY, prefill_past=np.zeros(n, np.int64) if n else _EMPTY,
                         prefill_done=np.ones(n, bool) if n else None,
                         decode_ctx=self.decode_ctx, decode_prompt=self.decode_ctx,
                         decode_seq=self.decode_seq, prefill_seq=self.prefill_seq)


def read_run(run_dir: Path) -> tuple[list[dict], dict[int, list[float]]]:
    with open(run_dir / "requests_measured.csv", newline="") as f:
        reqs = [r for r in csv.DictReader(f) if not r["error"]]
    tokens = read_json(run_dir / "tokens_measured.json", "measured token times")["requests"]
    return reqs, {int(k): v for k, v in tokens.items()}


_LAUNCH = re.compile(r"launch_slot_: id\s+(\d+) \| task (\d+)")
_PROMPT = re.compile(r"id\s+\d+ \| task (\d+) \| prompt eval time =\s+[\d.]+ ms /\s+(\d+) tokens")


def slots_from_log(log_path: Path, reqs: list[dict], skip: int = 0) -> dict[int, int]:
    """Request id -> the server slot (llama.cpp sequence id) it ran in, from the server's log:
    tasks are launched in the order requests reached the server, and each task's logged prompt
    length must match the request it is paired with. The first `skip` tasks (validate-serving's
    warm-up requests) are not the workload's."""
    if not log_path.is_file():
        return {}
    slot_of_task: dict[int, int] = {}
    prompt_of_task: dict[int, int] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        if m := _LAUNCH.search(line):
            slot_of_task[int(m.group(2))] = int(m.group(1))
        elif m := _PROMPT.search(line):
            prompt_of_task[int(m.group(1))] = int(m.group(2))
    tasks = [t for t in sorted(slot_of_task) if t in prompt_of_task][skip:]
    out: dict[int, int] = {}
    used: set[int] = set()
    for r in sorted(reqs, key=lambda r: float(r["sent_s"])):
        p = int(r["prompt_tokens"])
        # The first unclaimed task of this prompt length (requests that reach the server at
        # nearly the same time may be launched in either order).
        t = next((t for t in tasks if t not in used and prompt_of_task[t] == p), None)
        if t is not None:
            used.add(t)
            out[int(r["request_id"])] = slot_of_task[t]
    return out


def iterations(reqs: list[dict], tokens: dict[int, list[float]], gap_s: float = 0.004,
               slots: dict[int, int] | None = None) -> list[Iteration]:
    """One Iteration per cluster of token arrivals (clusters: gaps below gap_s); with `slots`
    (request -> server slot) the batches carry sequence ids, so they are cut into ubatches as
    the server cut them."""
    events = sorted((t, int(r["request_id"]), k) for r in reqs for k, t in enumerate(tokens[int(r["request_id"])]))
    if not events:
        return []
    prompt = {int(r["request_id"]): int(r["prompt_tokens"]) for r in reqs}
    sent = {int(r["request_id"]): float(r["sent_s"]) for r in reqs}
    first = {rid: ts[0] for rid, ts in tokens.items() if ts and rid in prompt}
    last = {rid: ts[-1] for rid, ts in tokens.items() if ts and rid in prompt}
    clusters: list[list[tuple[float, int, int]]] = [[events[0]]]
    for ev in events[1:]:
        if ev[0] - clusters[-1][-1][0] < gap_s:
            clusters[-1].append(ev)
        else:
            clusters.append([ev])
    out: list[Iteration] = []
    prev_end = None
    for cl in clusters:
        end = cl[0][0]
        dec = [(rid, k) for _, rid, k in cl if k > 0]
        pre = [rid for _, rid, k in cl if k == 0]
        # The server was idle before this iteration when nothing was in flight at the previous
        # cluster: the iteration then began at the latest arrival that woke it.
        busy_before = prev_end is not None and any(first[r] <= prev_end < last[r] or sent[r] <= prev_end < first[r]
                                                   for r in prompt if r in first)
        start = prev_end if busy_before else max([sent[r] for r in pre] or [prev_end or 0.0])
        # A request whose token k arrives here fed token k-1 back: context prompt + k.
        known = slots is not None and all(r in slots for r, _ in dec) and all(r in slots for r in pre)
        out.append(Iteration(end=end, wall=end - start,
                             decode_ctx=np.array([prompt[r] + k for r, k in dec], np.int64),
                             prefill=np.array([prompt[r] for r in pre], np.int64),
                             decode_seq=np.array([slots[r] for r, _ in dec], np.int64) if known else None,
                             prefill_seq=np.array([slots[r] for r in pre], np.int64) if known else None))
        prev_end = end
    return out


def compare(its: list[Iteration], cost) -> list[dict]:
    """Measured vs modelled seconds per iteration shape (decode batch, prefill or not)."""
    groups: dict[tuple[int, bool], list[tuple[float, float]]] = {}
    for it in its:
        groups.setdefault((len(it.decode_ctx), len(it.prefill) > 0), []).append((it.wall, cost.step_time(it.batch)))
    rows = []
    for (nd, pre), v in sorted(groups.items()):
        m, p = np.array(v).T
        rows.append({"decode": nd, "prefill": pre, "iterations": len(v), "measured_s": float(m.sum()),
                     "model_s": float(p.sum()), "error_pct": 100.0 * (p.sum() - m.sum()) / m.sum(),
                     "measured_median_ms": 1e3 * float(np.median(m)), "model_median_ms": 1e3 * float(np.median(p))})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--gap-ms", type=float, default=4.0)
    args = ap.parse_args(argv)
    from rkvsim.models.methods import parse_method
    from rkvsim.simulator.llamacpp_cost import LlamaCppCostModel, read_engine_profile
    res = read_json(args.run_dir / "validation_serving.json", "validate-serving result")
    meta, rows = read_engine_profile(res["engine_profile"])
    sched = res["server_settings"]
    cost = LlamaCppCostModel(meta, rows, parse_method(res["method"]), n_ubatch=sched["n_ubatch"],
                           streams=1 if sched["kv_unified"] else sched["n_parallel"])
    reqs, tokens = read_run(args.run_dir)
    slots = slots_from_log(args.run_dir / "server.log", reqs, skip=int(res.get("warm_up_requests", 0)))
    its = iterations(reqs, tokens, gap_s=args.gap_ms / 1e3, slots=slots)
    print(f"{len(its)} iterations, {sum(i.wall for i in its):.2f} s busy; server slots known for "
          f"{len(slots)} of {len(reqs)} requests")
    for r in compare(its, cost):
        print(f"decode {r['decode']} prefill {'y' if r['prefill'] else 'n'}: n={r['iterations']:4d} "
              f"measured {r['measured_s']:7.2f} s model {r['model_s']:7.2f} s ({r['error_pct']:+6.1f}%)  "
              f"median {r['measured_median_ms']:7.1f} / {r['model_median_ms']:7.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
