"""cmminfo's figures: an AXera box's CMM as StackFlow reads it, else RAM under a cgroup limit."""

from __future__ import annotations

from edgellm.manager.sysinfo import cmm_info


def test_the_npu_cmm_is_read_from_its_last_line_as_stackflow_does(tmp_path):
    ax = tmp_path / "mem_cmm_info"
    ax.write_text("--- CMM ---\nsome detail\ntotal size=1048576KB used=262144KB remain=786432KB\n")
    assert cmm_info(str(ax), str(tmp_path / "nocgroup")) == {
        "total": 1048576, "used": 262144, "remain": 786432}


def test_ram_capped_by_the_cgroup_limit(tmp_path):
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text(f"{512 << 20}\n")  # 512 MiB
    (cgroup / "memory.current").write_text(f"{100 << 20}\n")
    info = cmm_info(str(tmp_path / "absent"), str(cgroup))
    assert info == {"total": 512 << 10, "used": 100 << 10, "remain": 412 << 10}


def test_ram_without_a_limit(tmp_path):
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("1234\n")
    info = cmm_info(str(tmp_path / "absent"), str(cgroup))
    with open("/proc/meminfo") as fh:
        fields = {line.split(":")[0]: int(line.split()[1]) for line in fh}
    assert info["total"] == fields["MemTotal"]
    assert info["used"] + info["remain"] == info["total"] and info["remain"] > 0
