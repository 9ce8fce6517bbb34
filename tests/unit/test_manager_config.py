"""Unit manager config: defaults < sys_config.json < env < flags, validation."""

from __future__ import annotations

import json

import pytest

from edgellm.manager.config import ConfigError, ManagerConfig, load_config, read_config_file


def test_defaults_are_upstreams():
    config = load_config(env={}, file_values={})
    assert (config.host, config.port, config.enable_tcp) == ("127.0.0.1", 10001, True)
    assert config.zmq_s_format == config.zmq_c_format == "ipc:///tmp/llm/%i.sock"
    assert (config.min_port, config.max_port, config.work_id) == (5010, 5555, 0)
    assert config.max_message_bytes == 1 << 20
    assert config.ipc_mode == 0o700
    assert config.session_url(8000) == "ipc:///tmp/llm/8000.sock"


def test_runtime_dir_moves_the_derived_formats():
    config = load_config({"runtime_dir": "/run/x"}, env={}, file_values={})
    assert config.zmq_s_format == "ipc:///run/x/llm/%i.sock"
    assert config.client_url(8001) == "ipc:///run/x/llm/8001.sock"


def test_precedence_file_then_env_then_flags(tmp_path, monkeypatch):
    (tmp_path / "sys_config.json").write_text(
        json.dumps(
            {
                "config_tcp_server": 11000,
                "config_work_id": 1000,
                "config_zmq_min_port": 6000,
                "config_zmq_max_port": 6100,
                "config_enable_tcp": True,  # a bool: ignored, as upstream (numbers and strings only)
                "config_unknown": "kept out",
            }
        )
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(env={"EDGELLM_PORT": "12000", "EDGELLM_WORK_ID": "7"}, file_values=None)
    assert (config.port, config.work_id, config.min_port, config.max_port) == (12000, 7, 6000, 6100)
    config = load_config({"port": 0, "work_id": None}, env={"EDGELLM_PORT": "12000"})
    assert (config.port, config.work_id) == (0, 1000)


def test_unreadable_or_non_object_file_is_ignored(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert read_config_file(str(bad)) == {}
    bad.write_text("[1,2]")
    assert read_config_file(str(bad)) == {}
    assert read_config_file(str(tmp_path / "missing.json")) == {}


@pytest.mark.parametrize(
    "overrides",
    [
        {"port": 70000},
        {"zmq_s_format": "ipc:///tmp/llm/sock"},
        {"zmq_c_format": "ipc:///tmp/%i/%i.sock"},
        {"min_port": 5010, "max_port": 5011},
        {"request_timeout": 0},
        {"ipc_mode": "0600"},
        {"max_message_bytes": 10},
        {"work_id": -1},
        {"runtime_dir": "/" + "d" * 120},  # client urls would not fit set_param's length byte
        {"message_idle_timeout": 0},
        {"listen_backlog": 0},
        {"allow_reboot": True},  # with nothing to run
        {"allow_reboot": True, "reboot_command": "'unclosed"},
    ],
)
def test_invalid_values_are_refused(overrides):
    with pytest.raises(ConfigError):
        load_config(overrides, env={}, file_values={})


def test_wrong_types_from_env_and_file_are_refused():
    with pytest.raises(ConfigError):
        load_config(env={"EDGELLM_PORT": "ten"}, file_values={})
    with pytest.raises(ConfigError):
        load_config(env={}, file_values={"config_tcp_server": "ten"})
    with pytest.raises(ConfigError):
        load_config(env={}, file_values={"config_tcp_server": 1.5})


def test_config_is_frozen_and_ipc_mode_parses_octal():
    config = load_config({"ipc_mode": "0750", "enable_tcp": "0"}, env={}, file_values={})
    assert config.ipc_mode == 0o750
    assert config.enable_tcp is False
    with pytest.raises(AttributeError):
        config.port = 1  # type: ignore[misc]
    assert isinstance(config, ManagerConfig)


def test_reboot_is_off_unless_allowed_with_a_command():
    config = load_config(env={}, file_values={})
    assert (config.allow_reboot, config.reboot_command) == (False, "")
    allowed = load_config(env={}, file_values={"config_allow_reboot": 1,
                                                "config_reboot_command": "systemctl reboot"})
    assert (allowed.allow_reboot, allowed.reboot_command) == (True, "systemctl reboot")
