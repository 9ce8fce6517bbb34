#!/usr/bin/env python3
"""Fetch vLLM's own KV event code for the interop tests (best effort, idempotent).

Extracts only the KV event files of two pinned vLLM source distributions from PyPI:

- vLLM 0.33.0 -> ``.cache/vllm/``: ``vllm/distributed/kv_events.py`` (the publisher and the
  event structs: array-like batch, tagged-map events) and ``vllm/config/kv_events.py``;
- vLLM 0.10.0 -> ``.cache/vllm-0.10.0/``: ``vllm/distributed/kv_events.py`` (array-like
  batch and tagged-array events, int hashes).

Nothing else of vLLM is kept, and ``.cache/`` is git-ignored: vLLM's code is never
committed here. The sdists (9 MB and 47 MB; the wheels are ~350 MB CUDA builds) are found
through PyPI's JSON simple API, checked against the sha256 PyPI lists, read in a temporary
directory that is removed afterwards; vLLM is never installed or built. Without network the
script says so and exits 0, so ``make test`` does not fail for that reason (the interop
tests then skip with a clear reason).

Usage: python scripts/fetch_vllm_kv_events.py [--cache DIR] [--index URL]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INDEX = "https://pypi.org/simple/vllm/"
TIMEOUT_S = 120
# version -> (directory under .cache, files to extract, relative to the sdist's top folder)
VERSIONS = {
    "0.33.0": ("vllm", ("vllm/distributed/kv_events.py", "vllm/config/kv_events.py")),
    "0.10.0": ("vllm-0.10.0", ("vllm/distributed/kv_events.py",)),
}


class FetchError(Exception):
    """The sdist could not be found, downloaded, verified or read."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache",
                        help="where the per-version directories go (default: .cache/)")  # fmt: skip
    parser.add_argument("--index", default=INDEX, help=f"PEP 691 project page (default {INDEX})")
    args = parser.parse_args(argv)
    wanted = {v: spec for v, spec in VERSIONS.items() if not _present(args.cache, *spec)}
    for version, (subdir, _) in VERSIONS.items():
        if version not in wanted:
            print(f"vLLM {version} kv_events already in {args.cache / subdir}")
    if not wanted:
        return 0
    try:
        files = _sdists(args.index)
    except FetchError as exc:
        print(f"could not list vLLM's files ({exc}); the vLLM interop tests will skip")
        return 0
    for version, (subdir, members) in wanted.items():
        try:
            fetch(files, version, members, args.cache / subdir)
        except FetchError as exc:
            print(f"could not fetch vLLM {version} ({exc}); its interop tests will skip")
    return 0


def _present(cache: Path, subdir: str, members: tuple[str, ...]) -> bool:
    return all((cache / subdir / m).is_file() for m in members)


def _sdists(index: str) -> dict[str, dict]:
    """``{filename: file entry}`` from the PEP 691 JSON page of the project."""
    request = urllib.request.Request(
        index, headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            page = json.load(response)
    except (OSError, ValueError) as exc:
        raise FetchError(str(exc)) from exc
    return {f["filename"]: f for f in page.get("files", []) if isinstance(f, dict)}


def fetch(files: dict[str, dict], version: str, members: tuple[str, ...], dest: Path) -> None:
    """Extract ``members`` of vLLM ``version``'s sdist into ``dest``."""
    name = f"vllm-{version}.tar.gz"
    entry = files.get(name)
    if entry is None or "sha256" not in entry.get("hashes", {}):
        raise FetchError(f"{name} (with a sha256) is not on the index")
    print(f"downloading {name} ({entry.get('size', 0) / 1e6:.0f} MB)...", flush=True)
    with tempfile.TemporaryDirectory(prefix="vllm-sdist-") as tmp:
        archive = Path(tmp) / name
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(entry["url"], timeout=TIMEOUT_S) as response, \
                    archive.open("wb") as out:  # fmt: skip
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except OSError as exc:
            raise FetchError(str(exc)) from exc
        if digest.hexdigest() != entry["hashes"]["sha256"]:
            raise FetchError(f"{name}: sha256 does not match the index")
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in members:
                    source = tar.extractfile(f"vllm-{version}/{member}")
                    if source is None:
                        raise FetchError(f"{member} is not a file in {name}")
                    target = dest / member
                    target.parent.mkdir(parents=True, exist_ok=True)
                    part = target.with_suffix(".part")
                    with source, part.open("wb") as out:
                        shutil.copyfileobj(source, out)
                    part.replace(target)
        except (KeyError, tarfile.TarError, OSError) as exc:
            raise FetchError(f"reading {name}: {exc}") from exc
    (dest / "VERSION").write_text(version + "\n")
    print(f"vLLM {version} kv_events extracted to {dest}")


if __name__ == "__main__":
    sys.exit(main())
