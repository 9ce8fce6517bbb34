"""The KV event pipeline: engines' KV cache events into the prefix index.

- ``publisher.KVEventPublisher``: vLLM-compatible PUB + ROUTER replay publisher;
- ``subscriber.PodSubscriber``: one pod's client (live + replay, gaps, restarts, overflow);
- ``handler.EventApplier``: the one thread that decodes batches and calls the index;
- ``manager.KVEventManager``: subscriptions per qualifying pod of a pod provider;
- ``metrics``: the ``kvcache_zmq_*`` series; ``http.ScoreServer``: /v1/score, /metrics,
  /healthz; ``commands``: ``edgellm kv-events``.
"""

from edgellm.kvevents.config import ManagerConfig, SubscriberConfig
from edgellm.kvevents.manager import KVEventManager
from edgellm.kvevents.publisher import KVEventPublisher, PublisherConfig

__all__ = ["KVEventManager", "KVEventPublisher", "ManagerConfig", "PublisherConfig",
           "SubscriberConfig"]  # fmt: skip
