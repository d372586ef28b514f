"""The shared test data fetched from its public sources, for a clone without ../shared/data.

`data/shared-registry.csv` lists every shared file the tests read, with its sha256 and, where
one is known, the raw URL at the commit the shared README names. `fetch_shared` downloads with
pooch into a cache (a file already there with the right hash is kept), checks every hash, and
reports what it could not get and why; the hash decides, never the URL. CMU-1 comes from the
package's byte-identical copy.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

REGISTRY = Path(__file__).parent / "data" / "shared-registry.csv"
PACKAGE_DATA = Path(__file__).resolve().parents[1] / "src" / "mupad_core" / "data"


@dataclass(frozen=True)
class Entry:
    path: str
    sha256: str
    url: str = ""
    transform: str = ""  # "first_lines=N": the file is the first N lines of the source


def registry(path: Path = REGISTRY) -> list[Entry]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return [Entry(**row) for row in csv.DictReader(lines)]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_shared(dest: Path, entries: list[Entry] | None = None, timeout: float = 20.0) -> tuple[list[str], list[str]]:
    """Fetch `entries` (default: the registry) under `dest`. Returns (present, missing), the
    missing ones as 'path (why)'. After one connection failure the network is taken as absent."""
    import pooch

    present, missing = [], []
    offline: str | None = None
    downloads = dest / ".downloads"
    for entry in entries if entries is not None else registry():
        target = dest / entry.path
        if target.is_file() and sha256(target) == entry.sha256:
            present.append(entry.path)
            continue
        if not entry.url:
            missing.append(f"{entry.path} (no public source known)")
            continue
        if entry.url.startswith("bundled:"):
            source = PACKAGE_DATA / entry.url.removeprefix("bundled:")
        elif offline:
            missing.append(f"{entry.path} ({offline})")
            continue
        else:
            try:
                source = Path(pooch.retrieve(
                    entry.url, known_hash=None if entry.transform else f"sha256:{entry.sha256}",
                    path=downloads, progressbar=False, downloader=pooch.HTTPDownloader(timeout=timeout)))
            except ValueError as error:  # pooch: the hash did not match
                missing.append(f"{entry.path} (hash mismatch: {str(error).splitlines()[0]})")
                continue
            except Exception as error:  # no network, DNS, HTTP 404, ...
                detail = str(error).splitlines()[0][:80] if str(error) else ""
                reason = f"{type(error).__name__}: {detail}".rstrip(": ")
                if "404" not in reason:
                    offline = f"network unavailable: {reason}"
                missing.append(f"{entry.path} ({reason})")
                continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        if entry.transform.startswith("first_lines="):
            count = int(entry.transform.split("=", 1)[1])
            with open(source, "rb") as handle:
                partial.write_bytes(b"".join(handle.readline() for _ in range(count)))
        else:
            shutil.copyfile(source, partial)
        if sha256(partial) != entry.sha256:
            partial.unlink()
            missing.append(f"{entry.path} (fetched, but its sha256 is not the registry's)")
            continue
        partial.replace(target)
        present.append(entry.path)
    return present, missing
