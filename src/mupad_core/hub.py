"""Where downloaded weights live, and how a name becomes a local folder.

Every pretrained thing (denoisers, VAEs, condition encoders) is named by a local folder
or a Hugging Face hub id. Resolving both through one function gives one cache
(`MUPAD_HOME`) and one error that tells an offline user exactly what to fetch where.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


class HubUnavailableError(RuntimeError):
    """A hub id could not be resolved to local files (offline, gated, unknown)."""


def mupad_cache_dir() -> Path:
    """`$MUPAD_HOME`, default `~/.cache/mupad`; hub snapshots go under its `hub/`."""
    return Path(os.environ.get("MUPAD_HOME") or "~/.cache/mupad").expanduser()


def _is_repo_id(name: str) -> bool:
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        return False
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except ValueError:
        return False
    return True


def resolve_pretrained(path_or_id: str | Path, allow_patterns: Sequence[str] | None = None) -> Path:
    """A local folder as is; a hub id as its snapshot in the MUPAD cache.

    The cache is tried first so that a model fetched once keeps working offline; only
    then is the hub asked. `allow_patterns` limits which files a download fetches.
    """
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    name = str(path_or_id)
    if isinstance(path_or_id, Path) or not _is_repo_id(name):
        raise FileNotFoundError(f"model folder {name} does not exist")

    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    cache = mupad_cache_dir() / "hub"
    kwargs = dict(repo_id=name, cache_dir=cache, allow_patterns=list(allow_patterns) if allow_patterns else None)
    try:
        return Path(snapshot_download(**kwargs, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(snapshot_download(**kwargs))
    except GatedRepoError as exc:
        raise HubUnavailableError(
            f"'{name}' is gated on the Hugging Face hub: accept its terms at https://huggingface.co/{name} and "
            f"log in (`hf auth login` or HF_TOKEN), or pass a local folder with its files"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise HubUnavailableError(
            f"'{name}' is neither a local folder nor a model on the Hugging Face hub "
            f"(check the id; private models need a token)"
        ) from exc
    except Exception as exc:  # connection, timeout, offline mode, hub outage: all mean "not here"
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise HubUnavailableError(
            f"cannot fetch '{name}' from the Hugging Face hub{offline} and it is not in the cache {cache}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} — on a connected machine run `hf download {name} --cache-dir {cache}` "
            f"(or the same with MUPAD_HOME set there) and copy {cache} here, or pass a local folder "
            f"holding the model's files instead of '{name}'."
        ) from exc
