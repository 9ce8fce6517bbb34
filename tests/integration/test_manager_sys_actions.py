"""The sys actions cmminfo, reset and reboot on a real unit manager with the echo unit."""

from __future__ import annotations

import os
import shlex
import sys

from manager_support import Client, ManagerProcess, UnitProcess, inference_request, setup_request
from waits import wait_until


def sys_request(client: Client, action: str, work_id: str = "sys") -> dict:
    return client.request({"request_id": action, "work_id": work_id, "action": action})


def test_cmminfo_reports_total_used_and_remain_in_kib(runtime_dir):
    with ManagerProcess(runtime_dir) as manager, Client(manager.port) as client:
        answer = sys_request(client, "cmminfo")
        assert (answer["error"]["code"], answer["object"], answer["work_id"]) == (0, "sys.cmminfo", "sys")
        data = answer["data"]
        assert set(data) == {"total", "used", "remain"}
        assert all(type(v) is int for v in data.values())
        assert data["remain"] > 0 and data["used"] + data["remain"] == data["total"]
        with open("/proc/meminfo") as fh:
            mem_total = int(fh.readline().split()[1])
        assert data["total"] <= mem_total


def test_reset_ends_every_task_and_frees_its_work_id_and_ports(runtime_dir):
    with ManagerProcess(runtime_dir) as manager, UnitProcess(runtime_dir), \
            Client(manager.port) as a, Client(manager.port) as b, Client(manager.port) as admin:  # fmt: skip
        first = a.request(setup_request(request_id="a"))["work_id"]
        b.request(setup_request(request_id="b"))
        before = sys_request(admin, "lstask")["data"]
        assert len(before) == 2
        answer = sys_request(admin, "reset")
        assert (answer["error"]["code"], answer["error"]["message"]) == (0, "reset: 2 task(s) ended")
        assert sys_request(admin, "lstask")["data"] == []
        gone = a.request(inference_request(first, "x", request_id="late"))
        assert (gone["error"]["code"], gone["request_id"]) == (-4, "late")
        # ended in the unit as well (its links to the manager closed)
        wait_until(lambda: sys_request(admin, "taskinfo", "llm")["data"] == [], 10,
                   "the unit ended its tasks")  # fmt: skip
        again = a.request(setup_request(request_id="again"))
        assert again["error"]["code"] == 0 and again["work_id"] != first
        (task,) = sys_request(admin, "lstask")["data"]
        assert (task["output_url"], task["inference_url"]) == (before[0]["output_url"],
                                                               before[0]["inference_url"])
        pieces = a.stream(inference_request(again["work_id"], "after reset"))
        assert [p["data"]["delta"] for p in pieces] == ["after reset", "hello", ""]


def test_reboot_is_refused_unless_the_operator_allows_it(runtime_dir):
    with ManagerProcess(runtime_dir) as manager, Client(manager.port) as client:
        answer = sys_request(client, "reboot")
        assert answer["error"]["code"] == -10
        assert "--allow-reboot" in answer["error"]["message"]
        assert sys_request(client, "ping")["error"]["code"] == 0


def test_an_allowed_reboot_answers_then_runs_the_operators_command(runtime_dir, tmp_path):
    marker = tmp_path / "rebooted"
    command = shlex.join([sys.executable, "-c",
                          f"open({str(marker)!r}, 'w').write('rebooted')"])  # fmt: skip
    with ManagerProcess(runtime_dir, "--allow-reboot", "--reboot-command", command) as manager, \
            Client(manager.port) as client:  # fmt: skip
        answer = sys_request(client, "reboot")
        assert (answer["error"]["code"], answer["error"]["message"]) == (0, "rebooting ...")
        wait_until(lambda: os.path.exists(marker), 10, "the reboot command ran")
        assert marker.read_text() == "rebooted"
        assert sys_request(client, "ping")["error"]["code"] == 0  # it was the command's call
