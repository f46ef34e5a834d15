"""Response lengths of a real engine per KV type (measured, not forced): the verbosity data set.

    python -m rkvsim.validation.lengths_llamacpp --n 30 --out calibration/data/lengths-llamacpp

For each llama.cpp KV type (f16, q8_0, q4_0) a llama-server with that cache type answers the
same N ShareGPT first turns (calibration.generation.prompts: a seeded sample) through
/v1/chat/completions, the model's chat template applied by the server, temperature 1.0, EOS
allowed, at most --max-tokens new tokens, per-request seed = the prompt's index + --seed (the
same for every KV type, so only the cache differs). Rows go to part-0.jsonl in the format of
calibration.generation.store (one durable line per (prompt, KV type), `config` = the KV type), so
`rkvsim lengths report --data calibration/data/lengths-llamacpp --baseline f16` reads them.
Resumable: a rerun skips the rows already there.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

from rkvsim.calibration.generation.prompts import load_pairs, sample_prompts
from rkvsim.calibration.generation.store import RowWriter, load_rows, part_path
from rkvsim.models.files import write_json, write_jsonl
from rkvsim.profiler.engine_build import build_engine, cpu_name, find_engine
from rkvsim.profiler.engine_collect import KV_TYPES, model_gguf
from rkvsim.simulator.slots_config import SlotsSchedulerConfig

from rkvsim.profiler.llamacpp_server import running_server, server_args

SCHEMA = "rkvsim-lengths-v1"


def _chat(server, text: str, max_tokens: int, seed: int, temperature: float) -> dict:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": temperature, "top_p": 1.0, "seed": seed, "stream": False, "cache_prompt": False}
    return server.request("POST", "/v1/chat/completions", body, timeout=600)


def collect(n: int, out: Path, kv_types: list[str], seed: int = 0, max_tokens: int = 1024,
            temperature: float = 1.0, parallel: int = 4, threads: int = 2, say=print) -> int:
    eng = find_engine() or build_engine(say=say)
    gguf, sha = model_gguf("smollm2-135m")
    sched = SlotsSchedulerConfig(kind="slots", n_parallel=parallel, ctx_size=parallel * 2048, threads=threads)
    out.mkdir(parents=True, exist_ok=True)
    done, _bad = load_rows(out)
    pairs, pstats = load_pairs()
    written = 0
    prompts = None
    with RowWriter(part_path(out)) as writer:
        for kv in kv_types:
            with running_server(lambda port: server_args(eng.server, gguf, kv, sched, port),
                                Path(tempfile.gettempdir()) / f"rkvsim-lengths-server-{kv}.log") as server:
                if prompts is None:
                    # Raw-text token count for the length filter (the template adds a few tokens).
                    prompts, sstats = sample_prompts(pairs, n, server.tokenize, seed,
                                                     max_prompt_tokens=2048 - max_tokens - 64)
                    write_jsonl(out / "prompts.jsonl", [
                        {"prompt_id": p.prompt_id, "sharegpt_id": p.sharegpt_id, "text": p.text,
                         "raw_tokens": p.num_tokens} for p in prompts])
                todo_kv = [p for p in prompts if (p.prompt_id, kv) not in done]
                say(f"lengths: {kv}: {len(todo_kv)} of {len(prompts)} prompts to generate")
                lock = threading.Lock()
                queue = list(enumerate(todo_kv))

                def worker():
                    nonlocal written
                    while True:
                        with lock:
                            if not queue:
                                return
                            _, p = queue.pop(0)
                        idx = int(p.prompt_id.removeprefix("sg"))
                        t0 = time.perf_counter()
                        res = _chat(server, p.text, max_tokens, seed + idx, temperature)
                        ch = res["choices"][0]
                        usage = res.get("usage", {})
                        row = {"prompt_id": p.prompt_id, "config": kv, "sharegpt_id": p.sharegpt_id,
                               "method": f"llamacpp-{kv}", "engine": "llamacpp", "kv_type": kv,
                               "temperature": temperature, "top_p": 1.0, "seed": seed + idx,
                               "max_new_tokens": max_tokens, "prompt_tokens": int(usage.get("prompt_tokens", -1)),
                               "response_tokens": int(usage.get("completion_tokens", -1)),
                               "hit_cap": ch.get("finish_reason") == "length",
                               "finish_reason": ch.get("finish_reason"),
                               "wall_s": round(time.perf_counter() - t0, 3),
                               "response": (ch.get("message") or {}).get("content", "")}
                        with lock:
                            writer.append(row)
                            done[(p.prompt_id, kv)] = row
                            written += 1
                threads_ = [threading.Thread(target=worker, daemon=True) for _ in range(parallel)]
                for t in threads_:
                    t.start()
                for t in threads_:
                    t.join()
    meta = {"schema": SCHEMA, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": "python -m rkvsim.validation.lengths_llamacpp " + " ".join(sys.argv[1:]),
            "engine": "llamacpp", "engine_version": f"llama-cpp-python {eng.info['version']}",
            "llamacpp_commit": eng.info.get("llamacpp_commit"), "kv_types": kv_types, "seed": seed,
            "seed_mode": "per prompt: seed + ShareGPT record index, same for every KV type",
            "model": {"name": "SmolLM2-135M-Instruct", "file": gguf.name, "sha256": sha},
            "sampling": {"temperature": temperature, "top_p": 1.0, "max_tokens": max_tokens, "eos": "allowed"},
            "server": {"n_parallel": parallel, "ctx_size": sched.ctx_size, "threads": threads,
                       "endpoint": "/v1/chat/completions (server-side chat template)"},
            "cpu": cpu_name(), "n_prompts": n, "sharegpt": pstats}
    write_json(out / "meta.json", meta)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rkvsim.validation.lengths_llamacpp", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=30, help="ShareGPT prompts")
    p.add_argument("--out", type=Path, default=Path("calibration/data/lengths-llamacpp"))
    p.add_argument("--kv", default=",".join(KV_TYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=1.0)
    args = p.parse_args(argv)
    kv = [k for k in args.kv.split(",") if k]
    bad = [k for k in kv if k not in KV_TYPES]
    if bad:
        print(f"error: --kv {bad}: use some of {','.join(KV_TYPES)}", file=sys.stderr)
        return 2
    n = collect(args.n, args.out, kv, args.seed, args.max_tokens, args.temperature)
    rows, _ = load_rows(args.out)
    by = {}
    for (_pid, cfg), r in rows.items():
        by.setdefault(cfg, []).append(r["response_tokens"])
    for cfg, xs in sorted(by.items()):
        xs = sorted(xs)
        print(f"{cfg:5s} {len(xs)} responses, mean {sum(xs) / len(xs):.0f} tokens, median {xs[len(xs) // 2]}")
    print(f"wrote {n} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

