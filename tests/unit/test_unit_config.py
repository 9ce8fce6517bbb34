import pytest

from edgellm.protocol.errors import ErrorCode
from edgellm.unit import TaskConfig, UnitConfig, UnitError


def sample_setup_data(**over):
    data = {
        "model": "DeepSeek-R1-Distill-Qwen-1.5B",
        "response_format": "llm.utf-8.stream",
        "input": "llm.utf-8.stream",
        "enoutput": True,
        "max_token_len": 1023,
        "prompt": "You are ...",
    }
    data.update(over)
    return data


def test_sample_client_setup_parses():
    config = TaskConfig.parse(sample_setup_data())
    assert config.model == "DeepSeek-R1-Distill-Qwen-1.5B"
    assert config.stream is True
    assert config.enoutput is True
    assert config.inputs == ("llm.utf-8.stream",)
    assert config.upstream_inputs == ()
    assert config.extra == {"max_token_len": 1023, "prompt": "You are ..."}
    assert config.info() == {
        "enoutput": True,
        "inputs": ["llm.utf-8.stream"],
        "model": "DeepSeek-R1-Distill-Qwen-1.5B",
        "response_format": "llm.utf-8.stream",
    }


def test_input_list_names_upstream_tasks():
    config = TaskConfig.parse(sample_setup_data(input=["llm.utf-8.stream", "asr.1001", "kws.3"]))
    assert config.upstream_inputs == ("asr.1001", "kws.3")
    assert config.with_input("tts.2").upstream_inputs == ("asr.1001", "kws.3", "tts.2")
    assert config.with_input("kws.3") is config
    assert config.without_input("asr.1001").inputs == ("llm.utf-8.stream", "kws.3")


def test_non_stream_format():
    assert TaskConfig.parse(sample_setup_data(response_format="llm.utf-8")).stream is False


@pytest.mark.parametrize(
    "data, code",
    [
        ("text", ErrorCode.JSON_FORMAT),
        ([1, 2], ErrorCode.JSON_FORMAT),
        ({k: v for k, v in sample_setup_data().items() if k != "model"}, ErrorCode.MODEL_LOADING),
        (sample_setup_data(response_format=3), ErrorCode.MODEL_LOADING),
        (sample_setup_data(enoutput="true"), ErrorCode.MODEL_LOADING),
        (sample_setup_data(input=[1]), ErrorCode.MODEL_LOADING),
        (sample_setup_data(input={"a": 1}), ErrorCode.MODEL_LOADING),
    ],
)
def test_bad_setup_data_gets_the_upstream_code(data, code):
    with pytest.raises(UnitError) as info:
        TaskConfig.parse(data)
    assert info.value.code == code
    assert info.value.message.startswith(code.message)


@pytest.mark.parametrize(
    "kwargs",
    [{"name": ""}, {"name": "a.b"}, {"name": "a/b"}, {"max_tasks": 0}, {"sys_call_timeout": 0}],
)
def test_unit_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        UnitConfig(**kwargs)


def test_unit_config_defaults_are_upstream_paths():
    config = UnitConfig()
    assert (config.name, config.runtime_dir) == ("llm", "/tmp")
