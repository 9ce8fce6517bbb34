#!/usr/bin/env python3
"""Fetch vLLM's own KV event code for the interop tests (best effort, idempotent).

Extracts exactly two files of the pinned vLLM wheel from PyPI into ``.cache/vllm/``:
``vllm/distributed/kv_events.py`` (the publisher and the event structs) and
``vllm/config/kv_events.py`` (its config class). Nothing else of vLLM is kept, and
``.cache/`` is git-ignored: vLLM's code is never committed here.

The wheel (~340 MB, CUDA builds only) is downloaded with ``pip download --no-deps`` into a
temporary directory that is removed afterwards; vLLM is never installed. Without network
the script says so and exits 0, so ``make test`` does not fail for that reason (the interop
tests then skip with a clear reason).

Usage: python scripts/fetch_vllm_kv_events.py [--dest DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VLLM_VERSION = "0.33.0"  # events: array-like batch, tagged-map events, 32-byte digest hashes
MEMBERS = ("vllm/distributed/kv_events.py", "vllm/config/kv_events.py")
ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=ROOT / ".cache" / "vllm")
    args = parser.parse_args(argv)
    dest: Path = args.dest
    if all((dest / m).is_file() for m in MEMBERS):
        print(f"vLLM {VLLM_VERSION} kv_events already in {dest}")
        return 0
    with tempfile.TemporaryDirectory(prefix="vllm-wheel-") as tmp:
        print(f"downloading the vllm=={VLLM_VERSION} wheel (no dependencies, ~340 MB)...",
              flush=True)  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "-q", "-d", tmp, f"vllm=={VLLM_VERSION}"],
            capture_output=True, text=True,
        )  # fmt: skip
        wheels = sorted(Path(tmp).glob("vllm-*.whl"))
        if proc.returncode != 0 or not wheels:
            reason = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            print(f"could not download vLLM ({reason}); the vLLM interop tests will skip")
            return 0
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                for member in MEMBERS:
                    target = dest / member
                    target.parent.mkdir(parents=True, exist_ok=True)
                    part = target.with_suffix(".part")
                    part.write_bytes(wheel.read(member))
                    part.replace(target)
        except (KeyError, zipfile.BadZipFile, OSError) as exc:
            print(f"could not extract vLLM's kv_events from {wheels[0].name}: {exc}; "
                  "the vLLM interop tests will skip")  # fmt: skip
            return 0
    (dest / "VERSION").write_text(VLLM_VERSION + "\n")
    print(f"vLLM {VLLM_VERSION} kv_events extracted to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
