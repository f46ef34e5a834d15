"""Where calibrated profiles live, and turning one into the simulator's cost model.

A scenario's hardware gets calibrated costs when a profile for it exists, looked up in order:
1. the scenario's `profile:` folder (`profile: roofline` forces the prior);
2. the user store `$RKVSIM_PROFILES` (default ~/.local/share/rkvsim/profiles)/<hardware>/<model>,
   filled by `rkvprof install DIR`; then any model of that hardware there (shape transfer);
3. the profiles shipped in the package (profiler/data/<hardware>/<model>), same order.
The fit is read from `<profile>/fit/` when `rkvprof fit` wrote it there; otherwise the profile
is fitted once and cached under ~/.cache/rkvsim/fits/<tables sha256>/.
"""
from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

from rkvsim.models import HardwareSpec, Method, ModelSpec
from rkvsim.models.files import UnreadableFile, cache_dir, read_json
from rkvsim.profiler.profile import table_path

from rkvsim.calibration.steps.data_files import profiler_data
from rkvsim.calibration.steps.fit import FIT_PICKLE, FitError, StepFit, tables_sha, fit_folder, load_fit, save_fit

PROFILES_ENV = "RKVSIM_PROFILES"
FORCE_PRIOR = "roofline"


def user_store() -> Path:
    return Path(os.environ.get(PROFILES_ENV) or Path.home() / ".local" / "share" / "rkvsim" / "profiles")


def packaged_store() -> Path:
    return profiler_data()


def _meta(folder: Path) -> dict | None:
    try:
        return read_json(folder / "meta.json", "profile meta.json")
    except UnreadableFile:
        return None


def _usable(folder: Path, hardware: str) -> bool:
    m = _meta(folder)
    # Engine profiles (llama.cpp's own step timings) feed the slots scheduler, not this fit.
    if m and (m.get("engine") or m.get("source") == "rkvprof-engine"):
        return False
    return bool(m) and m.get("hardware") == hardware and m.get("status", "complete") == "complete" \
        and any(table_path(folder, t) for t in ("attention.csv", "operators.csv"))


def find_attention_donor(hardware: HardwareSpec) -> Path | None:
    """A profile of another GPU that measured attention, for a GPU whose profile has none (the
    nearest one, as find_gpu_donor; calibration/steps/compile.py carries it by the roofline)."""
    return _nearest_with(hardware, "attention.csv")


def find_profile(hardware: HardwareSpec, model: ModelSpec, explicit: str | None = None,
                 base_dir: Path | None = None) -> Path | None:
    """The profile folder to calibrate with, or None for the roofline prior."""
    if explicit:
        if explicit == FORCE_PRIOR:
            return None
        p = Path(explicit)
        if not p.is_absolute() and base_dir is not None and not p.exists():
            p = base_dir / p
        m = _meta(p)
        if m is None:
            raise FitError(f"profile: {explicit} is not an rkvprof profile folder (no meta.json); "
                           "give a folder written by rkvprof collect/import-vidur, or 'roofline'")
        if m.get("hardware") != hardware.name:
            raise FitError(f"profile: {explicit} was measured on {m.get('hardware')!r}, the scenario's hardware is "
                           f"{hardware.name!r}; use a profile of that hardware or change hardware")
        return p
    for root in (user_store(), packaged_store()):
        same = root / hardware.name / model.name
        if _usable(same, hardware.name):
            return same
        hw_dir = root / hardware.name
        if hw_dir.is_dir():
            # A profile that measured this model among others (an imported multi-model one) first.
            folders = [o for o in sorted(hw_dir.iterdir()) if _usable(o, hardware.name)]
            folders.sort(key=lambda o: model.name not in ((_meta(o) or {}).get("models") or {}))
            if folders:
                return folders[0]
    return None


@lru_cache(maxsize=16)
def _fit_for(folder: str, sha: str) -> StepFit:
    f = Path(folder)
    if (fit_folder(f) / FIT_PICKLE).exists():
        return load_fit(f)
    cached = cache_dir() / "fits" / sha
    if (cached / FIT_PICKLE).exists():
        try:
            return load_fit(f, cached)
        except FitError:
            pass
    from rkvsim.profiler.profile import load_profile
    from rkvsim.calibration.steps.fit import fit_profile
    print(f"rkvsim: fitting step costs on {f} (once; cached in {cached})", file=sys.stderr)
    prof = load_profile(f)
    # A multi-model profile (an imported GPU's) is fitted without its leave-one-model-out scoring
    # here: `rkvprof fit` scores it; the simulator only needs the estimators.
    fit = fit_profile(prof, score=not (prof.meta.get("models") and len(prof.meta["models"]) > 1))
    save_fit(fit, cached)
    return fit


def fit_for(folder: Path) -> StepFit:
    return _fit_for(str(Path(folder).resolve()), tables_sha(Path(folder)))


def find_gpu_donor(hardware: HardwareSpec) -> Path | None:
    """For a GPU nobody profiled: the profile of the nearest GPU that was, whose operators are
    carried here by the datasheet roofline. None on a CPU or when no GPU profile exists."""
    return None if hardware.memory == "dram" else _nearest_with(hardware, "operators.csv")


def _nearest_with(hardware: HardwareSpec, table: str) -> Path | None:
    """The usable profile holding `table` of the other GPU nearest `hardware` (same memory kind
    first, then peak FLOP/s and bandwidth: gpu_carry.rank_donors); the user's store first."""
    from rkvsim.calibration.steps.gpu_carry import rank_donors
    from rkvsim.models import HARDWARE
    found: dict[str, Path] = {}
    for root in (user_store(), packaged_store()):
        if not root.is_dir():
            continue
        for hw_dir in sorted(root.iterdir()):
            spec = HARDWARE.get(hw_dir.name)
            if spec is None or spec.memory == "dram" or spec.name in found or not hw_dir.is_dir():
                continue
            usable = [o for o in sorted(hw_dir.iterdir()) if _usable(o, spec.name) and table_path(o, table)]
            if usable:
                found[spec.name] = usable[0]
    ranked = rank_donors(hardware, [HARDWARE[n] for n in found])
    return found[ranked[0].name] if ranked else None


def profile_hardware(folder: Path) -> str | None:
    m = _meta(Path(folder))
    return m.get("hardware") if m else None


@lru_cache(maxsize=64)
def _compiled(folder: str, sha: str, model: ModelSpec, method: Method, tp: int, max_tokens: int,
              max_batch: int, max_ctx: int, to_hw: str | None = None):
    from threadpoolctl import threadpool_limits

    from rkvsim.calibration.steps import compiled_store
    from rkvsim.calibration.steps.compile import compile_costs
    from rkvsim.calibration.steps.fit import FIT_VERSION
    from rkvsim.models import resolve_hardware
    # Another process may have compiled these already (calibration/steps/compiled_store.py).
    def key() -> str:
        return compiled_store.key(folder, sha, _fit_id(folder, sha), FIT_VERSION, model, method, tp, max_tokens,
                                  max_batch, max_ctx, to_hw)
    hit = compiled_store.load(key(), _attention_donor_of)
    if hit is not None:
        return hit
    fit = _fit_for(folder, sha)
    target = resolve_hardware(to_hw) if to_hw else None
    here = target or resolve_hardware(fit.hardware)
    donor = donor_id = None
    if not fit.has_attention():
        d = find_attention_donor(here)
        if d is not None:
            dfit = fit_for(d)
            donor = (dfit, resolve_hardware(dfit.hardware), here)
            donor_id = _donor_id(d)
    # One thread: OpenMP workers of the boosted trees spin against the simulator's own process
    # on a loaded machine (measured: 4.4 s instead of 0.4 s to compile one method).
    with threadpool_limits(1):
        comp = compile_costs(fit, model, method, tp, max_tokens, max_batch, max_ctx, donor, target, folder)
    # The key again: the fit may have been made (and cached) just now, which the next process sees.
    compiled_store.save(key(), comp, not fit.has_attention(), here.name, donor_id)
    return comp


def _fit_id(folder: str, sha: str) -> tuple[str, ...]:
    from rkvsim.calibration.steps import compiled_store
    f = Path(folder)
    return compiled_store.fit_id(fit_folder(f), cache_dir() / "fits" / sha, f / "meta.json")


def _donor_id(d: Path) -> tuple:
    """An attention donor as the compiled store names it: (folder, tables sha, fit_id)."""
    folder, sha = str(d.resolve()), tables_sha(d)
    return folder, sha, _fit_id(folder, sha)


def _attention_donor_of(hardware: str) -> tuple | None:
    """_donor_id of the attention donor find_attention_donor picks for `hardware` now."""
    from rkvsim.models import resolve_hardware
    d = find_attention_donor(resolve_hardware(hardware))
    return None if d is None else _donor_id(d)


def compiled_costs(folder: Path, model: ModelSpec, method: Method, tp: int, max_tokens: int, max_batch: int,
                   max_ctx: int, to_hw: str | None = None):
    """The profile's fitted step costs for one (model, method, tp), compiled into lookups
    (calibration.steps.compile.CompiledCosts) over the scheduler's limits; cached per process.
    to_hw: another GPU to carry them to (one nobody profiled).

    The limits are rounded up to powers of two: the lookups then cover them all the same, and a
    sweep over batch or token limits compiles a handful of tables instead of one per point
    (measured: compiling was 13% of a 40-point bench_sweep run, every point its own)."""
    folder = Path(folder)
    return _compiled(str(folder.resolve()), tables_sha(folder), model, method, tp, _pow2(max_tokens),
                     _pow2(max_batch), _pow2(max_ctx), to_hw)


def _pow2(x) -> int:
    return 1 << max(1, (int(x) - 1).bit_length())
