"""Compiled cost tables kept on disk between processes (calibration/steps/compiled_store.py): a load
gives the very tables a compile gives, without the fit; any input of the compile, or a different
attention donor, is a miss; a damaged file is a miss that gets rewritten."""
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from rkvsim.calibration.steps import compiled_store, profiles
from rkvsim.models import parse_method, resolve_hardware, resolve_model

A6000, LLAMA = resolve_hardware("a6000"), resolve_model("llama-2-7b")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(monkeypatch, tmp_path):
    """An empty store, fresh per-process caches; the fits stay where they are (fitting takes a minute)."""
    monkeypatch.setattr(compiled_store, "store_dir", lambda: tmp_path / "compiled")
    profiles._compiled.cache_clear()
    yield tmp_path / "compiled"
    profiles._compiled.cache_clear()


def _costs(method="kivi-4", tp=1, max_batch=64):
    folder = profiles.find_gpu_donor(A6000)      # the A40's profile, carried: it needs an attention donor too
    return profiles.compiled_costs(folder, LLAMA, parse_method(method), tp, 2048, max_batch, 2048, to_hw="a6000")


def _same(a, b):
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert (x is None) == (y is None) and (x is None or np.array_equal(x, y)), f.name
        else:
            assert x == y, f.name


def test_a_second_process_loads_the_same_tables_without_the_fit(store, monkeypatch):
    first = _costs()
    assert len(list(store.glob("*.pkl"))) == 1
    profiles._compiled.cache_clear()

    def no_fit(*_a, **_k):
        raise AssertionError("fitted or compiled again instead of loading the stored tables")
    monkeypatch.setattr(profiles, "_fit_for", no_fit)
    _same(_costs(), first)


@pytest.mark.parametrize("change", [{"tp": 2}, {"method": "kivi-2"}, {"max_batch": 256}])
def test_another_input_is_another_entry(store, change):
    _costs()
    profiles._compiled.cache_clear()
    _costs(**change)
    assert len(list(store.glob("*.pkl"))) == 2


def test_a_different_attention_donor_is_a_miss(store, monkeypatch):
    first = _costs()
    profiles._compiled.cache_clear()
    (k,) = [p.stem for p in store.glob("*.pkl")]
    assert compiled_store.load(k, profiles._attention_donor_of) is not None
    assert compiled_store.load(k, lambda hw: ("/elsewhere", "0" * 64)) is None
    assert compiled_store.load(k, lambda hw: None) is None
    # A miss compiles again (with the donor found now) and replaces the entry.
    _same(_costs(), first)


def test_a_damaged_entry_is_a_miss_and_is_rewritten(store):
    first = _costs()
    (p,) = store.glob("*.pkl")
    p.write_bytes(p.read_bytes()[:100])
    profiles._compiled.cache_clear()
    _same(_costs(), first)
    profiles._compiled.cache_clear()
    assert compiled_store.load(p.stem, profiles._attention_donor_of) is not None


def test_the_key_holds_the_fit_the_compile_reads(store, tmp_path):
    """The profile's fit/ folder, the fit cached under its tables' sha256 (shipped profiles have no
    fit/ pickle: a change of the cached fit must miss too), its meta.json, and FIT_VERSION."""
    fit_dir, cached, meta = tmp_path / "fit", tmp_path / "cache-fit", tmp_path / "meta.json"

    def k(version=3):
        return compiled_store.key("folder", "sha", compiled_store.fit_id(fit_dir, cached, meta), version, "m", 1)
    seen = {k()}
    fit_dir.mkdir()
    (fit_dir / "fit.json").write_text("{}")
    seen.add(k())
    (fit_dir / "fit.json").write_text('{"a": 1}')
    seen.add(k())
    cached.mkdir()
    (cached / "step_fit.pkl").write_bytes(b"x")
    seen.add(k())
    (cached / "step_fit.pkl").write_bytes(b"xy")           # refitted: another size
    seen.add(k())
    meta.write_text("{}")
    seen.add(k())
    seen.add(k(version=4))
    assert len(seen) == 7
    assert k() == k()


def test_a_refitted_donor_is_a_miss(store, monkeypatch):
    """The donor is named with its fit: `rkvprof fit` on the donor's profile changes what it lends."""
    _costs()
    profiles._compiled.cache_clear()
    (k,) = [p.stem for p in store.glob("*.pkl")]
    now = profiles._attention_donor_of("a6000")
    assert now is not None and len(now) == 3
    assert compiled_store.load(k, lambda hw: (*now[:2], now[2] + ("fit/step_fit.pkl:1:1",))) is None
    assert compiled_store.load(k, profiles._attention_donor_of) is not None


def test_a_warm_process_never_imports_scikit_learn(tmp_path):
    """What the store is for: a simulation in a fresh process reads stored tables, so it neither
    imports the estimators' library nor compiles."""
    from rkvsim.models.files import cache_dir
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache_dir() / "fits").mkdir(parents=True, exist_ok=True)
    (cache / "fits").symlink_to(cache_dir() / "fits")     # share the fits: fitting takes a minute
    code = ("import sys\n"
            "from rkvsim.simulator.config import load_scenario\n"
            "from rkvsim.simulator.simulation import make_cost_model\n"
            "scn = load_scenario('scenarios/heavy_kv.yaml', {'methods': ['kivi-4']})\n"
            "make_cost_model(scn, scn.method_list[0], 1)\n"
            "print('sklearn' in sys.modules)\n")
    env = dict(os.environ, RKVSIM_CACHE=str(cache))
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    assert runs[0].stdout.split()[-1] == "True"      # the first one compiled
    assert runs[1].stdout.split()[-1] == "False"     # the second one loaded
    assert len(list((cache / "compiled").glob("*.pkl"))) == 1
