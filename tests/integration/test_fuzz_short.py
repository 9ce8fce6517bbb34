"""Short runs of ``bench/fuzz.py``'s fuzzers (it runs 1,000,000 inputs a parser): each
target in a process of its own, coverage-guided with atheris (plain random mutations of its
seeds where atheris cannot run), nothing found; the index's C extension under
AddressSanitizer, whose planted overflow must be reported first; a few hundred schema-driven
cases against the live HTTP APIs, none answered 500."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "bench")))

import _fuzz_asan  # noqa: E402
from fuzz import run_http, run_target  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("target, runs", [
    ("framer", 3_000), ("kv_events", 20_000), ("params", 20_000), ("gateway", 10_000),
    ("rows", 20_000),  # the installed build, checked against its model
])  # fmt: skip
def test_a_short_fuzz_run_finds_nothing(tmp_path, target, runs):
    out = run_target(target, runs, str(tmp_path))
    assert out["exit"] == 0 and out["crashes"] == 0 and out["hangs"] == 0, out
    assert out["inputs"] == runs, out


def test_the_c_extension_under_address_sanitizer(tmp_path):
    reason = _fuzz_asan.missing()
    if reason:
        pytest.skip(reason)
    canary = run_target("rows", 200_000, str(tmp_path),
                        so=_fuzz_asan.build(str(tmp_path), broken=True))  # fmt: skip
    assert canary["asan_reports"] >= 1 and canary["exit"] != 0, canary  # the sanitizer is live
    out = run_target("rows", 5_000, str(tmp_path), so=_fuzz_asan.build(str(tmp_path)))
    assert out["exit"] == 0 and out["asan_reports"] == 0 and out["crashes"] == 0, out
    assert out["inputs"] == 5_000 and out["coverage"], out  # C edges guided the search


def test_schema_driven_cases_against_the_live_apis(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("schemathesis")
    out = run_http(250, str(tmp_path), seed=3)
    for name, part in out.items():
        assert part["cases"] >= 250 and part["status_500"] == 0, (name, part)
        assert part["transport_errors"] == 0 and part["bad_error_shape"] == 0, (name, part)
        assert part["alive"] and part["tracebacks"] == 0, (name, part)
        assert part["statuses"].get("200", 0) > 0, (name, part)  # valid cases got through
