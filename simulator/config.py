"""The scenario schema: one YAML file a user copies and edits. Validated with pydantic;
unknown keys are rejected and every error names the field and how to fix it."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from rkvsim.models import Method, method_from_entry, resolve_hardware, resolve_model

from rkvsim.simulator.fleet_schema import Arm, FleetEntry, RouterName, RoutingConfig, check_fleets
from rkvsim.simulator.slots_config import SlotsSchedulerConfig, check_slots, scheduler_kind
from rkvsim.simulator.workload import WorkloadConfig


class ScenarioError(ValueError):
    """A scenario that cannot be run; the message is one line naming the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SchedulerConfig(_Strict):
    """A paged-KV engine's scheduler. `policy` names the engine whose rules are simulated
    (simulator/policies.py); a setting left unset takes that policy's upstream default."""
    kind: Literal["paged"] = "paged"
    policy: Literal["vllm-v1", "vllm-v0", "lmdeploy"] = "vllm-v1"
    max_batch_size: int | None = Field(None, ge=1, description="most requests in one engine iteration "
                                                               "(default: the policy's for the hardware)")
    max_batched_tokens: int | None = Field(None, ge=16, description="most new tokens (prefill + decode) per iteration "
                                                                   "(default: the policy's for the hardware)")
    chunked_prefill: bool | None = Field(None, description="default: the policy's (vllm-v1 chunks; v0, lmdeploy do not)")
    long_prefill_token_threshold: int = Field(0, ge=0, description="vllm-v1: most prompt tokens one request "
                                                                   "takes per step (0: no cap)")
    enable_prefix_caching: bool | None = Field(None, description="default: the policy's (on under vllm-v1)")
    cuda_graphs: bool | None = Field(None, description="decode under CUDA graphs: no per-kernel launch cost "
                                                       "(default: the policy's)")
    cpu_overhead: Literal["measured", "prior"] | None = Field(
        None, description="per-step CPU time: fitted on measured engine tables by batch size, or the prior's constant")
    kv_blocks: Literal["exact", "reserved"] | None = Field(
        None, description="exact: a request holds the blocks of its actual bytes (residual window at its length); "
                          "reserved: the worst-case residual reserved per request (vllm-v0's numbers)")
    eviction_blocks: Literal["whole", "compacted"] | None = Field(
        None, description="whole: an evicting cache frees whole blocks as vLLM frees a sliding window; "
                          "compacted: the kept tokens packed into the fewest blocks (idealised)")
    prefill_interval: int = Field(16, ge=1, description="lmdeploy: steps from one prefill attempt to the next")
    watermark: float | None = Field(None, ge=0, lt=1, description="share of KV blocks kept free when admitting "
                                                                 "while others run (default: the policy's)")
    block_size: int | None = Field(None, ge=1, description="token slots per KV block (default: the policy's)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=2, description="context window; default: the model's")

    @model_validator(mode="after")
    def _policy_defaults(self):
        from rkvsim.simulator.policies import POLICIES
        d = POLICIES[self.policy]
        if self.policy == "lmdeploy" and self.chunked_prefill:
            raise ValueError("chunked_prefill: the lmdeploy policy runs whole prompts (LMDeploy's default); "
                             "remove it or use policy: vllm-v1")
        if self.policy != "vllm-v1" and (self.enable_prefix_caching or self.long_prefill_token_threshold):
            what = "enable_prefix_caching" if self.enable_prefix_caching else "long_prefill_token_threshold"
            raise ValueError(f"{what}: simulated under policy vllm-v1 only; remove it or set policy: vllm-v1")
        for name in ("chunked_prefill", "enable_prefix_caching", "cuda_graphs", "cpu_overhead", "kv_blocks",
                     "eviction_blocks", "block_size", "watermark"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(d, name))
        return self


# paged (vLLM-like, the default when `kind` is absent) or slots (llama.cpp server).
AnyScheduler = Annotated[Union[Annotated[SchedulerConfig, Tag("paged")], Annotated[SlotsSchedulerConfig, Tag("slots")]],
                         Discriminator(scheduler_kind)]


class VerbosityConfig(_Strict):
    """Compression makes answers longer (the paper's observation 3). When `data` is set, each
    compressed method's output lengths are the workload's (uncompressed) lengths times ratios
    drawn from the inflation model fitted on measured generations."""
    data: str | None = Field(None, description="'shipped' (calibration/data/lengths-1024 installed with rkvsim) "
                                                "or a generation dataset folder; null: no inflation")
    min_prompts: int = Field(30, ge=1, description="refuse datasets with fewer complete prompts than this")


class Scenario(_Strict):
    name: str = "scenario"
    seed: int = 0
    model: str | dict = Field(description="a registered name or hub id, a Hugging Face config.json path "
                                          "(relative to the scenario file), or config.json fields inline")
    hardware: str
    profile: str | None = Field(None, description="profile folder for calibrated costs (else roofline prior)")
    tp: int | list[int] = Field(1, description="tensor-parallel degree, or a list to compare several")
    replicas: int = Field(1, ge=1)
    methods: list[str | dict] = Field(default_factory=lambda: ["fp16"])
    router: RouterName = "least_kv"
    fleet: list[FleetEntry] | None = Field(None, description="mixed fleet; see simulator/fleet_schema.py")
    arms: list[Arm] | None = Field(None, description="(router, fleet) set-ups compared per method")
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    scheduler: AnyScheduler = Field(default_factory=SchedulerConfig)
    workload: WorkloadConfig
    verbosity: VerbosityConfig = Field(default_factory=VerbosityConfig)
    step_by_step: bool = Field(False, description="simulate every engine step as its own event (no event "
                               "skipping; same numbers, slower: the reference the skipping is tested against)")

    @field_validator("model")
    @classmethod
    def _model_known(cls, v):
        try:
            resolve_model(v)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        return v

    @field_validator("hardware")
    @classmethod
    def _hw_known(cls, v: str) -> str:
        try:
            resolve_hardware(v)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        return v

    @field_validator("methods")
    @classmethod
    def _methods_valid(cls, v: list) -> list:
        if not v:
            raise ValueError("list at least one method, e.g. [fp16, kivi-4]")
        labels = [m.label for m in (method_from_entry(e) for e in v)]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ValueError(f"methods repeat {sorted(dup)}; give each setting once")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        m = resolve_model(self.model)
        if self.scheduler.kind == "paged":
            from rkvsim.simulator.policies import batch_defaults
            batch_defaults(self.scheduler, resolve_hardware(self.hardware))
        for tp in self.tp_list:
            if tp < 1 or (m.num_kv_heads % tp and tp % m.num_kv_heads):
                raise ValueError(f"tp={tp} does not split {m.name}'s {m.num_kv_heads} KV heads evenly; "
                                 "use a divisor or multiple of the KV head count")
        sc = self.scheduler
        if sc.kind == "slots":
            check_slots(self)   # a llama.cpp server: its own rules (simulator/slots_config.py)
            check_fleets(self)
            return self
        max_len = sc.max_model_len or m.max_position
        # LMDeploy always admits the first waiting prompt whatever its length (max_prefill_token_num
        # limits only the ones after it), so only the vLLM policies need the budget to cover the window.
        if not sc.chunked_prefill and sc.policy != "lmdeploy" and sc.max_batched_tokens < max_len:
            raise ValueError(f"scheduler.max_batched_tokens ({sc.max_batched_tokens}) is below the {max_len}-token "
                             "context window, so long prompts could never be scheduled; raise it or set "
                             "scheduler.chunked_prefill: true")
        check_fleets(self)
        return self

    @property
    def tp_list(self) -> list[int]:
        return list(self.tp) if isinstance(self.tp, list) else [self.tp]

    @property
    def method_list(self) -> list[Method]:
        return [method_from_entry(e) for e in self.methods]


def format_validation_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key; remove it or check its spelling against the scenario reference in README.md"
    elif e["type"] == "missing":
        msg = "required; add it to the scenario"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{loc or 'scenario'}: {msg}{more}"


def read_yaml(p: Path, missing_hint: str):
    """A YAML file's content, or a one-line ScenarioError (missing file, bad syntax with its line)."""
    if not p.is_file():
        raise ScenarioError(f"{p}: no such {missing_hint}")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ScenarioError(f"{p}:{where} is not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None


def load_scenario(path: str | Path, overrides: dict | None = None) -> Scenario:
    """Read and validate a scenario file; raises ScenarioError with a one-line message."""
    p = Path(path)
    data = read_yaml(p, "scenario file; pass a path to a .yaml file such as scenarios/heavy_kv.yaml")
    if not isinstance(data, dict):
        raise ScenarioError(f"{p}: a scenario is a YAML mapping (model:, hardware:, workload: ...)")
    for k, v in (overrides or {}).items():
        set_dotted(data, k, v)
    m = data.get("model")
    if isinstance(m, str) and m.endswith(".json") and not Path(m).is_absolute() and (p.parent / m).is_file():
        data["model"] = str((p.parent / m).resolve())   # a config path is read relative to the scenario
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        raise ScenarioError(f"{p}: {format_validation_error(e)}") from None


def parse_overrides(items: list[str]) -> dict:
    """`--set key=value` items as {dotted key: YAML value}."""
    out = {}
    for it in items:
        key, sep, val = it.partition("=")
        if not sep:
            raise ScenarioError(f"--set {it!r}: write it as dotted.key=value, e.g. --set workload.num_requests=100")
        try:
            out[key] = yaml.safe_load(val)
        except yaml.YAMLError as e:
            raise ScenarioError(f"--set {it!r}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None
    return out


def set_dotted(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value
