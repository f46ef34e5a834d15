"""Scenario sections for mixed fleets and routing experiments (pure pydantic, no simulation).

    fleet:                          # replicas with their own methods; default: `replicas` x each method
      - {method: fp16, replicas: 1}
      - {replicas: 3}               # no method: the method being compared (each of `methods:` in turn)
    arms:                           # several (router, fleet, scheduler) set-ups compared on the same workload
      - {name: baseline, router: least_kv}                 # no fleet: `fleet:` or `replicas` x method
      - {name: routed, router: compression_aware, fleet: [{method: fp16, replicas: 1}, {replicas: 3}]}
    routing:
      length_predictor: default     # 'default' (written by `rkvsim lengths train`), a path, or 'workload_mean'

A scenario without these sections means exactly what it meant before.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RouterName = Literal["round_robin", "least_outstanding", "least_kv", "compression_aware", "oracle"]
# Policies that need per-request length predictions computed before the simulation starts.
PREDICTIVE = ("compression_aware", "oracle")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FleetEntry(_Strict):
    method: str | dict | None = Field(None, description="this group's method; omitted: the method being compared")
    replicas: int = Field(1, ge=1, description="replicas in this group")
    tp: int | None = Field(None, ge=1, description="tensor-parallel degree of this group; default: the scenario's")


class Arm(_Strict):
    name: str = Field(min_length=1, description="label suffix, e.g. baseline / routed / oracle")
    router: RouterName | None = Field(None, description="default: the scenario's router")
    fleet: list[FleetEntry] | None = Field(None, description="default: the scenario's fleet")
    scheduler: dict | None = Field(None, description="scheduler fields this arm changes, e.g. "
                                                     "{enable_prefix_caching: false}")


class RoutingConfig(_Strict):
    length_predictor: str = Field(
        "default", description="'default' (the artifact `rkvsim lengths train` writes), a .joblib path, or "
                               "'workload_mean' (every request predicted at the workload's mean length)")


def check_fleets(scn) -> None:
    """Raises ValueError naming the field when a fleet or arm cannot be built."""
    from rkvsim.models import method_from_entry, resolve_hardware, resolve_model

    m = resolve_model(scn.model)
    if getattr(scn.scheduler, "kind", "paged") != "paged" and (scn.fleet or scn.arms or scn.router in PREDICTIVE):
        where = "fleet" if scn.fleet else ("arms" if scn.arms else "router")
        raise ValueError(f"{where}: mixed fleets, arms and predictive routers run on the paged scheduler; "
                         "remove it or set scheduler.kind: paged")

    fleets = [("fleet", scn.fleet)] + [(f"arms.{i}.fleet", a.fleet) for i, a in enumerate(scn.arms or [])]
    for where, fleet in fleets:
        if fleet is None:
            continue
        if not fleet:
            raise ValueError(f"{where}: list at least one group, e.g. [{{method: fp16, replicas: 1}}, {{replicas: 3}}]")
        for j, e in enumerate(fleet):
            if e.method is not None:
                method_from_entry(e.method)
            if e.tp is not None and isinstance(scn.tp, list):
                raise ValueError(f"{where}.{j}.tp: give tp either per fleet group or as a scenario list, not both")
            if e.tp is not None and (m.num_kv_heads % e.tp and e.tp % m.num_kv_heads):
                raise ValueError(f"{where}.{j}.tp: {e.tp} does not split {m.name}'s {m.num_kv_heads} KV heads evenly; "
                                 "use a divisor or multiple of the KV head count")
    from rkvsim.simulator.policies import scheduler_with
    for i, a in enumerate(scn.arms or []):
        if a.scheduler:
            try:
                scheduler_with(scn.scheduler, a.scheduler, resolve_hardware(scn.hardware))
            except Exception as e:   # pydantic's ValidationError: name the arm's field
                err = e.errors()[0] if hasattr(e, "errors") else {"loc": (), "msg": str(e)}
                loc = ".".join(str(x) for x in err["loc"])
                raise ValueError(f"arms.{i}.scheduler.{loc}: {err['msg']}") from None
    names = [a.name for a in scn.arms or []]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"arms: names repeat {sorted(dup)}; give each arm its own name")
