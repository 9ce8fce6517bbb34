"""The static-file and unit-registry pod providers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from waits import wait_until  # noqa: E402
from kvfakes.sys_kv import SysKV  # noqa: E402

from edgellm.comm.sys_client import SysClient  # noqa: E402
from edgellm.discovery.pod import Pod  # noqa: E402
from edgellm.discovery.provider import StaticPodProvider  # noqa: E402
from edgellm.discovery.static_file import FilePodProvider, PodFileError, parse_pods  # noqa: E402
from edgellm.discovery.unit_registry import (  # noqa: E402
    INDEX_KEY,
    UnitRegistryPodProvider,
    announce,
    withdraw,
)


class Recorder:
    def __init__(self):
        self.events: list[tuple] = []

    def on_pod_add(self, pod):
        self.events.append(("add", pod.pod_key))

    def on_pod_update(self, old, new):
        self.events.append(("update", new.pod_key))

    def on_pod_delete(self, pod):
        self.events.append(("delete", pod.pod_key))


def _write(path: Path, pods, *, as_yaml=False) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    if as_yaml:
        import yaml

        tmp.write_text(yaml.safe_dump(pods))
    else:
        tmp.write_text(json.dumps(pods))
    os.replace(tmp, path)  # atomic, new inode: what editors and config tools do


# --- static provider -------------------------------------------------------------------


def test_static_provider_emits_add_update_delete_and_replace_diff():
    provider = StaticPodProvider([Pod("a", "1.1.1.1", "m")])
    rec = Recorder()
    provider.add_listener(rec)
    provider.add(Pod("a", "1.1.1.1", "m"))  # unchanged: nothing
    provider.add(Pod("b", "1.1.1.2", "m"))
    provider.add(Pod("a", "1.1.1.9", "m"))
    provider.replace([Pod("a", "1.1.1.9", "m"), Pod("c", "1.1.1.3", "m")])
    assert provider.remove("zzz") is None
    assert rec.events == [("add", "b"), ("update", "a"), ("delete", "b"), ("add", "c")]
    with pytest.raises(ValueError):
        provider.replace([Pod("x", "1", "m"), Pod("x", "2", "m")])


def test_a_failing_listener_does_not_stop_the_others():
    class Bad(Recorder):
        def on_pod_add(self, pod):
            raise RuntimeError("boom")

    provider = StaticPodProvider()
    good = Recorder()
    provider.add_listener(Bad())
    provider.add_listener(good)
    provider.add(Pod("a", "1", "m"))
    assert good.events == [("add", "a")]


# --- file provider ---------------------------------------------------------------------


def test_parse_json_and_yaml_with_defaults():
    text = '[{"pod_key": "p", "ip": "127.0.0.1", "model": "m"}]'
    (pod,) = parse_pods(text, as_json=True)
    assert (pod.lora_id, pod.pub_port, pod.router_port, pod.qualifies) == (-1, 5557, 5558, True)
    yaml_text = "pods:\n  - {pod_key: q, ip: 10.0.0.1, model: m, lora_id: 3, pub_port: 6000}\n"
    (pod,) = parse_pods(yaml_text)
    assert (pod.pod_key, pod.lora_id, pod.pub_port, pod.dp_size) == ("q", 3, 6000, 1)
    (dp,) = parse_pods("- {pod_key: d, ip: 10.0.0.1, model: m, dp_size: 2, router_port: 7000}")
    assert [(r.pod_key, r.pub_port, r.router_port) for r in dp.ranks()] == [
        ("d#dp0", 5557, 7000), ("d#dp1", 5558, 7001)]
    assert parse_pods("[]") == parse_pods("[]", as_json=True) == parse_pods("pods: []") == []


@pytest.mark.parametrize("text", ["", "  \n", "# only a comment\n", "~", "null"])
@pytest.mark.parametrize("as_json", [False, True])
def test_an_empty_file_is_invalid_not_no_pods(text, as_json):
    if as_json and text.startswith(("#", "~")):
        return  # not JSON at all: invalid anyway
    with pytest.raises(PodFileError):
        parse_pods(text, as_json=as_json)


@pytest.mark.parametrize("text", [
    "{", "7", '[{"pod_key": "p", "ip": "1"}]', '[{"pod_key": "p", "ip": "1", "model": "m", "prot": 1}]',
    '[{"pod_key": "p", "ip": "1", "model": "m", "pub_port": 70000}]',
    '[{"pod_key": "p", "ip": "1", "model": "m"}, {"pod_key": "p", "ip": "2", "model": "m"}]',
    '[{"pod_key": "p", "ip": "1", "model": "m", "labels": {"a": 1}}]', "[1]",
    '[{"pod_key": "p", "ip": "1", "model": "m", "dp_size": 0}]',
    '[{"pod_key": "p", "ip": "1", "model": "m", "pub_port": 65535, "dp_size": 2}]',
])  # fmt: skip
def test_invalid_pod_files_are_rejected(text):
    with pytest.raises(PodFileError):
        parse_pods(text, as_json=True)


def test_file_provider_rereads_on_change(tmp_path):
    path = tmp_path / "pods.json"
    _write(path, [{"pod_key": "a", "ip": "127.0.0.1", "model": "m"}])
    provider = FilePodProvider(path, poll_interval=0.05)
    rec = Recorder()
    provider.add_listener(rec)
    with provider:
        assert [p.pod_key for p in provider.pods()] == ["a"]
        _write(path, [{"pod_key": "a", "ip": "127.0.0.2", "model": "m"},
                      {"pod_key": "b", "ip": "127.0.0.1", "model": "m"}])  # fmt: skip
        wait_until(lambda: provider.get_pod("b") is not None, 10, "b added")
        assert provider.get_pod("a").ip == "127.0.0.2"
        path.write_text("not: [valid")  # broken edit: ignored, last good set kept
        wait_until(lambda: provider.errors >= 1, 10, "the broken file noticed")
        assert sorted(p.pod_key for p in provider.pods()) == ["a", "b"]
        _write(path, [{"pod_key": "b", "ip": "127.0.0.1", "model": "m"}])
        wait_until(lambda: provider.get_pod("a") is None, 10, "a removed")
    assert rec.events == [("add", "a"), ("update", "a"), ("add", "b"), ("delete", "a")]


POD_A = {"pod_key": "a", "ip": "127.0.0.1", "model": "m"}
POD_B = {"pod_key": "b", "ip": "127.0.0.2", "model": "m"}


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_emptied_file_keeps_the_last_good_set(tmp_path, suffix):
    path = tmp_path / f"pods{suffix}"
    _write(path, [POD_A], as_yaml=suffix == ".yaml")
    provider = FilePodProvider(path, poll_interval=3600, settle=1.0)  # checks driven here
    rec = Recorder()
    provider.add_listener(rec)
    with provider:
        path.write_text("")
        assert not provider.check(now=0.0) and not provider.check(now=1.5)
        assert provider.errors == 1 and [p.pod_key for p in provider.pods()] == ["a"]
        path.write_text("[]")  # no pods, said explicitly
        provider.check(now=2.0)
        assert provider.check(now=3.5) and provider.pods() == []
    assert rec.events == [("add", "a"), ("delete", "a")]


def test_a_save_caught_mid_write_is_not_applied(tmp_path):
    import yaml

    path = tmp_path / "pods.yaml"
    text = yaml.safe_dump([POD_A, POD_B])
    path.write_text(text)
    provider = FilePodProvider(path, poll_interval=3600, settle=1.0)  # checks driven here
    rec = Recorder()
    provider.add_listener(rec)
    with provider, open(path, "r+") as f:
        f.truncate(0)  # an editor saving in place: truncate, write, pause, write the rest
        f.write(text[: text.index("- ", 5)])  # a valid YAML list of pod a alone
        f.flush()
        assert not provider.check(now=10.0)
        assert not provider.check(now=10.5)  # still the same, but not for settle seconds
        f.write(text[text.index("- ", 5):])
        f.flush()
        assert not provider.check(now=10.6)  # changed again: wait again
        provider.check(now=11.7)  # settled: the whole file, the same pods as before
        assert sorted(p.pod_key for p in provider.pods()) == ["a", "b"]
    assert rec.events == [("add", "a"), ("add", "b")]  # never a spurious delete


def test_yaml_file_and_missing_file(tmp_path):
    path = tmp_path / "pods.yaml"
    _write(path, [{"pod_key": "y", "ip": "::1", "model": "m"}], as_yaml=True)
    with FilePodProvider(path) as provider:
        assert provider.get_pod("y").pub_endpoint == "tcp://[::1]:5557"
    with pytest.raises(PodFileError):
        FilePodProvider(tmp_path / "missing.json").start()


# --- unit registry provider --------------------------------------------------------------


@pytest.fixture
def sys_service(tmp_path):
    with SysKV(str(tmp_path)) as service:
        yield service, str(tmp_path)


def test_announce_and_withdraw_key_scheme(sys_service):
    service, runtime_dir = sys_service
    with SysClient(runtime_dir=runtime_dir) as client:
        announce(client, "llm.1", ip="127.0.0.1", model="m", pub_port=6001, router_port=6002)
        announce(client, "llm.2", ip="127.0.0.2", model="m", lora_id=5, pod_key="box/llm2")
        assert json.loads(service.store[INDEX_KEY]) == ["llm.1", "llm.2"]
        entry = json.loads(service.store["kvevents.llm.1"])
        assert entry == {"ip": "127.0.0.1", "model": "m", "pub_port": 6001, "router_port": 6002,
                         "lora_id": -1, "pod_key": "unit/llm.1"}  # fmt: skip
        withdraw(client, "llm.1")
        assert json.loads(service.store[INDEX_KEY]) == ["llm.2"]
        assert "kvevents.llm.1" not in service.store


def test_registry_provider_follows_announcements_of_registered_units(sys_service):
    service, runtime_dir = sys_service
    service.store["llm.1.out_port"] = "ipc:///tmp/llm/5010.sock"
    service.store["llm.2.out_port"] = "ipc:///tmp/llm/5011.sock"
    with SysClient(runtime_dir=runtime_dir) as client:
        announce(client, "llm.1", ip="127.0.0.1", model="m", pub_port=6001, router_port=6002)
        provider = UnitRegistryPodProvider(runtime_dir=runtime_dir, poll_interval=0.05)
        rec = Recorder()
        provider.add_listener(rec)
        with provider:
            pod = provider.get_pod("unit/llm.1")
            assert (pod.ip, pod.pub_port, pod.router_port, pod.labels["edgellm.io/work-id"]) == (
                "127.0.0.1", 6001, 6002, "llm.1")  # fmt: skip
            announce(client, "llm.2", ip="127.0.0.2", model="m")
            wait_until(lambda: provider.get_pod("unit/llm.2") is not None, 10, "llm.2")
            # The unit manager released llm.2 (its out_port key is gone): not a pod any more.
            del service.store["llm.2.out_port"]
            wait_until(lambda: provider.get_pod("unit/llm.2") is None, 10, "llm.2 released")
            withdraw(client, "llm.1")
            wait_until(lambda: provider.pods() == [], 10, "llm.1 withdrawn")
            # announcements that are garbage are skipped
            service.store[INDEX_KEY] = json.dumps(["llm.3"])
            service.store["llm.3.out_port"] = "x"
            service.store["kvevents.llm.3"] = "{not json"
            assert provider.refresh() and provider.pods() == []
    assert rec.events == [("add", "unit/llm.1"), ("add", "unit/llm.2"), ("delete", "unit/llm.2"),
                          ("delete", "unit/llm.1")]  # fmt: skip


def test_registry_provider_survives_a_missing_service(tmp_path):
    provider = UnitRegistryPodProvider(runtime_dir=str(tmp_path), poll_interval=0.05)
    with provider:
        assert provider.pods() == []
        wait_until(lambda: provider.failures >= 2, 10, "retries")
