"""Shared pytest configuration for napari-mupad.

- No test touches the network: the Hugging Face libraries are forced offline for the
  whole session (set before any test module imports them).
- ``shared_data``: the folder of real, externally authored test data that sits beside
  the repository (``../shared/data``), overridable with ``MUPAD_SHARED_DATA``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _shared_data_dir() -> Path:
    override = os.environ.get("MUPAD_SHARED_DATA")
    return Path(override).expanduser().resolve() if override else DEFAULT_SHARED_DATA


SHARED_SKIP = "../shared/data not found"
BUNDLED_CMU1 = REPO_ROOT / "src" / "mupad_core" / "data" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the shared real test data folder. Absent: the test is skipped (and counted in
    one summary line), except in CI (CI=true), where the folder is laid beside the clone and
    a missing one is a failure, not a quiet third fewer tests."""
    path = _shared_data_dir()
    if not path.is_dir():
        message = (f"{SHARED_SKIP}: no shared test data folder at {path} "
                   "(expected beside the repository checkout; set MUPAD_SHARED_DATA=/path/to/data)")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI: {message}", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def cmu1() -> Path:
    """CMU-1-Small-Region (CC0), bundled in the package: byte-identical to the shared copy
    (sha256 ed92d5a9...), so tests that need only it run on any clone."""
    return BUNDLED_CMU1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if SHARED_SKIP in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(
            f"shared data: {len(skipped)} test(s) skipped because {_shared_data_dir()} is absent "
            "(clone the project beside its shared/ folder or set MUPAD_SHARED_DATA to run them)", yellow=True)
