"""Shared pytest configuration for napari-mupad.

- No test touches the network: the Hugging Face libraries are forced offline for the
  whole session (set before any test module imports them). The one exception: on a clone
  without ``../shared/data`` its files are fetched by hash from their public sources.
- ``shared_data``: the folder of real, externally authored test data that sits beside
  the repository (``../shared/data``), overridable with ``MUPAD_SHARED_DATA``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (scripts/test.sh), each worker gets its share of the cores for torch's
    intra-op threads: two workers with two threads each on two cores fight over them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, threads)
        import sys

        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(threads))


_share_the_cores_between_workers()

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _shared_data_dir() -> Path:
    override = os.environ.get("MUPAD_SHARED_DATA")
    return Path(override).expanduser().resolve() if override else DEFAULT_SHARED_DATA


SHARED_SKIP = "../shared/data not found"
BUNDLED_CMU1 = REPO_ROOT / "src" / "mupad_core" / "data" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the shared real test data folder. Absent: its files are fetched from their public
    sources by hash (tests/shared_fetch.py, cached under $MUPAD_HOME/shared-data) when the
    network allows; tests whose files could not be had are skipped and counted in one summary
    line. In CI (CI=true) the folder is laid beside the clone and a missing one is a failure."""
    path = _shared_data_dir()
    if path.is_dir():
        return path
    message = (f"{SHARED_SKIP}: no shared test data folder at {path} "
               "(expected beside the repository checkout; set MUPAD_SHARED_DATA=/path/to/data)")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI: {message}", pytrace=False)
    from shared_fetch import fetch_shared

    present, missing = fetch_shared(FETCHED)
    _FETCH_REPORT.extend(missing)
    if not present:
        pytest.skip(f"{message}; fetching from the public sources failed ({missing[0] if missing else 'nothing listed'})")
    return FETCHED


def _home() -> Path:
    return Path(os.environ.get("MUPAD_HOME") or "~/.cache/mupad").expanduser()


FETCHED = _home() / "shared-data"
_FETCH_REPORT: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that reads a shared file which could not be fetched is skipped, not failed."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is None or report.when not in ("setup", "call") or _shared_data_dir().is_dir():
        return
    import re

    text = str(call.excinfo.value)
    named = re.findall(re.escape(str(FETCHED)) + r"/[^'\"\s,)\]]+", text)
    absent = [path for path in named if not Path(path).exists()]
    if absent:  # the failure names a shared file that could not be fetched
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0,
                           f"Skipped: {SHARED_SKIP}: {absent[0]} was not fetched")


@pytest.fixture(scope="session")
def cmu1() -> Path:
    """CMU-1-Small-Region (CC0), bundled in the package: byte-identical to the shared copy
    (sha256 ed92d5a9...), so tests that need only it run on any clone."""
    return BUNDLED_CMU1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if SHARED_SKIP in str(r.longrepr)]
    if skipped:
        fetched = f"; {len(_FETCH_REPORT)} file(s) could not be fetched, e.g. {_FETCH_REPORT[0]}" if _FETCH_REPORT else ""
        terminalreporter.write_line(
            f"shared data: {len(skipped)} test(s) skipped because {_shared_data_dir()} is absent{fetched} "
            "(clone the project beside its shared/ folder or set MUPAD_SHARED_DATA to run them)", yellow=True)
