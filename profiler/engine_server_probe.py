"""What llama-server adds around each llama_decode: a probe of the server's own decode steps.

batched-bench times llama_decode alone. A server iteration also samples a token for every
generating slot and streams it over HTTP, which costs time the bench never sees. The probe
starts llama-server with the profile's settings and, for c = 1 .. max(batch sizes) concurrent
requests of a fixed synthetic shape (PROMPT_TOKENS token ids, GEN_TOKENS forced new tokens,
greedy, streamed), records the median gap between streamed tokens: the server's time per
decode iteration at batch c. These become `server_decode` rows of the engine table; the
simulator's engine cost model (simulator/llamacpp_cost.py) takes the part of them the bench
model does not explain as a per-iteration and per-sequence overhead. The probe is part of
profiling the engine: it uses none of a validation workload's requests.
"""
from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from pathlib import Path

from rkvsim.profiler.device import ProfilerError

PROMPT_TOKENS = 128
GEN_TOKENS = 96
PROBE_BATCHES = (1, 2, 4)


def _server_args(binary: Path, gguf: Path, kv: str, settings, n_parallel: int, port: int) -> list[str]:
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-c", str(n_parallel * (PROMPT_TOKENS + GEN_TOKENS + 64)), "-np", str(n_parallel),
            "-b", str(settings.n_batch), "-ub", str(settings.n_ubatch), "-ctk", kv, "-ctv", kv,
            "-fa", settings.flash_attn, "-t", str(settings.threads), "-tb", str(settings.threads), "--poll", str(settings.poll), "-ngl", "0",
            "--no-kv-unified", "--cache-ram", "0", "--ctx-checkpoints", "0", "--no-webui"]


def _one(port: int, i: int, gaps: list, errors: list) -> None:
    # Distinct prompts (no prompt-cache reuse), all inside SmolLM2's vocabulary.
    body = {"prompt": [1000 + (37 * i + k) % 30000 for k in range(PROMPT_TOKENS)], "n_predict": GEN_TOKENS,
            "ignore_eos": True, "stream": True, "cache_prompt": False, "temperature": 0.0}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/completion", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        times, seen = [], 0
        while True:
            line = resp.readline()
            if not line:
                break
            if not line.startswith(b"data:"):
                continue
            ev = json.loads(line[5:])
            n = int(ev.get("tokens_predicted", seen))
            if n > seen:
                times.extend([time.perf_counter()] * (n - seen))
                seen = n
            if ev.get("stop"):
                break
        # Steady state only: skip the first gaps (other requests may still be prefilling).
        d = [b - a for a, b in zip(times[8:], times[9:])]
        gaps.append(statistics.median(d) if d else float("nan"))
    except (OSError, ValueError, http.client.HTTPException) as e:
        errors.append(str(e))
    finally:
        conn.close()


def probe(binary: Path, gguf: Path, kv: str, settings, batches=PROBE_BATCHES, repeats: int = 3) -> dict[int, list[float]]:
    """{c: [median token gap of each repeat]} for every concurrency c."""
    from rkvsim.profiler.llamacpp_server import running_server   # the one place servers are started/stopped

    out: dict[int, list[float]] = {c: [] for c in batches}
    log = Path("/tmp") / f"rkvprof-probe-{kv}-{time.time_ns()}.log"
    with running_server(lambda port: _server_args(binary, gguf, kv, settings, max(batches), port), log,
                        cores=settings.cores()) as srv:
        for _ in range(repeats):
            for c in batches:
                gaps: list[float] = []
                errors: list[str] = []
                ths = [threading.Thread(target=_one, args=(srv.port, i, gaps, errors)) for i in range(c)]
                for t in ths:
                    t.start()
                for t in ths:
                    t.join()
                if errors:
                    raise ProfilerError(f"llama-server probe failed: {errors[0]}")
                out[c].append(statistics.median(gaps))
    log.unlink(missing_ok=True)
    return out
