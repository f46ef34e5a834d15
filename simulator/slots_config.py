"""`scheduler: {kind: slots, ...}`: a llama.cpp-server-style replica (fixed slots).

    scheduler:
      kind: slots          # llama.cpp server (tools/server): -np slots, each with its own context
      n_parallel: 4        # -np: requests served at once; the rest wait in a FIFO queue
      ctx_size: 8192       # -c: KV cells in total; per slot ctx_size / n_parallel unless kv_unified
      n_batch: 2048        # -b: most tokens (decodes first, then prompt chunks) in one iteration
      n_ubatch: 512        # -ub: physical batch llama.cpp splits an iteration into
      kv_unified: false    # --kv-unified: every slot may use the whole context (shared cells)
      threads: 1           # -t, used when a real server is started (validate-serving)
      pin: true            # real server on the first `threads` cores, the load generator on the rest
      flash_attn: true     # -fa on|off
      poll: 0              # --poll: 0 = idle worker threads sleep instead of spinning

The methods of such a scenario are llama.cpp KV types (f16, q8_0, q4_0), the step cost comes
from an engine profile (rkvprof collect --engine llamacpp), and TP is 1.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rkvsim.models.methods import ENGINE_KV, kinds


class SlotsSchedulerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["slots"] = "slots"
    policy: Literal["llamacpp"] = "llamacpp"   # the scheduler by name, as scheduler.policy elsewhere
    engine: Literal["llamacpp"] = "llamacpp"
    n_parallel: int = Field(4, ge=1, description="server slots (-np)")
    ctx_size: int = Field(8192, ge=64, description="total KV cells (-c)")
    n_batch: int = Field(2048, ge=1, description="logical batch (-b): most tokens per iteration")
    n_ubatch: int = Field(512, ge=1, description="physical batch (-ub)")
    kv_unified: bool = False
    # One thread by default: with two, llama.cpp's threads meet at a barrier hundreds of times
    # per step, so any other process on a small host (the load generator too) stretches steps.
    threads: int = Field(1, ge=1, description="-t for a real server")
    pin: bool = Field(True, description="pin a real server to its cores and the load generator to the others")
    flash_attn: bool = True
    # llama.cpp's default (50) spins waiting threads; on a shared 2-core host a spinning thread
    # steals the core its partner needs and steps get several times slower. The engine
    # profile is collected with the same value.
    poll: int = Field(0, ge=0, le=100, description="--poll of the real server")

    @model_validator(mode="after")
    def _sizes(self):
        if self.ctx_slot < 16:
            raise ValueError(f"ctx_size {self.ctx_size} over n_parallel {self.n_parallel} slots leaves "
                             f"{self.ctx_slot} tokens per slot; raise scheduler.ctx_size or lower n_parallel")
        if self.n_ubatch > self.n_batch:
            raise ValueError(f"n_ubatch ({self.n_ubatch}) is larger than n_batch ({self.n_batch}); "
                             "llama.cpp needs n_ubatch <= n_batch")
        return self

    @property
    def ctx_slot(self) -> int:
        """Context one slot can hold (llama.cpp's n_ctx_slot)."""
        return self.ctx_size if self.kv_unified else self.ctx_size // self.n_parallel

    @property
    def step_tokens(self) -> int:
        """Most tokens in one iteration: the server sizes its batch max(n_batch, n_parallel)."""
        return max(self.n_batch, self.n_parallel)


def scheduler_kind(v) -> str:
    """Pydantic discriminator: scenarios written before `kind` existed are paged; `policy: llamacpp`
    names llama.cpp's slots like the paged policies are named."""
    if isinstance(v, dict):
        return v.get("kind") or ("slots" if v.get("policy") == "llamacpp" else "paged")
    return getattr(v, "kind", "paged")


def check_slots(scn) -> None:
    """Scenario-level rules of a slots scheduler (a llama.cpp server)."""
    bad = [m.label for m in scn.method_list if m.family != ENGINE_KV]
    if bad:
        raise ValueError(f"methods {bad}: a slots (llama.cpp) scheduler takes llama.cpp KV types; "
                         f"use some of {', '.join(kinds(ENGINE_KV))}")
    if scn.tp_list != [1]:
        raise ValueError("tp: a slots (llama.cpp server) scheduler runs one process per replica; set tp: 1")
