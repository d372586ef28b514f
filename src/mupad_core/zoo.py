"""Which MUPAD models this installation can run, and how a model name becomes a folder.

Three places, tried in this order by `resolve_model`:
- **bundled** demo models shipped inside the package (`mupad_core/data/models/<id>/`),
  named by their folder name (e.g. `demo-he2mif`);
- a **local folder** (a `mupad train` run's `model/`, or anything saved by `save_model`);
- a **hub id**, fetched once into the `$MUPAD_HOME` cache (see `hub.py`).

`list_models()` reports the bundled and cached ones with the tasks each was trained for,
for `mupad models` and the napari widgets' model list.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from .hub import mupad_cache_dir, resolve_pretrained

PIPELINE_FILE = "mupad_pipeline.json"


@dataclass
class ModelEntry:
    id: str
    source: str  # bundled | cached
    path: str
    tasks: list[str] = field(default_factory=list)
    conditions: list[str] = field(default_factory=list)
    template: str | None = None
    size_mb: float = 0.0
    summary: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def bundled_models_dir() -> Path:
    return Path(str(resources.files("mupad_core") / "data" / "models"))


def _entry(folder: Path, model_id: str, source: str) -> ModelEntry | None:
    pipeline_path = folder / PIPELINE_FILE
    if not (folder / "config.json").is_file() or not pipeline_path.is_file():
        return None
    try:
        pipeline = json.loads(pipeline_path.read_text())
    except json.JSONDecodeError:
        return None
    card = folder / "README.md"
    summary = ""
    if card.is_file():
        lines = [ln.strip() for ln in card.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        summary = lines[0] if lines else ""
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    conditions = pipeline.get("conditions") or []
    return ModelEntry(
        id=model_id, source=source, path=str(folder), tasks=list(pipeline.get("tasks") or []),
        conditions=sorted(conditions) if isinstance(conditions, (list, dict)) else [],
        template=pipeline.get("template"), size_mb=round(size, 2), summary=summary,
    )


def bundled_models() -> list[ModelEntry]:
    root = bundled_models_dir()
    if not root.is_dir():
        return []
    entries = (_entry(folder, folder.name, "bundled") for folder in sorted(root.iterdir()) if folder.is_dir())
    return [e for e in entries if e is not None]


def cached_models() -> list[ModelEntry]:
    """Hub snapshots in the MUPAD cache that hold a MUPAD model (a pipeline file)."""
    hub = mupad_cache_dir() / "hub"
    entries = []
    for repo in sorted(hub.glob("models--*")) if hub.is_dir() else []:
        repo_id = repo.name.removeprefix("models--").replace("--", "/")
        for snapshot in sorted((repo / "snapshots").glob("*")):
            entry = _entry(snapshot, repo_id, "cached")
            if entry is not None:
                entries.append(entry)
                break
    return entries


def list_models() -> list[ModelEntry]:
    return bundled_models() + cached_models()


def resolve_model(name: str | Path, allow_patterns=None) -> Path:
    """A bundled model id, a local folder, or a hub id, as a local folder."""
    bundled = bundled_models_dir() / str(name)
    if "/" not in str(name) and (bundled / "config.json").is_file():
        return bundled
    return resolve_pretrained(name, allow_patterns)
