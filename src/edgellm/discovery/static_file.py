"""Pods from a JSON or YAML file, re-read when it changes (for a plain host).

The file holds a list of pods, or ``{"pods": [...]}``; each pod is a mapping::

    {"pod_key": "vllm-0", "ip": "127.0.0.1", "model": "llama",
     "lora_id": -1, "pub_port": 5557, "router_port": 5558}       # last three optional

and may also set ``labels`` (mapping), ``phase`` (default ``Running``),
``kv_events_enabled`` (default true) and ``dp_size`` (data-parallel ranks, default 1:
rank r publishes on ``pub_port + r`` / ``router_port + r``). Unknown keys are an error (a typo must not silently
disable a pod). ``.json`` files are parsed as JSON, anything else as YAML. An empty file
(nothing but blanks, or a YAML document that is only comments) is invalid, in both forms:
it is what a save caught between truncating and writing looks like. No pods is an explicit
``[]`` (or ``{"pods": []}``).

:class:`FilePodProvider` loads the file at ``start()`` (raising :class:`PodFileError` if it
is missing or invalid), then checks it every ``poll_interval`` seconds. A change (size,
mtime, inode or content) is applied - the difference (deletions, updates, additions) to
its listeners - only once the file has stayed the same for ``settle`` seconds (1 s), as
seen by two checks: a file being written is never read half-way. A later invalid or
missing file is logged and ignored: the last good set stays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from edgellm.discovery.pod import DEFAULT_PUB_PORT, DEFAULT_ROUTER_PORT, RUNNING, Pod
from edgellm.discovery.provider import StaticPodProvider

log = logging.getLogger(__name__)

_FIELDS = {"pod_key", "ip", "model", "lora_id", "pub_port", "router_port", "labels", "phase",
           "kv_events_enabled", "dp_size"}  # fmt: skip


class PodFileError(ValueError):
    """The pods file cannot be read or does not describe pods."""


def parse_pods(text: str, *, as_json: bool = False) -> list[Pod]:
    """The pods described by ``text`` (JSON or YAML); raises :class:`PodFileError`."""
    if not text.strip():
        raise PodFileError("the file is empty (write [] for no pods)")
    try:
        data = json.loads(text) if as_json else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise PodFileError(f"not valid {'JSON' if as_json else 'YAML'}: {exc}") from None
    if isinstance(data, dict) and set(data) == {"pods"}:
        data = data["pods"]
    if data is None:
        raise PodFileError("the file holds no document (write [] for no pods)")
    if not isinstance(data, list):
        raise PodFileError("expected a list of pods or {\"pods\": [...]}")
    pods: list[Pod] = []
    seen: set[str] = set()
    for i, entry in enumerate(data):
        pod = _pod(entry, i)
        if pod.pod_key in seen:
            raise PodFileError(f"pod {i}: duplicate pod_key {pod.pod_key!r}")
        seen.add(pod.pod_key)
        pods.append(pod)
    return pods


def _pod(entry: Any, i: int) -> Pod:
    if not isinstance(entry, dict):
        raise PodFileError(f"pod {i}: expected a mapping")
    unknown = set(entry) - _FIELDS
    if unknown:
        raise PodFileError(f"pod {i}: unknown keys {sorted(unknown)}")
    for key in ("pod_key", "ip", "model"):
        if not isinstance(entry.get(key), str):
            raise PodFileError(f"pod {i}: {key!r} must be a string")
    labels = entry.get("labels") or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise PodFileError(f"pod {i}: labels must map strings to strings")
    enabled = entry.get("kv_events_enabled", True)
    if not isinstance(enabled, bool):
        raise PodFileError(f"pod {i}: kv_events_enabled must be true or false")
    phase = entry.get("phase", RUNNING)
    if not isinstance(phase, str):
        raise PodFileError(f"pod {i}: phase must be a string")
    try:
        return Pod(
            pod_key=entry["pod_key"],
            ip=entry["ip"],
            model=entry["model"],
            lora_id=entry.get("lora_id", -1),
            pub_port=entry.get("pub_port", DEFAULT_PUB_PORT),
            router_port=entry.get("router_port", DEFAULT_ROUTER_PORT),
            labels=labels,
            phase=phase,
            kv_events_enabled=enabled,
            dp_size=entry.get("dp_size", 1),
        )
    except ValueError as exc:
        raise PodFileError(f"pod {i}: {exc}") from None


def read_pods_file(path: str | os.PathLike) -> list[Pod]:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise PodFileError(f"cannot read {p}: {exc}") from None
    return _parse_file(p, data)


def _parse_file(path: Path, data: bytes) -> list[Pod]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PodFileError(f"cannot read {path}: {exc}") from None
    return parse_pods(text, as_json=path.suffix.lower() == ".json")


class FilePodProvider(StaticPodProvider):
    """A :class:`StaticPodProvider` kept equal to a file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, *, poll_interval: float = 1.0,
                 settle: float = 1.0):  # fmt: skip
        super().__init__()
        if poll_interval <= 0 or settle < 0:
            raise ValueError("poll_interval must be > 0 and settle >= 0")
        self.path = Path(path)
        self.poll_interval = poll_interval
        self.settle = settle
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._applied: tuple | None = None  # the state of the file last applied (or refused)
        self._candidate: tuple | None = None  # (state, first seen) of a change not yet settled
        self.reloads = 0
        self.errors = 0

    def start(self) -> "FilePodProvider":
        if self._thread is not None:
            return self
        state, data = self._read()
        if data is None:
            raise PodFileError(f"cannot read {self.path}")
        self.replace(_parse_file(self.path, data))
        self._applied = state
        self._thread = threading.Thread(target=self._watch, name="pods-file", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)

    def _read(self) -> tuple[tuple | None, bytes | None]:
        """The file's state (inode, size, mtime, content hash) and content; None if absent."""
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except OSError:
            return None, None
        return (st.st_ino, st.st_size, st.st_mtime_ns, hashlib.sha256(data).digest()), data

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_interval):
            self.check()

    def check(self, now: float | None = None) -> bool:
        """Look at the file; apply it if it changed and has settled. True if reloaded."""
        now = time.monotonic() if now is None else now
        state, data = self._read()
        if state == self._applied:
            self._candidate = None
            return False
        if self._candidate is None or self._candidate[0] != state:
            self._candidate = (state, now)  # changed (again): wait until it stays so
            return False
        if now - self._candidate[1] < self.settle:
            return False
        self._candidate = None
        self._applied = state
        try:
            if data is None:
                raise PodFileError(f"cannot read {self.path}")
            pods = _parse_file(self.path, data)
        except PodFileError as exc:
            self.errors += 1
            log.error("pods file %s ignored, keeping %d pods: %s", self.path, len(self.pods()), exc)
            return False
        self.replace(pods)
        self.reloads += 1
        log.info("pods file %s reloaded: %d pods", self.path, len(pods))
        return True
