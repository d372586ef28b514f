"""Fetching the shared test data by hash (tests/shared_fetch.py), against a real HTTP server
on this machine: what a clone without ../shared/data does when the network is there."""

from __future__ import annotations

import hashlib
import threading
from functools import partial
from http.server import HTTPServer, SimpleHTTPRequestHandler

import pytest

from shared_fetch import Entry, fetch_shared, registry


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "public"
    served.mkdir()
    requests = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    httpd = HTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_port}/", requests
    httpd.shutdown()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_files_are_fetched_checked_cached_and_cut(server, tmp_path):
    served, url, requests = server
    (served / "slide.svs").write_bytes(b"real bytes")
    (served / "table.csv").write_bytes(b"gene,a\nx,1\ny,2\nz,3\n")
    entries = [
        Entry("slides/slide.svs", digest(b"real bytes"), url + "slide.svs"),
        Entry("expression/first2.csv", digest(b"gene,a\nx,1\n"), url + "table.csv", "first_lines=2"),
        Entry("slides/tampered.svs", digest(b"other bytes"), url + "slide.svs"),
        Entry("slides/unknown.ndpi", "0" * 64, ""),
        Entry("slides/CMU-1-Small-Region.svs", next(e.sha256 for e in registry() if e.url.startswith("bundled:")),
              "bundled:CMU-1-Small-Region.svs"),
    ]
    dest = tmp_path / "cache"
    present, missing = fetch_shared(dest, entries)
    assert present == ["slides/slide.svs", "expression/first2.csv", "slides/CMU-1-Small-Region.svs"]
    assert (dest / "expression/first2.csv").read_bytes() == b"gene,a\nx,1\n"
    assert [m.split(" (")[0] for m in missing] == ["slides/tampered.svs", "slides/unknown.ndpi"]
    assert "hash" in missing[0] and not (dest / "slides/tampered.svs").exists()
    assert "no public source" in missing[1]
    count = len(requests)
    assert fetch_shared(dest, entries[:2])[0] == ["slides/slide.svs", "expression/first2.csv"]
    assert len(requests) == count  # both kept from the cache: no download


def test_without_network_every_file_is_reported_once_the_first_fails(tmp_path):
    entries = [Entry(f"f{i}.bin", "0" * 64, f"http://127.0.0.1:9/f{i}.bin") for i in range(3)]  # port 9: refused
    present, missing = fetch_shared(tmp_path, entries, timeout=2)
    assert present == [] and len(missing) == 3
    assert all("network unavailable" in m for m in missing[1:])


def test_the_registry_covers_every_shared_file_the_tests_name():
    import re
    from pathlib import Path

    listed = {entry.path for entry in registry()}
    named = set()
    for test in Path(__file__).parent.glob("*.py"):
        if test.name == Path(__file__).name:
            continue
        named |= set(re.findall(r'"((?:slides|he_tiles|ihc|mif|pathways|expression|paired_he_ihc)/[^"*]+\.\w+)"',
                                test.read_text()))
    assert named and named <= listed, sorted(named - listed)
