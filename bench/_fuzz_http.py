"""Property-based runs of the HTTP APIs from their own OpenAPI documents (schemathesis).

:func:`run_api` reads ``<url>/openapi.json`` and, for every operation, draws cases with
schemathesis' strategies - valid bodies (positive) and bodies that break the schema
(negative), headers and query strings included - and sends each to the live server. Half of
the generation bodies get a model the server has (``models``), so that they reach past the
model check. Counted per API: cases sent, statuses, answers of status 500, error answers
not in OpenAI's ``{"error": {...}}`` shape, transport failures (the server reset or never
answered within ``timeout``), the slowest case. Cases the client cannot even send (a header
``requests`` refuses) are counted apart.
"""

from __future__ import annotations

import collections
import json
import random
import time
import warnings
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis import GenerationMode

_GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize",
                     "/v1/score")  # fmt: skip


class Tally:
    def __init__(self) -> None:
        self.cases = 0
        self.unsendable = 0
        self.status: collections.Counter[int] = collections.Counter()
        self.status_500: list[str] = []
        self.bad_error_shape: list[str] = []
        self.transport: list[str] = []
        self.slowest = 0.0

    def summary(self) -> dict[str, Any]:
        return {"cases": self.cases, "status_500": len(self.status_500),
                "bad_error_shape": len(self.bad_error_shape),
                "transport_errors": len(self.transport), "unsendable": self.unsendable,
                "slowest_s": round(self.slowest, 3),
                "statuses": {str(k): v for k, v in sorted(self.status.items())},
                "examples": (self.status_500 + self.bad_error_shape + self.transport)[:5]}  # fmt: skip


def _error_shaped(resp: requests.Response) -> bool:
    if resp.request.method == "HEAD":
        return True
    try:
        error = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)


def _send(case, base_url: str, headers: dict[str, str], models: list[str], rng: random.Random,
          tally: Tally, timeout: float) -> None:  # fmt: skip
    if models and isinstance(case.body, dict) and case.path in _GENERATION_PATHS \
            and rng.random() < 0.5:  # fmt: skip
        case.body["model"] = rng.choice(models)
    sent = {**(case.headers or {}), **headers} if rng.random() < 0.95 else dict(case.headers or {})
    start = time.monotonic()
    try:
        resp = case.call(base_url=base_url, headers=sent, timeout=timeout)
    except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, UnicodeError,
            ValueError):  # fmt: skip
        tally.unsendable += 1
        return
    except requests.exceptions.RequestException as exc:
        tally.cases += 1
        tally.transport.append(f"{case.method} {case.path}: {type(exc).__name__}: {exc}")
        return
    tally.slowest = max(tally.slowest, time.monotonic() - start)
    tally.cases += 1
    tally.status[resp.status_code] += 1
    what = f"{case.method} {case.path} {json.dumps(case.body, default=str)[:300]}"
    if resp.status_code == 500:
        tally.status_500.append(f"{resp.status_code} {what}: {resp.text[:300]}")
    if resp.status_code >= 400 and not _error_shaped(resp):
        tally.bad_error_shape.append(f"{resp.status_code} {what}: {resp.text[:200]}")


def run_api(base_url: str, cases: int, *, headers: dict[str, str] | None = None,
            models: list[str] = (), seed_value: int = 1, timeout: float = 60.0) -> dict[str, Any]:  # fmt: skip
    """At least ``cases`` cases against the API at ``base_url`` (see the module docstring)."""
    headers = headers or {}
    spec = requests.get(base_url + "/openapi.json", headers=headers, timeout=10).json()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        schema = schemathesis.openapi.from_dict(spec)
    operations = [r.ok() for r in schema.get_all_operations()]
    # Operations with a body take the cases; the others need few to exhaust what they take.
    bodies = [op for op in operations if op.method.upper() == "POST"]
    plain = [op for op in operations if op.method.upper() != "POST"]
    tally = Tally()
    rng = random.Random(seed_value)
    t0 = time.monotonic()
    round_ = 0
    while tally.cases < cases:
        left = cases - tally.cases
        per_op = max(50, left // max(1, 2 * len(bodies)) + 1)
        for op, budget in [(op, per_op) for op in bodies] + [(op, 50) for op in plain]:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _drive(op, mode, budget, seed_value * 1000 + round_, base_url, headers,
                       list(models), rng, tally, timeout)  # fmt: skip
        round_ += 1
    out = tally.summary()
    out["seconds"] = round(time.monotonic() - t0, 1)
    out["operations"] = [op.label for op in operations]
    return out


def _drive(op, mode, budget: int, seed_value: int, base_url: str, headers: dict[str, str],
           models: list[str], rng: random.Random, tally: Tally, timeout: float) -> None:  # fmt: skip
    try:
        strategy = op.as_strategy(generation_mode=mode)
    except Exception:  # an operation with nothing to break in negative mode
        return

    @seed(seed_value)
    @settings(max_examples=budget, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=False)  # fmt: skip
    @given(case=strategy)
    def one(case) -> None:
        _send(case, base_url, headers, models, rng, tally, timeout)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            one()
    except requests.exceptions.ConnectionError as exc:
        tally.transport.append(f"{op.label}: {exc}")
    except Exception as exc:  # hypothesis gave up on the strategy (Unsatisfiable...)
        if type(exc).__name__ not in ("Unsatisfiable", "FailedHealthCheck", "InvalidArgument"):
            raise
