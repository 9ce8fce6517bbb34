"""An AddressSanitizer build of the index's C extension (``src/edgellm/kvindex/_rows.c``)
for the fuzzer, and how to run Python on it.

:func:`build` compiles the extension with clang, ``-fsanitize=address,fuzzer-no-link``
(ASan checks every memory access; libFuzzer's coverage counters on every edge, which
atheris' libFuzzer reads): the fuzzer's search is guided by the C code's branches.
``broken=True`` builds it with one byte too few in ``chain_hashes``' block buffer: a heap
overflow the run must report, which shows the sanitizer is live.

:func:`env` is the environment to run it under: atheris' ``asan_with_fuzzer.so``
preloaded (the ASan runtime must come first), Python's allocator off (``PYTHONMALLOC=
malloc``: every object a malloc block ASan watches), leak checks off (the interpreter
keeps memory to its exit by design).

Needs ``clang`` and its runtime (Debian: ``clang``, ``libclang-rt-14-dev``; ``make
asan-deps``); :func:`missing` says what is absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "edgellm",
                      "kvindex", "_rows.c")  # fmt: skip
_BROKEN = ("buf = PyMem_Malloc((size_t)(8 + width));", "buf = PyMem_Malloc((size_t)(7 + width));")


def _preload() -> str | None:
    try:
        import atheris
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(os.path.dirname(atheris.path())), "asan_with_fuzzer.so")
    if not os.path.isfile(path):  # wheels keep it beside the package or inside it
        path = os.path.join(atheris.path(), "asan_with_fuzzer.so")
    return path if os.path.isfile(path) else None


def missing() -> str | None:
    """Why the ASan run cannot happen here (None: it can)."""
    if shutil.which("clang") is None:
        return "clang is not installed (make asan-deps: Debian's clang and libclang-rt-14-dev)"
    if _preload() is None:
        return "atheris (with its asan_with_fuzzer.so) is not installed"
    return None


def build(workdir: str, *, broken: bool = False) -> str:
    """Compile the extension into ``workdir``; returns the ``.so`` path. Raises
    ``RuntimeError`` with the compiler's output if it fails."""
    with open(SOURCE) as f:
        code = f.read()
    if broken:
        assert _BROKEN[0] in code, "chain_hashes changed: update the canary"
        code = code.replace(*_BROKEN)
    name = "rows_broken" if broken else "rows_asan"
    src = os.path.join(workdir, f"{name}.c")
    with open(src, "w") as f:
        f.write(code)
    out = os.path.join(workdir, f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}")
    cmd = ["clang", "-shared", "-fPIC", "-O1", "-g", "-fno-omit-frame-pointer",
           "-fsanitize=address,fuzzer-no-link", f"-I{sysconfig.get_paths()['include']}",
           src, "-o", out]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"clang failed: {done.stderr[-2000:]}")
    return out


def env() -> dict[str, str]:
    """The environment of a Python run on an ASan build (see the module docstring)."""
    preload = _preload()
    assert preload is not None, missing()
    return {**os.environ, "LD_PRELOAD": preload, "PYTHONMALLOC": "malloc",
            "ASAN_OPTIONS": "detect_leaks=0:allocator_may_return_null=1"}


def command(so: str, runs: int, stats: str, seed: int = 1) -> list[str]:
    """The fuzz run of the ``rows`` target on the build at ``so``."""
    runner = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fuzz_run.py")
    return [sys.executable, runner, "rows", "--runs", str(runs), "--stats", stats,
            "--seed", str(seed), "--rows-so", so]  # fmt: skip
