"""Cache-aware routing: pick the ready pod for a prompt from prefix matches and load.

Two policies (``RouterConfig.policy``):

``"aibrix"`` (default; AIBrix ``prefix-cache`` router). Its load is a pod's requests in
flight (``PodLoad.in_flight``: running + waiting, what AIBrix's gateway counts per pod):
  1. if ``max(in_flight) - min(in_flight) > imbalance_threshold`` over the ready pods, the
     least loaded pod wins (reason ``"imbalance"``): a hot pod must not keep every request
     of a popular prefix;
  2. otherwise, among the pods whose load is ``<= mean + std_factor * sigma``, the one
     with the longest prefix match wins, then the less loaded one (reason
     ``"prefix-match"``);
  3. no candidate holds any of the prompt: the least loaded pod (reason ``"least-loaded"``).

``"weighted"`` (llm-d style scorers): ``score = w_prefix * matched_fraction + w_queue *
(1 - waiting / max_waiting) + w_kv * (1 - kv_utilisation)``, weights ``2:1:1`` by default;
the highest score wins (reason ``"weighted"``).

Ties always fall to fewer requests in flight, then fewer waiting, then the smaller pod
key, so the same inputs give the same choice on every replica.

Env (``RouterConfig.from_env``): ``EDGELLM_ROUTER_POLICY``, ``EDGELLM_ROUTER_WEIGHTS``
(``"prefix:queue:kv"``), and AIBrix's ``AIBRIX_PREFIX_CACHE_POD_RUNNING_REQUEST_IMBALANCE_ABS_COUNT``
(16) and ``AIBRIX_PREFIX_CACHE_STANDARD_DEVIATION_FACTOR`` (2).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

from edgellm.kvindex.api import ContextKey, PodMatch, PrefixIndex

__all__ = ["PodLoad", "RouteDecision", "Router", "RouterConfig", "NoReadyPod"]


class NoReadyPod(LookupError):
    """``route`` was given no ready pod."""


@dataclass(frozen=True, slots=True)
class PodLoad:
    """A pod's load as its engine (or the gateway's own count) reports it.

    Raises ``ValueError`` for negative counts or a utilisation outside 0..1.
    """

    running: int = 0
    """Requests being decoded."""
    waiting: int = 0
    """Requests queued."""
    kv_utilisation: float = 0.0
    """Share of KV cache blocks in use, 0..1."""

    @property
    def in_flight(self) -> int:
        """Requests sent to the pod and not finished: running + waiting."""
        return self.running + self.waiting

    def __post_init__(self) -> None:
        for name in ("running", "waiting"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"PodLoad.{name} must be an int >= 0, got {value!r}")
        kv = self.kv_utilisation
        if isinstance(kv, bool) or not isinstance(kv, (int, float)) or not 0.0 <= kv <= 1.0:
            raise ValueError(f"PodLoad.kv_utilisation must be in 0..1, got {self.kv_utilisation!r}")


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Which policy and its knobs; validated on construction."""

    policy: Literal["aibrix", "weighted"] = "aibrix"
    imbalance_threshold: int = 16
    std_factor: float = 2.0
    weights: tuple[float, float, float] = (2.0, 1.0, 1.0)
    """prefix : queue : kv-utilisation, for ``"weighted"``."""

    def __post_init__(self) -> None:
        if self.policy not in ("aibrix", "weighted"):
            raise ValueError(f"unknown routing policy {self.policy!r}: 'aibrix' or 'weighted'")
        threshold = self.imbalance_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
            raise ValueError(f"imbalance_threshold must be an int >= 0, got {threshold!r}")
        if not _finite_at_least_zero(self.std_factor):
            raise ValueError(f"std_factor must be a finite number >= 0, got {self.std_factor!r}")
        weights = tuple(self.weights)
        if len(weights) != 3 or not all(map(_finite_at_least_zero, weights)) or not any(weights):
            raise ValueError(f"weights must be three finite numbers >= 0, not all zero, "
                             f"got {self.weights!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "RouterConfig":
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        try:
            if env.get("EDGELLM_ROUTER_POLICY"):
                values["policy"] = env["EDGELLM_ROUTER_POLICY"].strip()
            if env.get("EDGELLM_ROUTER_WEIGHTS"):
                parts = tuple(float(p) for p in env["EDGELLM_ROUTER_WEIGHTS"].split(":"))
                values["weights"] = parts
            name = "AIBRIX_PREFIX_CACHE_POD_RUNNING_REQUEST_IMBALANCE_ABS_COUNT"
            if env.get(name):
                values["imbalance_threshold"] = int(env[name])
            if env.get("AIBRIX_PREFIX_CACHE_STANDARD_DEVIATION_FACTOR"):
                values["std_factor"] = float(env["AIBRIX_PREFIX_CACHE_STANDARD_DEVIATION_FACTOR"])
        except ValueError as exc:
            raise ValueError(f"bad router setting: {exc}") from None
        return cls(**values)  # validated in __post_init__


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """The chosen pod and why."""

    pod_key: str
    reason: str
    """``"imbalance"``, ``"prefix-match"``, ``"least-loaded"`` or ``"weighted"``."""
    matched_blocks: int
    """Blocks of the prompt the chosen pod holds."""
    prompt_blocks: int
    """Full blocks of the prompt in its context's block size (from the index's matches; the
    router's ``block_size`` when no pod it asked about holds any)."""
    detail: str = ""
    scores: Mapping[str, float] = field(default_factory=dict)
    """Per candidate pod (``"weighted"``: its score; ``"prefix-match"``: its percent)."""


class Router:
    """Scores ready pods for a prompt; the index is only read.

    Raises ``ValueError`` for a ``block_size`` below 1.
    """

    def __init__(self, index: PrefixIndex, config: RouterConfig | None = None,
                 block_size: int = 16) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.index = index
        self.config = config if config is not None else RouterConfig()
        self.block_size = block_size
        """Only reports ``prompt_blocks`` when no pod holds any of the prompt. The index hashes
        with its context's own block size, and whenever a pod matches, ``prompt_blocks``
        and the weighted prefix term come from that match (``PodMatch.percent``)."""

    def route(self, context: ContextKey, token_ids: Sequence[int],
              loads: Mapping[str, PodLoad]) -> RouteDecision:
        """Pick one of ``loads``' pods (the ready ones) for ``token_ids``.

        Raises :class:`NoReadyPod` when ``loads`` is empty.
        """
        if not loads:
            raise NoReadyPod(f"no ready pod for {context}")
        pods = sorted(loads)
        if self.config.policy == "weighted":
            matches = self.index.match_prefix(context, token_ids, pods)
            return self._weighted(pods, loads, matches, self._prompt_blocks(matches, token_ids))
        in_flight = [loads[p].in_flight for p in pods]
        spread = max(in_flight) - min(in_flight)
        if spread > self.config.imbalance_threshold:
            pod = min(pods, key=lambda p: _load_key(p, loads))
            matches = self.index.match_prefix(context, token_ids, [pod])
            return RouteDecision(pod, "imbalance", _blocks(matches, pod),
                                 self._prompt_blocks(matches, token_ids),
                                 f"in-flight spread {spread} > {self.config.imbalance_threshold}")
        mean = sum(in_flight) / len(in_flight)
        sigma = math.sqrt(sum((r - mean) ** 2 for r in in_flight) / len(in_flight))
        ceiling = mean + self.config.std_factor * sigma
        candidates = [p for p in pods if loads[p].in_flight <= ceiling]
        matches = self.index.match_prefix(context, token_ids, candidates)
        prompt_blocks = self._prompt_blocks(matches, token_ids)
        held = [p for p in candidates if _blocks(matches, p) > 0]
        if held:
            pod = min(held, key=lambda p: (-matches[p].matched_blocks, *_load_key(p, loads)))
            return RouteDecision(
                pod, "prefix-match", matches[pod].matched_blocks, prompt_blocks,
                f"{matches[pod].percent:.1f}% of the prompt among {len(candidates)} pods "
                f"with in-flight <= {ceiling:.1f}",
                {p: matches[p].percent for p in held})
        pod = min(candidates, key=lambda p: _load_key(p, loads))
        return RouteDecision(pod, "least-loaded", 0, prompt_blocks,
                             f"no candidate holds the prompt's first block ({len(candidates)} "
                             f"pods with in-flight <= {ceiling:.1f})")

    def _weighted(self, pods: list[str], loads: Mapping[str, PodLoad],
                  matches: Mapping[str, PodMatch], prompt_blocks: int) -> RouteDecision:
        w_prefix, w_queue, w_kv = self.config.weights
        max_waiting = max(loads[p].waiting for p in pods)
        scores = {}
        for p in pods:
            load = loads[p]
            match = matches.get(p)
            prefix = match.percent / 100.0 if match is not None else 0.0
            queue = 1.0 - load.waiting / max_waiting if max_waiting else 1.0
            kv = 1.0 - load.kv_utilisation
            scores[p] = w_prefix * prefix + w_queue * queue + w_kv * kv
        pod = min(pods, key=lambda p: (-scores[p], *_load_key(p, loads)))
        return RouteDecision(pod, "weighted", _blocks(matches, pod), prompt_blocks,
                             f"score {scores[pod]:.3f} (weights {w_prefix:g}:{w_queue:g}:{w_kv:g})",
                             scores)

    def _prompt_blocks(self, matches: Mapping[str, PodMatch], token_ids: Sequence[int]) -> int:
        """The prompt's full blocks in its context's block size, read off a match (percent =
        100 * matched / prompt blocks); with no match, in the router's ``block_size``."""
        for match in matches.values():
            if match.matched_blocks > 0 and match.percent > 0:
                return round(100.0 * match.matched_blocks / match.percent)
        return len(token_ids) // self.block_size


def _finite_at_least_zero(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)


def _blocks(matches: Mapping[str, PodMatch], pod: str) -> int:
    match = matches.get(pod)
    return match.matched_blocks if match is not None else 0


def _load_key(pod: str, loads: Mapping[str, PodLoad]) -> tuple[int, int, str]:
    """Less loaded first: fewer in flight, then fewer waiting, then the pod key."""
    load = loads[pod]
    return (load.running + load.waiting, load.waiting, pod)
