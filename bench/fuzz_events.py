"""1,000,000 fuzzed and mutated payloads, plus malformed live frames and bogus seqs, with
valid batches interleaved, through a real publisher socket -> subscriber -> index.

    .venv/bin/python bench/fuzz_events.py [--payloads 1000000] [--seed 1]

The traffic and the checks are ``bench/_fuzz.py``'s: every malformed payload must be
counted as a decode error, every malformed frame as a protocol error, every inconsistent
event as an invalid event, every bogus seq as a stale batch; every valid batch applied
exactly once (no resync), the index equal to the engine's cache, no crash, no hang.

Last line: one JSON object (``"ok": true`` when all of that holds); exit status 1 if not.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _fuzz import run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payloads", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    out = run(args.payloads, seed=args.seed)
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
