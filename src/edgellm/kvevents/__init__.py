"""The KV event pipeline: engines' KV cache events into the prefix index.

The path of a KV batch, top to bottom::

    engine: KVEventPublisher (a socket thread: PUB + ROUTER replay)      publisher.py
      --tcp--> PodSubscriber (a socket thread per pod: SUB + DEALER)      subscriber.py
      -> PodStream: order, gaps, replays, restarts (no sockets)          stream.py
      -> PodFeed.submit: the pod's lane, bounded, into the apply queue     feed.py
      -> EventApplier (one thread): BatchDecoder -> PrefixIndex calls    handler.py
    KVEventManager: one subscriber (per rank) per qualifying pod of a     manager.py
    pod provider; ScoreServer reads the index                             http.py

- ``publisher.KVEventPublisher``: vLLM-compatible PUB + ROUTER replay publisher;
- ``subscriber.PodSubscriber``: one pod's client (live + replay, gaps, restarts, overflow);
- ``feed.PodFeed``: what a subscriber and the apply thread share for one pod;
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
