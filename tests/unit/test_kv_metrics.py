"""The kvcache_zmq_* series: AIBrix's names, types and labels; removal per pod."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from edgellm.kvevents.metrics import KVEventMetrics

AIBRIX_SERIES = {
    "kvcache_zmq_connections_total": ("counter", set()),
    "kvcache_zmq_disconnections_total": ("counter", set()),
    "kvcache_zmq_reconnect_attempts_total": ("counter", set()),
    "kvcache_zmq_events_received_total": ("counter", {"event_type"}),
    "kvcache_zmq_events_processed_total": ("counter", {"event_type"}),
    "kvcache_zmq_event_processing_duration_seconds": ("histogram", set()),
    "kvcache_zmq_missed_events_total": ("counter", set()),
    "kvcache_zmq_replay_requests_total": ("counter", set()),
    "kvcache_zmq_errors_total": ("counter", {"error_type"}),
    "kvcache_zmq_connection_status": ("gauge", set()),
    "kvcache_zmq_last_sequence_id": ("gauge", set()),
}


def _families(registry):
    out = {}
    for fam in registry.collect():
        for sample in fam.samples:
            out.setdefault(sample.name, (fam.type, fam.name, set()))[2].update(sample.labels)
    return out


def _touch(pod):
    pod.connections.inc()
    pod.disconnections.inc()
    pod.reconnect_attempts.inc()
    pod.received["BlockStored"].inc(2)
    pod.processed["BlockRemoved"].inc()
    pod.processing_duration.observe(2e-5)
    pod.missed_events.inc(3)
    pod.replay_requests.inc()
    pod.error("decode")
    pod.connection_status.set(1)
    pod.last_sequence_id.set(41)
    pod.resync("restart")


def test_the_eleven_series_have_aibrix_names_types_and_labels():
    registry = CollectorRegistry()
    _touch(KVEventMetrics(registry).for_pod("ns/a"))
    families = _families(registry)
    for name, (kind, extra) in AIBRIX_SERIES.items():
        sample_name = name + ("_count" if kind == "histogram" else "")
        assert sample_name in families, name
        fam_type, _, labels = families[sample_name]
        assert fam_type == kind, name
        assert labels - {"le"} == {"pod_key"} | extra, name
    text = generate_latest(registry).decode()
    assert 'kvcache_zmq_events_received_total{event_type="BlockStored",pod_key="ns/a"} 2.0' in text
    assert 'kvcache_zmq_errors_total{error_type="decode",pod_key="ns/a"} 1.0' in text
    assert 'kvcache_zmq_last_sequence_id{pod_key="ns/a"} 41.0' in text
    assert 'kvcache_zmq_event_processing_duration_seconds_bucket{le="5e-05",pod_key="ns/a"} 1.0' in text
    assert 'kvcache_zmq_resyncs_total{pod_key="ns/a",reason="restart"} 1.0' in text


def test_remove_deletes_every_series_of_that_pod_only():
    registry = CollectorRegistry()
    metrics = KVEventMetrics(registry)
    a, b = metrics.for_pod("ns/a"), metrics.for_pod("ns/b")
    _touch(a)
    _touch(b)
    a.remove()
    a.remove()
    a.error("late")  # a late increment does not resurrect the pod's series
    text = generate_latest(registry).decode()
    assert 'pod_key="ns/a"' not in text
    assert text.count('pod_key="ns/b"') > 20
    # a new client for the same pod starts from zero
    again = metrics.for_pod("ns/a")
    again.connections.inc()
    assert registry.get_sample_value("kvcache_zmq_connections_total", {"pod_key": "ns/a"}) == 1.0
