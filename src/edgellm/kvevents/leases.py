"""Replicas of ``kv-events`` sharing one Redis split the pods between them with leases.

Each pod is followed by exactly one replica: the holder of its lease. Keys (one slot,
``{<ns>:leases}``, so that it also works on Redis Cluster):

==================================  ======  ================================================
``{ns:leases}:members``             zset    replica id -> when its membership expires (ms)
``{ns:leases}:l:<pod>``             string  ``"<replica> <epoch>"``, expiring (Redis' own
                                            expiry: a dead holder's lease simply lapses)
``{ns:leases}:epoch``               hash    pod -> the last epoch handed out
==================================  ======  ================================================

Every ``renew_interval`` (1 s) a replica renews its membership (ttl 3 s) and runs one CLAIM
script: the pods it should hold - those whose rendezvous hash over the live members puts
them on it - are taken if free (a new, higher epoch) or renewed if its own; pods it holds
but should not (a replica joined) are released. Times are Redis' (``TIME``), never the
replicas' clocks. A replica that dies stops renewing: its leases and membership lapse
within ``ttl`` and the survivors claim its pods on their next round, so a pod is taken
over within ``ttl + renew_interval`` (4 s by default).

Gaining a pod (``on_gain(pod, epoch)``) the manager raises the pod's fence in the index to
``epoch`` and resumes after the batch committed there (``RedisPrefixIndex.take_over``):
from then on the old holder's writes are refused (it may still be alive, cut off: its
renewals fail, and once ``ttl`` has passed without one it drops every pod itself). Losing
one (``on_lose(pod_key)``: released, taken by another, or a write refused by the fence)
stops following it at once, leaving its entries to the new holder.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge
from xxhash import xxh64_intdigest

from edgellm.discovery.pod import Pod

log = logging.getLogger(__name__)

__all__ = ["LeaseConfig", "PodLeases"]

# ARGV: me, ttl_ms. Returns the live members (own membership renewed).
_HEARTBEAT = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local k = KEYS[1]
redis.call('ZADD', k, now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
return redis.call('ZRANGE', k, 0, -1)
"""

# KEYS[1] = the epoch hash; ARGV: prefix, me, ttl_ms, n_claim, claim pods..., release pods...
# Returns per claimed pod its epoch if held by me now (taken or renewed), else 0.
_CLAIM = r"""
local prefix, me, ttl = ARGV[1], ARGV[2], ARGV[3]
local n = tonumber(ARGV[4])
local out = {}
for i = 5, 4 + n do
  local k = prefix .. ARGV[i]
  local v = redis.call('GET', k)
  if not v then
    local epoch = redis.call('HINCRBY', KEYS[1], ARGV[i], 1)
    redis.call('SET', k, me .. ' ' .. epoch, 'PX', ttl)
    out[#out + 1] = epoch
  else
    local holder, epoch = string.match(v, '^(.*) (%d+)$')
    if holder == me then
      redis.call('PEXPIRE', k, ttl)
      out[#out + 1] = tonumber(epoch)
    else
      out[#out + 1] = 0
    end
  end
end
for i = 5 + n, #ARGV do
  local k = prefix .. ARGV[i]
  local v = redis.call('GET', k)
  if v and string.match(v, '^(.*) %d+$') == me then redis.call('DEL', k) end
end
return out
"""

# KEYS[1] = the epoch hash; ARGV: pod, at_least. The pod's next epoch is above at_least
# (a fence found higher than the counter: the counter's Redis lost it).
_RAISE = r"""
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if cur < tonumber(ARGV[2]) then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class LeaseConfig:
    """How replicas share pods (see the module docstring)."""

    replica_id: str = field(default_factory=default_replica_id)
    namespace: str = "edgellm:kvi"
    ttl: float = 3.0
    renew_interval: float = 1.0

    def __post_init__(self) -> None:
        if not self.replica_id or " " in self.replica_id:
            raise ValueError("replica_id must be a non-empty string without spaces")
        if not 0 < self.renew_interval < self.ttl:
            raise ValueError("renew_interval must be > 0 and below ttl")


def owner(pod_key: str, members: list[str]) -> str | None:
    """The member a pod belongs on (rendezvous hashing: few pods move when members do)."""
    if not members:
        return None
    return max(members, key=lambda m: (xxh64_intdigest(f"{pod_key}\0{m}".encode()), m))


class PodLeases:
    """The lease keeper of one replica: a thread renewing, claiming and releasing."""

    def __init__(self, client: redis.Redis, config: LeaseConfig, *,
                 on_gain: Callable[[Pod, int], None], on_lose: Callable[[str], None],
                 registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self._redis = client
        self._on_gain = on_gain
        self._on_lose = on_lose
        tag = f"{{{config.namespace}:leases}}"
        self._members_key = f"{tag}:members"
        self._epoch_key = f"{tag}:epoch"
        self._lease_prefix = f"{tag}:l:"
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._claim = client.register_script(_CLAIM)
        self._raise = client.register_script(_RAISE)
        self._lock = threading.Lock()
        self._pods: dict[str, Pod] = {}  # tracked (qualifying) pods
        self.held: dict[str, int] = {}  # pod key -> epoch
        self._last_ok = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-leases", daemon=True)
        registry = registry if registry is not None else CollectorRegistry()
        self.m_held = Gauge("kvevents_lease_pods_held", "pods this replica follows",
                            registry=registry)
        self.m_members = Gauge("kvevents_lease_replicas", "live replicas sharing the pods",
                               registry=registry)
        self.m_gained = Counter("kvevents_lease_gained", "pod leases taken", registry=registry)
        self.m_lost = Counter("kvevents_lease_lost", "pod leases lost or released",
                              ["reason"], registry=registry)
        self.m_errors = Counter("kvevents_lease_errors", "lease rounds that failed",
                                registry=registry)

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> "PodLeases":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop renewing and release every lease held (a successor takes over at once)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        with self._lock:
            held = list(self.held)
            self.held.clear()
        try:
            if held:
                self._claim(keys=[self._epoch_key], args=[
                    self._lease_prefix, self.config.replica_id, 1, 0, *held])
            self._redis.zrem(self._members_key, self.config.replica_id)
        except redis.RedisError as exc:
            log.warning("could not release leases on stop: %s", exc)

    # --- pods (the manager's) --------------------------------------------------------

    def track(self, pod: Pod) -> None:
        with self._lock:
            self._pods[pod.pod_key] = pod

    def untrack(self, pod_key: str) -> None:
        """The pod is gone or no longer qualifies (its subscription is the manager's)."""
        with self._lock:
            self._pods.pop(pod_key, None)
            self.held.pop(pod_key, None)

    def lost(self, pod_key: str, reason: str = "fenced") -> None:
        """A write of the pod was refused by its fence: another replica holds it."""
        with self._lock:
            if self.held.pop(pod_key, None) is None:
                return
        self.m_lost.labels(reason).inc()
        self._on_lose(pod_key)

    def raise_epoch(self, pod_key: str, at_least: int) -> None:
        """The index holds a fence above the pod's epoch counter (its Redis lost it):
        the next claim gets an epoch above ``at_least``."""
        self._raise(keys=[self._epoch_key], args=[pod_key, at_least])

    # --- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.round()
                self._last_ok = time.monotonic()
            except redis.RedisError as exc:
                self.m_errors.inc()
                log.warning("lease round failed: %s", exc)
                if time.monotonic() - self._last_ok > self.config.ttl:
                    self._drop_all("unrenewed")  # another replica may hold them by now
            self._stop.wait(self.config.renew_interval)

    def round(self) -> None:
        """One renewal: membership, then claims and releases (public for tests)."""
        me = self.config.replica_id
        ttl_ms = int(self.config.ttl * 1000)
        members = [m.decode() for m in self._heartbeat(keys=[self._members_key],
                                                       args=[me, ttl_ms])]
        self.m_members.set(len(members))
        with self._lock:
            pods = dict(self._pods)
            held = dict(self.held)
        claim = sorted(k for k in pods if owner(k, members) == me)
        release = sorted(k for k in held if k not in claim)
        epochs = self._claim(keys=[self._epoch_key],
                             args=[self._lease_prefix, me, ttl_ms, len(claim), *claim, *release])
        for pod_key in release:
            self._forget(pod_key, "released")
        for pod_key, epoch in zip(claim, epochs):
            epoch = int(epoch)
            before = held.get(pod_key)
            if epoch and before is None:
                with self._lock:
                    if pod_key not in self._pods:
                        continue
                    self.held[pod_key] = epoch
                self.m_gained.inc()
                log.info("%s: took pod %s (epoch %d)", me, pod_key, epoch)
                self._on_gain(pods[pod_key], epoch)
            elif before is not None and epoch != before:
                self._forget(pod_key, "taken")
        self.m_held.set(len(self.held))

    def _forget(self, pod_key: str, reason: str) -> None:
        with self._lock:
            if self.held.pop(pod_key, None) is None:
                return
        self.m_lost.labels(reason).inc()
        log.info("%s: gave up pod %s (%s)", self.config.replica_id, pod_key, reason)
        self._on_lose(pod_key)

    def _drop_all(self, reason: str) -> None:
        with self._lock:
            held = list(self.held)
        for pod_key in held:
            self._forget(pod_key, reason)
