"""Shared fixtures."""
import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout. Skips when absent, unless RKVSIM_REQUIRE_SHARED=1
    (CI sets it so that a missing folder fails instead of silently skipping)."""
    if SHARED.is_dir():
        return SHARED
    msg = f"shared data folder not found at {SHARED}"
    if os.environ.get("RKVSIM_REQUIRE_SHARED") == "1":
        pytest.fail(msg + " (RKVSIM_REQUIRE_SHARED=1)")
    pytest.skip(msg)
