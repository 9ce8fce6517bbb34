"""Run one fuzz target in this process (a child of ``bench/fuzz.py`` or of the suite).

    python bench/_fuzz_run.py TARGET --runs N --stats FILE [--seed S] [--rows-so PATH]

With atheris (the ``test`` extra): libFuzzer's coverage-guided search over the target,
Python coverage of ``edgellm`` (and, with ``--rows-so``, the C edges of an
AddressSanitizer build of the index's ``_rows`` extension, loaded in place of the
installed one: run under ``LD_PRELOAD`` of atheris' ``asan_with_fuzzer.so``) guiding it,
started from the target's seeds and tokens. An input that runs over a second, twice, is a
hang (counted, kept as ``slow-*`` beside the stats file; libFuzzer ends a run stuck for 10 s).
The first crash stops the run: its input is kept as ``crash-*`` and the process exits
non-zero.

Without atheris: the same target on random mutations of its seeds (no coverage), every
crash counted, the run going on.

Either way ``FILE`` gets ``{"target", "inputs", "slowest_s", "seconds", "engine",
"crashes", "hangs"}`` (JSON) every 10,000 inputs and after the last one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _fuzz_targets import TARGETS  # noqa: E402

try:
    import atheris
except ImportError:  # the suite falls back to plain random inputs
    atheris = None


HANG_SECONDS = 1.0
"""An input that takes longer is a hang (counted; libFuzzer kills one stuck for 10 s)."""


class Counter:
    """Wraps the target: counts inputs, keeps the slowest, writes the stats file."""

    def __init__(self, target, runs: int, path: str, engine: str) -> None:
        self.target, self.runs, self.path, self.engine = target, runs, path, engine
        self.inputs = 0
        self.crashes = 0
        self.hangs = 0
        self.slowest = 0.0
        self.t0 = time.monotonic()

    def __call__(self, data: bytes) -> None:
        start = time.perf_counter()
        try:
            self.target(data)
        except BaseException:
            self.keep("crash", data)
            raise
        finally:
            spent = time.perf_counter() - start
            if spent > HANG_SECONDS:
                # On a shared machine a descheduled process looks slow: a hang is an input
                # that is slow again when run once more.
                again = time.perf_counter()
                try:
                    self.target(data)
                except BaseException:
                    pass
                spent = min(spent, time.perf_counter() - again)
                if spent > HANG_SECONDS:
                    self.hangs += 1
                    self.keep("slow", data)
            self.slowest = max(self.slowest, spent)
            self.inputs += 1
            if self.inputs % 10_000 == 0 or self.inputs >= self.runs:
                self.write()

    def keep(self, kind: str, data: bytes) -> None:
        """Save an input that crashed or ran too long beside the stats file."""
        name = f"{kind}-{self.target.name}-{hashlib.sha1(data).hexdigest()[:16]}"
        with open(os.path.join(os.path.dirname(os.path.abspath(self.path)), name), "wb") as f:
            f.write(data)

    def write(self) -> None:
        out = {"target": self.target.name, "engine": self.engine, "inputs": self.inputs,
               "crashes": self.crashes, "hangs": self.hangs, "slowest_s": round(self.slowest, 4),
               "seconds": round(time.monotonic() - self.t0, 1)}  # fmt: skip
        with open(self.path + ".tmp", "w") as f:
            json.dump(out, f)
        os.replace(self.path + ".tmp", self.path)


def _load_rows(path: str) -> None:
    """Put the extension at ``path`` in place of ``edgellm.kvindex._rows``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("edgellm.kvindex._rows", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["edgellm.kvindex._rows"] = module


def _escape(token: bytes) -> str:
    return "".join(chr(b) if 0x20 <= b < 0x7F and b not in (0x22, 0x5C) else f"\\x{b:02x}"
                   for b in token)  # fmt: skip


def _with_atheris(target, args) -> None:
    workdir = os.path.dirname(os.path.abspath(args.stats))
    corpus = os.path.join(workdir, f"corpus-{target.name}")
    os.makedirs(corpus, exist_ok=True)
    for i, seed in enumerate(target.seeds()):
        with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
            f.write(seed)
    argv = [sys.argv[0], corpus, f"-runs={args.runs}", "-timeout=10", f"-seed={args.seed}",
            f"-max_len={target.max_len}", "-rss_limit_mb=4096", "-print_final_stats=1",
            f"-artifact_prefix={workdir}/", "-timeout_exitcode=70", "-error_exitcode=77"]
    if target.tokens:
        path = os.path.join(workdir, f"{target.name}.dict")
        with open(path, "w") as f:
            f.writelines(f'"{_escape(t)}"\n' for t in target.tokens)
        argv.append(f"-dict={path}")
    counter = Counter(target, args.runs, args.stats, "atheris")
    mutate = getattr(target, "mutate", None)
    if mutate is not None:
        def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
            out = mutate(data, max_size, seed)
            return out if out is not None else atheris.Mutate(data, max_size)

        atheris.Setup(argv, counter, custom_mutator=custom_mutator)
    else:
        atheris.Setup(argv, counter)
    atheris.Fuzz()  # exits the process when done


def _mutate(rng: random.Random, data: bytes, max_len: int) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        pos = rng.randint(0, len(out))
        if op < 0.3 and out:
            out[min(pos, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif op < 0.55:
            out[pos:pos] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 8)))
        elif op < 0.8 and out:
            del out[pos : pos + rng.randint(1, 16)]
        else:
            out[pos:pos] = out[rng.randint(0, len(out)) :][: rng.randint(1, 64)]
    return bytes(out[:max_len])


def _plain(target, args) -> None:
    rng = random.Random(args.seed)
    seeds = target.seeds() or [b""]
    counter = Counter(target, args.runs, args.stats, "random")
    mutate = getattr(target, "mutate", None)
    pool = list(seeds)
    while counter.inputs < args.runs:
        base = rng.choice(pool)
        data = None
        if mutate is not None and rng.random() < 0.5:
            data = mutate(base, target.max_len, rng.getrandbits(32))
        if data is None:
            data = _mutate(rng, base, target.max_len)
        try:
            counter(data)
        except Exception:
            counter.crashes += 1
            if counter.crashes <= 3:
                print(f"crash on {data!r}:\n{traceback.format_exc()}", file=sys.stderr)
        if rng.random() < 0.01:
            pool.append(data)
            del pool[: max(0, len(pool) - 256)]
    counter.write()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--stats", required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rows-so", help="an ASan build of edgellm.kvindex._rows to fuzz")
    parser.add_argument("--plain", action="store_true", help="random inputs even with atheris")
    args = parser.parse_args()
    target = TARGETS[args.target]()
    if args.rows_so:
        _load_rows(args.rows_so)
    if atheris is None or args.plain:
        target.load()
        _plain(target, args)
        return 0
    with atheris.instrument_imports(include=["edgellm"]):
        target.load()
    _with_atheris(target, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
