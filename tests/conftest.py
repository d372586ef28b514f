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


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the shared real test data folder; skips the test when it is absent."""
    path = _shared_data_dir()
    if not path.is_dir():
        pytest.skip(
            f"../shared/data not found: no shared test data folder at {path} "
            "(expected beside the repository checkout; set MUPAD_SHARED_DATA=/path/to/data)"
        )
    return path
