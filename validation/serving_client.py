"""Replaying a workload against a running llama-server and timing every streamed token.

Each request is one POST /completion with the prompt as token ids (so its length is exact),
`n_predict` = the sampled output length and `ignore_eos` (so the output length is exact too),
`stream: true`. Every server-sent event carries `tokens_predicted`, so the time each token
arrived is known even when a chunk holds several (an incomplete UTF-8 character is held
back by the server). Open loop: one thread per request, started at its arrival time. Closed
loop: `concurrency` workers, each sending its next request `think_time_s` after the last
finished. Threads and http.client only: no extra dependency.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Measured:
    rid: int
    prompt: int
    output: int
    sent: float = float("nan")          # seconds since the replay started
    first_token: float = float("nan")
    finish: float = float("nan")
    received: int = 0                   # tokens the server said it produced
    token_times: list = field(default_factory=list)   # arrival time of each token (chunked tokens share one)
    prompt_ms: float = float("nan")     # server-side prompt processing (final timings)
    prompt_n: int = -1                  # prompt tokens the server evaluated
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.received == self.output and np.isfinite(self.finish)


def _stream(host: str, port: int, body: dict, m: Measured, t0: float, timeout_s: float) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        m.sent = time.perf_counter() - t0
        conn.request("POST", "/completion", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            m.error = f"HTTP {resp.status}: {resp.read()[:200].decode('utf-8', 'replace')}"
            return
        while True:
            line = resp.readline()
            if not line:
                break
            now = time.perf_counter() - t0
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            ev = json.loads(payload)
            if "error" in ev:
                m.error = str(ev["error"])[:200]
                return
            n = int(ev.get("tokens_predicted", m.received))
            if n > m.received:
                if m.received == 0:
                    m.first_token = now
                m.token_times.extend([now] * (n - m.received))
                m.received = n
            if ev.get("stop"):
                timings = ev.get("timings") or {}
                m.prompt_ms = float(timings.get("prompt_ms", float("nan")))
                m.prompt_n = int(ev.get("tokens_evaluated", -1))
                m.finish = now
                break
    except (OSError, http.client.HTTPException, ValueError) as e:
        m.error = f"{type(e).__name__}: {e}"[:200]
    finally:
        conn.close()


def completion_body(prompt_ids: list[int], n_predict: int) -> dict:
    # Greedy sampling: with ignore_eos and n_predict the length is forced, so the sampler only
    # costs time; greedy keeps that cost small and the same for every KV type.
    return {"prompt": prompt_ids, "n_predict": int(n_predict), "ignore_eos": True, "stream": True,
            "cache_prompt": False, "temperature": 0.0}


def replay(host: str, port: int, prompts: list[list[int]], outputs: np.ndarray, arrivals: np.ndarray | None,
           concurrency: int = 0, think_time_s: float = 0.0, deadline_s: float = 600.0,
           request_timeout_s: float = 300.0, on_done=None) -> tuple[list[Measured], float]:
    """Send every request; returns (per-request measurements, wall seconds). Requests not
    finished by `deadline_s` are left with an error (the caller stops the server)."""
    n = len(prompts)
    ms = [Measured(i, len(prompts[i]), int(outputs[i])) for i in range(n)]
    t0 = time.perf_counter()
    threads: list[threading.Thread] = []
    stop = threading.Event()

    def one(i: int) -> None:
        _stream(host, port, completion_body(prompts[i], int(outputs[i])), ms[i], t0, request_timeout_s)
        if on_done:
            on_done(ms[i])

    if arrivals is not None:
        def dispatch():
            for i, t in enumerate(arrivals.tolist()):
                delay = t - (time.perf_counter() - t0)
                if delay > 0 and stop.wait(delay):
                    return
                th = threading.Thread(target=one, args=(i,), daemon=True)
                th.start()
                threads.append(th)
        disp = threading.Thread(target=dispatch, daemon=True)
        disp.start()
        disp.join(deadline_s)
    else:
        nxt = iter(range(n))
        lock = threading.Lock()

        def worker():
            while not stop.is_set():
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                one(i)
                if think_time_s and stop.wait(think_time_s):
                    return
        for _ in range(max(1, min(concurrency, n))):
            th = threading.Thread(target=worker, daemon=True)
            th.start()
            threads.append(th)
    end = t0 + deadline_s
    for th in list(threads):
        th.join(max(0.0, end - time.perf_counter()))
    stop.set()
    wall = time.perf_counter() - t0
    for m in ms:
        if m.error is None and not m.ok:
            m.error = "not finished before the deadline" if not np.isfinite(m.finish) else \
                f"received {m.received} of {m.output} tokens"
    return ms, wall
