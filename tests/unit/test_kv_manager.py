"""KVEventManager lifecycle and pod add/update/delete semantics (AIBrix §2 rows 1-4, 8)."""

from __future__ import annotations

import threading

import pytest
import zmq
from prometheus_client import CollectorRegistry

from kvfakes.reference_index import ReferenceIndex  # noqa: E402
from waits import wait_until  # noqa: E402

from edgellm.discovery.pod import Pod, pod_from_labels  # noqa: E402
from edgellm.discovery.provider import StaticPodProvider  # noqa: E402
from edgellm.kvevents.config import ManagerConfig, SubscriberConfig  # noqa: E402
from edgellm.kvevents.manager import KVEventManager  # noqa: E402


@pytest.fixture
def silent_port():
    """A port where something listens but never answers (no random numbers, no 5557)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield port
    sock.close(linger=0)


@pytest.fixture
def make_manager():
    made = []

    def make(pods=(), *, index=None, enabled=True, **cfg):
        provider = StaticPodProvider(pods)
        index = index if index is not None else ReferenceIndex()
        config = ManagerConfig(enabled=enabled, subscriber=SubscriberConfig(idle_probe_interval=0),
                               **cfg)  # fmt: skip
        manager = KVEventManager(provider, index, config=config, registry=CollectorRegistry())
        made.append(manager)
        return manager, provider, index

    yield make
    for m in made:
        m.stop()


def _pod(port: int, key: str = "ns/p", **kw) -> Pod:
    fields = dict(pod_key=key, ip="127.0.0.1", model="m", pub_port=port, router_port=port)
    fields.update(kw)
    return Pod(**fields)


def test_env_switches_both_needed():
    on = {"AIBRIX_PREFIX_CACHE_KV_EVENT_SYNC_ENABLED": "true",
          "AIBRIX_PREFIX_CACHE_USE_REMOTE_TOKENIZER": "TRUE"}  # fmt: skip
    assert ManagerConfig.from_env(on).enabled
    assert not ManagerConfig.from_env({}).enabled
    for key in on:
        assert not ManagerConfig.from_env({**on, key: "false"}).enabled
        assert not ManagerConfig.from_env({k: v for k, v in on.items() if k != key}).enabled


@pytest.mark.parametrize("value, on", [
    *((v, True) for v in ("1", "t", "T", "TRUE", "true", "True")),
    *((v, False) for v in ("0", "f", "F", "FALSE", "false", "False")),
    *((v, False) for v in ("", "yes", "on", "tRuE", " true", "2")),  # invalid: the default
])  # fmt: skip
def test_switches_read_as_go_parsebool_like_aibrix(value, on):
    env = {"AIBRIX_PREFIX_CACHE_KV_EVENT_SYNC_ENABLED": value,
           "AIBRIX_PREFIX_CACHE_USE_REMOTE_TOKENIZER": value}  # fmt: skip
    assert ManagerConfig.from_env(env).enabled is on


def test_default_config_reads_the_environment(monkeypatch, silent_port):
    monkeypatch.delenv("AIBRIX_PREFIX_CACHE_KV_EVENT_SYNC_ENABLED", raising=False)
    manager = KVEventManager(StaticPodProvider([_pod(silent_port)]), ReferenceIndex(),
                             registry=CollectorRegistry())  # fmt: skip
    assert not manager.enabled
    manager.start()
    assert manager.subscribed_pods() == []
    manager.on_pod_add(_pod(silent_port, "ns/q"))
    assert manager.subscribed_pods() == []
    manager.stop()


def test_disabled_manager_ignores_everything(make_manager, silent_port):
    manager, provider, index = make_manager([_pod(silent_port)], enabled=False)
    manager.start()
    provider.add(_pod(silent_port, "ns/other"))
    manager.on_pod_add(_pod(silent_port, "ns/x"))
    assert manager.subscribed_pods() == []
    assert index.calls == []


def test_start_subscribes_qualifying_pods_only(make_manager, silent_port):
    pods = [
        _pod(silent_port, "ns/ok"),
        _pod(silent_port, "ns/off", kv_events_enabled=False),
        _pod(silent_port, "ns/pending", phase="Pending"),
        _pod(silent_port, "ns/noip", ip=""),
        _pod(silent_port, "ns/nomodel", model=""),
    ]
    manager, _, _ = make_manager(pods)
    manager.start()
    assert manager.subscribed_pods() == ["ns/ok"]


def test_a_pod_whose_address_cannot_be_connected_is_logged_and_left(make_manager, silent_port,
                                                                    caplog):
    manager, provider, _ = make_manager([_pod(silent_port, "ns/bad", ip="not an ip")])
    manager.start()
    assert manager.subscribed_pods() == []
    assert "cannot subscribe to ns/bad" in caplog.text
    provider.add(_pod(silent_port, "ns/ok"))  # the manager goes on following the provider
    assert manager.subscribed_pods() == ["ns/ok"]


def test_start_waits_for_the_index(make_manager):
    index = ReferenceIndex(ready=False)
    manager, _, _ = make_manager(index=index, index_ready_timeout=20, index_ready_poll=0.05)
    timer = threading.Timer(0.3, lambda: setattr(index, "ready", True))
    timer.start()
    manager.start()
    assert manager.running
    timer.join()


def test_start_times_out_when_the_index_never_becomes_ready(make_manager):
    manager, _, _ = make_manager(index=ReferenceIndex(ready=False), index_ready_timeout=0.2,
                                 index_ready_poll=0.05)  # fmt: skip
    with pytest.raises(TimeoutError):
        manager.start()
    assert not manager.running


def test_start_twice_is_an_error_and_stop_is_idempotent(make_manager):
    manager, _, _ = make_manager()
    manager.start()
    with pytest.raises(RuntimeError):
        manager.start()
    manager.stop()
    manager.stop()
    assert not manager.running


def test_pod_add_is_idempotent(make_manager, silent_port):
    manager, provider, _ = make_manager()
    manager.start()
    pod = _pod(silent_port)
    provider.add(pod)
    first = manager.subscriber("ns/p")
    manager.on_pod_add(pod)
    assert manager.subscriber("ns/p") is first
    assert manager.subscribed_pods() == ["ns/p"]


def test_update_without_relevant_change_keeps_the_subscription(make_manager, silent_port):
    manager, provider, _ = make_manager([_pod(silent_port, labels={"a": "1"})])
    manager.start()
    first = manager.subscriber("ns/p")
    provider.add(_pod(silent_port, labels={"a": "2"}))
    assert manager.subscriber("ns/p") is first


@pytest.mark.parametrize("change", [{"ip": "127.0.0.2"}, {"model": "m2"}, {"lora_id": 3}])
def test_update_with_new_ip_or_context_resubscribes(make_manager, silent_port, change):
    manager, provider, index = make_manager([_pod(silent_port)])
    manager.start()
    first = manager.subscriber("ns/p")
    provider.add(_pod(silent_port, **change))
    second = manager.subscriber("ns/p")
    assert second is not None and second is not first
    assert second.pod.ip == change.get("ip", "127.0.0.1")
    wait_until(lambda: ("remove", "ns/p") in index.calls, 10, "old entries removed")


def test_update_to_not_qualifying_unsubscribes_and_back(make_manager, silent_port):
    manager, provider, index = make_manager([_pod(silent_port)])
    manager.start()
    provider.add(_pod(silent_port, phase="Failed"))
    assert manager.subscribed_pods() == []
    wait_until(lambda: ("remove", "ns/p") in index.calls, 10, "entries removed")
    provider.add(_pod(silent_port))
    assert manager.subscribed_pods() == ["ns/p"]


def test_delete_unsubscribes_removes_entries_and_metrics(make_manager, silent_port):
    manager, provider, index = make_manager([_pod(silent_port)])
    manager.start()
    registry = manager.registry
    wait_until(
        lambda: registry.get_sample_value("kvcache_zmq_replay_requests_total", {"pod_key": "ns/p"}),
        10, "the start replay request",
    )  # fmt: skip
    provider.remove("ns/p")
    assert manager.subscribed_pods() == []
    wait_until(lambda: ("remove", "ns/p") in index.calls, 10, "entries removed")
    names = {s.name for fam in registry.collect() for s in fam.samples if s.labels.get("pod_key") == "ns/p"}
    assert names == set()


def test_delete_of_an_unfollowed_pod_still_cleans_the_index(make_manager, silent_port):
    manager, provider, index = make_manager([_pod(silent_port, kv_events_enabled=False)])
    manager.start()
    provider.remove("ns/p")
    wait_until(lambda: ("remove", "ns/p") in index.calls, 10, "entries removed")


def test_stopped_manager_ignores_pod_events(make_manager, silent_port):
    manager, provider, _ = make_manager()
    manager.start()
    manager.stop()
    provider.add(_pod(silent_port))
    manager.on_pod_add(_pod(silent_port, "ns/q"))
    assert manager.subscribed_pods() == []


def test_subscriber_starts_by_clearing_the_pod_and_requesting_a_full_replay(make_manager, silent_port):
    manager, _, index = make_manager([_pod(silent_port)])
    manager.start()
    wait_until(lambda: ("clear", "ns/p", None) in index.calls, 10, "initial clear")
    assert manager.applied_seq("ns/p") is None
    assert manager.applied_seq("ns/unknown") is None


def test_pod_from_aibrix_labels():
    labels = {"model.aibrix.ai/name": "llama", "model.aibrix.ai/kv-events-enabled": "true",
              "model.aibrix.ai/lora-id": "7"}  # fmt: skip
    pod = pod_from_labels("ns/a", "10.0.0.1", labels, "Running")
    assert (pod.model, pod.lora_id, pod.kv_events_enabled, pod.qualifies) == ("llama", 7, True, True)
    assert pod.pub_endpoint == "tcp://10.0.0.1:5557" and pod.router_endpoint == "tcp://10.0.0.1:5558"
    for text, lora in [("x", -1), ("", -1), (" 4", -1), ("4_0", -1), ("+4", 4), ("-2", -2),
                       (str(1 << 63), -1), (str(-(1 << 63)), -(1 << 63))]:  # Go ParseInt
        lora_labels = {**labels, "model.aibrix.ai/lora-id": text}
        assert pod_from_labels("ns/a", "10.0.0.1", lora_labels, "Running").lora_id == lora, text
    assert not pod_from_labels("ns/a", "10.0.0.1", {**labels, "model.aibrix.ai/kv-events-enabled": "false"},
                               "Running").qualifies  # fmt: skip
    assert not pod_from_labels("ns/a", "", labels, "Running").qualifies


def test_pod_validation_and_ipv6_endpoint():
    assert Pod("k", "::1", "m").pub_endpoint == "tcp://[::1]:5557"
    with pytest.raises(ValueError):
        Pod("", "1.2.3.4", "m")
    with pytest.raises(ValueError):
        Pod("k", "1.2.3.4", "m", pub_port=0)
    with pytest.raises(ValueError):
        Pod("k", "1.2.3.4", "m", lora_id="1")  # type: ignore[arg-type]
    assert Pod("k", "1", "m", labels={"a": "b"}) == Pod("k", "1", "m", labels={"a": "b"})


def test_stop_while_waiting_for_the_index_makes_start_return(make_manager):
    manager, _, _ = make_manager(index=ReferenceIndex(ready=False), index_ready_timeout=60,
                                 index_ready_poll=0.05)  # fmt: skip
    done = threading.Event()

    def run():
        manager.start()
        done.set()

    t = threading.Thread(target=run)
    t.start()
    wait_until(lambda: manager._state == "starting", 10, "start waiting for the index")
    manager.stop()
    assert done.wait(10)
    t.join()
    assert not manager.running


def test_pod_changes_racing_start_and_stop_do_not_deadlock(silent_port):
    """Providers notify under their own lock; the manager must never hold its lock while
    taking the provider's (lock-order inversion)."""
    provider = StaticPodProvider()
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            provider.add(_pod(silent_port, f"ns/{i % 3}", kv_events_enabled=False))
            provider.remove(f"ns/{(i + 1) % 3}")
            i += 1

    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    try:
        for _ in range(30):
            worker = threading.Thread(target=lambda: KVEventManager(
                provider, ReferenceIndex(), config=ManagerConfig(enabled=True),
                registry=CollectorRegistry()).start().stop(), daemon=True)  # fmt: skip
            worker.start()
            worker.join(20)
            assert not worker.is_alive(), "start/stop deadlocked against the provider"
    finally:
        stop.set()
        churner.join(10)
