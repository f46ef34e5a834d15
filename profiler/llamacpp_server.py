"""Starting and always stopping a llama-server for one scenario's settings.

The server runs in its own process group on 127.0.0.1 and a free port. `running_server`
is a context manager: on normal exit, on an exception, on Ctrl-C (KeyboardInterrupt) and on
SIGTERM (turned into an exception while the server runs) the whole group gets SIGTERM, then
SIGKILL if it has not exited within a few seconds. Its log goes to a file beside the results.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


class ServerError(RuntimeError):
    """The server could not be started or answered wrongly; one line for the user."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_args(binary: Path, gguf: Path, kv_type: str, sched, port: int) -> list[str]:
    """llama-server's command line for a `scheduler: {kind: slots}` config and a KV type."""
    args = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-c", str(sched.ctx_size), "-np", str(sched.n_parallel), "-b", str(sched.n_batch),
            "-ub", str(sched.n_ubatch), "-ctk", kv_type, "-ctv", kv_type,
            "-fa", "on" if sched.flash_attn else "off", "-t", str(sched.threads), "-tb", str(sched.threads), "--poll", str(sched.poll),
            "-ngl", "0", "--kv-unified" if sched.kv_unified else "--no-kv-unified",
            # What the simulator does not model is switched off: the host-RAM prompt cache and
            # context checkpoints (both save slot state between requests), the web UI.
            "--cache-ram", "0", "--ctx-checkpoints", "0", "--no-webui", "--cont-batching"]
    return args


@dataclass
class Server:
    host: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 30) -> dict:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            text = resp.read().decode("utf-8", "replace")
            if resp.status != 200:
                raise ServerError(f"llama-server {method} {path} answered {resp.status}: {text[:200]}")
            return json.loads(text) if text else {}
        finally:
            conn.close()

    def tokenize(self, text: str) -> list[int]:
        return list(self.request("POST", "/tokenize", {"content": text, "add_special": False})["tokens"])

    def props(self) -> dict:
        return self.request("GET", "/props")

    def warm_up(self, n_slots: int, prompt: list[int], n_predict: int = 8) -> None:
        """One short request per slot, slot 0 first: the first requests of a run then pay no
        first-use costs, and the slots' LRU order is 0, 1, ... as the simulator assumes."""
        for slot in range(n_slots):
            self.request("POST", "/completion", {"prompt": prompt, "n_predict": n_predict, "ignore_eos": True,
                                                 "cache_prompt": False, "temperature": 0.0, "id_slot": slot},
                         timeout=300)


def _stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class _Terminated(Exception):
    pass


@contextlib.contextmanager
def running_server(args_without_port: callable, log_path: Path, start_timeout_s: float = 120,
                   cores: tuple[int, ...] = ()):
    """Start llama-server (args_without_port(port) -> argv; pinned to `cores` if any), wait
    until /health says ok, yield a Server, and stop the whole process group whatever happens."""
    from rkvsim.profiler.cpu_affinity import preexec
    port = free_port()
    argv = args_without_port(port)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=preexec(cores))   # own process group: killpg reaches all of it
    prev = None

    def on_term(_sig, _frame):
        raise _Terminated()

    try:
        if hasattr(signal, "SIGTERM"):
            try:
                prev = signal.signal(signal.SIGTERM, on_term)
            except ValueError:   # not the main thread: Ctrl-C handling still applies
                prev = None
        server = Server("127.0.0.1", port, proc, log_path)
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-3:])
                raise ServerError(f"llama-server exited with {proc.returncode} while starting: {tail}")
            try:
                if server.request("GET", "/health", timeout=2).get("status") == "ok":
                    break
            except (OSError, ServerError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"llama-server did not become healthy within {start_timeout_s:.0f} s; see {log_path}")
            time.sleep(0.2)
        yield server
    except _Terminated:
        raise KeyboardInterrupt("SIGTERM") from None
    finally:
        _stop(proc)
        log.close()
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)
