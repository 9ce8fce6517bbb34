"""The Kubernetes provider with the real ``kubernetes`` client against a fake API server."""

from __future__ import annotations


import pytest
from kubernetes import client as k8s

from kvfakes.fake_k8s import FakeKubeAPI  # noqa: E402
from waits import wait_until  # noqa: E402

from edgellm.discovery.k8s import KubernetesPodProvider, pod_from_k8s  # noqa: E402

LABELS = {"model.aibrix.ai/name": "llama", "model.aibrix.ai/kv-events-enabled": "true"}


class Recorder:
    def __init__(self):
        self.events: list[tuple] = []

    def on_pod_add(self, pod):
        self.events.append(("add", pod.pod_key, pod.ip))

    def on_pod_update(self, old, new):
        self.events.append(("update", new.pod_key, old.ip, new.ip))

    def on_pod_delete(self, pod):
        self.events.append(("delete", pod.pod_key))


@pytest.fixture
def api():
    with FakeKubeAPI() as fake:
        yield fake


def _provider(api: FakeKubeAPI, **kw) -> KubernetesPodProvider:
    conf = k8s.Configuration()
    conf.host = api.url
    return KubernetesPodProvider(k8s.ApiClient(conf), watch_timeout=kw.pop("watch_timeout", 5),
                                 retry_delay=0.05, **kw)  # fmt: skip


def test_list_then_watch_add_modify_delete(api):
    api.apply(api.pod("a", labels=LABELS, ip="10.0.0.1"))
    provider = _provider(api, namespace="default")
    rec = Recorder()
    provider.add_listener(rec)
    provider.start()
    try:
        assert [p.pod_key for p in provider.pods()] == ["default/a"]
        pod = provider.get_pod("default/a")
        assert (pod.model, pod.ip, pod.qualifies, pod.lora_id) == ("llama", "10.0.0.1", True, -1)
        api.apply(api.pod("b", labels=LABELS, ip="10.0.0.2"))
        api.apply(api.pod("a", labels=LABELS, ip="10.0.0.9"))
        api.delete("default", "b")
        api.apply(api.pod("c", ns="other", labels=LABELS))  # another namespace: not ours
        wait_until(lambda: ("delete", "default/b") in rec.events, 10, "the delete event")
        assert rec.events == [
            ("add", "default/a", "10.0.0.1"),
            ("add", "default/b", "10.0.0.2"),
            ("update", "default/a", "10.0.0.1", "10.0.0.9"),
            ("delete", "default/b"),
        ]
        assert provider.resource_version == str(api.rv - 1)
    finally:
        provider.stop()


def test_all_namespaces_and_label_selector(api):
    api.apply(api.pod("a", ns="x", labels=LABELS))
    api.apply(api.pod("b", ns="y", labels={"other": "1"}))
    provider = _provider(api, label_selector="model.aibrix.ai/kv-events-enabled=true").start()
    try:
        assert [p.pod_key for p in provider.pods()] == ["x/a"]
        api.apply(api.pod("c", ns="z", labels=LABELS))
        wait_until(lambda: provider.get_pod("z/c") is not None, 10, "z/c")
        assert any("labelSelector=" in r for r in api.requests)
    finally:
        provider.stop()


def test_watch_renewed_from_the_last_version_when_the_stream_ends(api):
    provider = _provider(api, namespace="default").start()
    try:
        api.apply(api.pod("a", labels=LABELS))
        wait_until(lambda: provider.get_pod("default/a") is not None, 10, "a")
        watches = api.watch_count()
        api.drop_watches()
        wait_until(lambda: api.watch_count() > watches, 10, "a new watch")
        api.apply(api.pod("b", labels=LABELS))
        wait_until(lambda: provider.get_pod("default/b") is not None, 10, "b")
        assert provider.relists == 0
        assert f"resourceVersion={api.rv - 1}" in "".join(api.requests[-3:])
    finally:
        provider.stop()


def test_expired_version_410_relists_and_applies_the_difference(api):
    api.apply(api.pod("a", labels=LABELS))
    api.apply(api.pod("b", labels=LABELS))
    provider = _provider(api, namespace="default")
    rec = Recorder()
    provider.add_listener(rec)
    provider.start()
    try:
        # Changes the watch never reports (compacted away), then the version expires.
        api.delete("default", "a", silent=True)
        api.apply(api.pod("b", labels=LABELS, ip="10.9.9.9"), silent=True)
        api.apply(api.pod("c", labels=LABELS), silent=True)
        api.expire()
        wait_until(lambda: provider.relists >= 1 and provider.get_pod("default/c") is not None,
                   10, "relist after 410")  # fmt: skip
        assert sorted(p.pod_key for p in provider.pods()) == ["default/b", "default/c"]
        assert provider.get_pod("default/b").ip == "10.9.9.9"
        assert ("delete", "default/a") in rec.events
        assert ("update", "default/b", "10.0.0.1", "10.9.9.9") in rec.events
        # and the watch goes on from the new list's version
        api.apply(api.pod("d", labels=LABELS))
        wait_until(lambda: provider.get_pod("default/d") is not None, 10, "d after relist")
    finally:
        provider.stop()


def test_start_against_a_dead_server_raises():
    conf = k8s.Configuration()
    with FakeKubeAPI() as fake:
        conf.host = fake.url
    provider = KubernetesPodProvider(k8s.ApiClient(conf), namespace="default")
    with pytest.raises(Exception):
        provider.start()


def test_pod_mapping_from_labels_annotations_and_status():
    obj = FakeKubeAPI.pod("p", ns="n", ip="10.1.1.1", phase="Pending",
                          labels={**LABELS, "model.aibrix.ai/lora-id": "4"},
                          annotations={"kvevents.edgellm.io/pub-port": "6000",
                                       "kvevents.edgellm.io/router-port": "bad",
                                       "kvevents.edgellm.io/dp-size": "4"})  # fmt: skip
    pod = pod_from_k8s(obj)
    assert (pod.pod_key, pod.ip, pod.phase, pod.lora_id) == ("n/p", "10.1.1.1", "Pending", 4)
    assert pod.dp_size == 4 and [r.pub_port for r in pod.ranks()] == [6000, 6001, 6002, 6003]
    assert (pod.pub_port, pod.router_port) == (6000, 5558)
    assert not pod.qualifies  # not Running
    assert pod_from_k8s({"metadata": {}}) is None


def test_silent_half_open_watch_is_renewed_and_misses_nothing(api):
    provider = _provider(api, namespace="default", watch_timeout=1, read_slack=0.5)
    provider.start()
    try:
        wait_until(lambda: api.open_watches() >= 1, 10, "an open watch")
        api.blackhole_watches()  # the open watch goes silent, never ends
        api.apply(api.pod("b", labels=LABELS, ip="10.0.0.2"))
        wait_until(lambda: provider.get_pod("default/b") is not None, 20,
                   "the pod added after the watch went silent")  # fmt: skip
        assert provider.silent_watches >= 1
        assert provider.relists == 0  # renewed from its version: nothing missed
    finally:
        provider.stop()


def test_expired_version_as_an_http_410_answer_relists(api):
    api.expired_as_http = True  # the watch request itself is refused with 410 Gone
    api.apply(api.pod("a", labels=LABELS))
    provider = _provider(api, namespace="default", watch_timeout=1).start()
    try:
        api.apply(api.pod("b", labels=LABELS), silent=True)
        api.expire()
        wait_until(lambda: provider.get_pod("default/b") is not None and provider.relists >= 1,
                   10, "relist after an HTTP 410")  # fmt: skip
        api.apply(api.pod("c", labels=LABELS))
        wait_until(lambda: provider.get_pod("default/c") is not None, 10, "watching again")
    finally:
        provider.stop()


def test_bookmarks_carry_the_version_forward(api):
    api.bookmark_interval = 0.1
    provider = _provider(api, namespace="default").start()
    try:
        for i in range(3):  # changes the watch does not see: another namespace
            api.apply(api.pod(f"x{i}", ns="elsewhere", labels=LABELS))
        wait_until(lambda: provider.resource_version == str(api.rv), 10, "a bookmark's version")
        api.drop_watches()
        wait_until(lambda: f"resourceVersion={api.rv}" in api.requests[-1], 10,
                   "the next watch from the bookmark's version")  # fmt: skip
    finally:
        provider.stop()


def test_set_based_selector_and_pods_leaving_the_selection(api):
    api.apply(api.pod("a", labels={**LABELS, "tier": "main"}))
    api.apply(api.pod("b", labels={**LABELS, "tier": "canary"}))
    api.apply(api.pod("c", labels={"model.aibrix.ai/name": "llama"}))
    selector = "model.aibrix.ai/kv-events-enabled in (true,yes),tier!=canary,!paused"
    provider = _provider(api, namespace="default", label_selector=selector)
    rec = Recorder()
    provider.add_listener(rec)
    provider.start()
    try:
        assert [p.pod_key for p in provider.pods()] == ["default/a"]
        api.apply(api.pod("a", labels={**LABELS, "tier": "canary"}))  # leaves the selection
        api.apply(api.pod("b", labels={**LABELS, "tier": "main"}))  # enters it
        wait_until(lambda: [p.pod_key for p in provider.pods()] == ["default/b"], 10,
                   "the selection followed")  # fmt: skip
        assert rec.events[-2:] == [("delete", "default/a"), ("add", "default/b", "10.0.0.1")]
    finally:
        provider.stop()


def test_fake_watch_without_a_version_starts_with_the_current_state(api):
    """The API server's "Get State and Start at Most Recent": what the provider gets when
    it has no version to watch from."""
    from kubernetes import watch as k8s_watch

    api.apply(api.pod("a", labels=LABELS))
    api.apply(api.pod("b", labels=LABELS))
    conf = k8s.Configuration()
    conf.host = api.url
    core = k8s.CoreV1Api(k8s.ApiClient(conf))
    w = k8s_watch.Watch()
    seen = []
    for event in w.stream(core.list_namespaced_pod, namespace="default", timeout_seconds=1):
        seen.append((event["type"], event["raw_object"]["metadata"]["name"]))
        if len(seen) == 2:
            api.apply(api.pod("c", labels=LABELS))
        if len(seen) == 3:
            w.stop()
    assert seen == [("ADDED", "a"), ("ADDED", "b"), ("ADDED", "c")]
