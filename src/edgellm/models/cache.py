"""The cache of converted models: a GGUF file turned into a Hugging Face directory once.

Layout: ``<root>/<file stem>-<sha256 of the file, 16 hex>-tf<transformers version>/`` with a
``tokenizer/`` part (written by whoever needs it first: the gateway or the engine) and a
``model/`` part (the engine's dequantised weights). Each part is written into a temporary
directory and renamed into place, so a reader sees a whole part or none, and two processes
converting at once never mix their files.

``root`` is ``$EDGELLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/edgellm``, else
``~/.cache/edgellm``. A file's digest is remembered beside the cache (keyed by the file's
device, inode, size and modification time), so a restart does not read 90 MB again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from typing import Callable

_CHUNK = 1 << 20


def cache_root() -> str:
    explicit = os.environ.get("EDGELLM_CACHE_DIR")
    if explicit:
        return os.path.abspath(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "edgellm")


def transformers_version() -> str:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "none"


def file_digest(path: str, root: str | None = None) -> str:
    """The sha256 (hex) of ``path``'s content, memoised under ``root/digests.json``."""
    root = root or cache_root()
    st = os.stat(path)
    identity = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    memo_path = os.path.join(root, "digests.json")
    try:
        with open(memo_path, encoding="utf-8") as fh:
            memo = json.load(fh)
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(os.path.abspath(path))
    if isinstance(entry, dict) and entry.get("identity") == identity:
        digest = entry.get("sha256")
        if isinstance(digest, str) and len(digest) == 64:
            return digest
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    memo[os.path.abspath(path)] = {"identity": identity, "sha256": digest}
    os.makedirs(root, exist_ok=True)
    _write_atomically(memo_path, json.dumps(memo, indent=1, sort_keys=True))
    return digest


def converted_dir(gguf_path: str, root: str | None = None) -> str:
    """Where the converted copy of ``gguf_path`` lives (its parts may not exist yet)."""
    root = root or cache_root()
    stem = os.path.basename(gguf_path)
    stem = stem[: -len(".gguf")] if stem.endswith(".gguf") else stem
    digest = file_digest(gguf_path, root)
    return os.path.join(root, f"{stem}-{digest[:16]}-tf{transformers_version()}")


def ensure_part(directory: str, part: str, write: Callable[[str], None]) -> str:
    """``directory/part``, calling ``write(tmp_dir)`` to fill it first if it is missing."""
    final = os.path.join(directory, part)
    if os.path.isdir(final):
        return final
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{part}-", dir=directory)
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):  # not a lost race: a real failure
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_atomically(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
