import pytest
from hypothesis import given, strategies as st

from edgellm.protocol.params import MAX_P0, ParamError, get_param, set_param, split_params


def test_layout_matches_cpp_set_param():
    # C++: data = " " + p0 + p1; data[0] = (char)p0.length()
    assert set_param("ipc:///tmp/llm/8000.sock", '{"a":1}') == (
        bytes([24]) + b"ipc:///tmp/llm/8000.sock" + b'{"a":1}'
    )


def test_nested_register_unit_reply_unpacks_like_cpp():
    inner = set_param("ipc:///tmp/llm/5010.sock.llm.output_url", "ipc:///tmp/llm/5011.sock.llm.inference_url")
    outer = set_param("3", inner)
    assert get_param(outer, 0) == b"3"
    packed = get_param(outer, 1)
    assert get_param(packed, 0).endswith(b".output_url")
    assert get_param(packed, 1).endswith(b".inference_url")


@given(st.binary(max_size=MAX_P0), st.binary(max_size=512))
def test_round_trip(p0, p1):
    assert split_params(set_param(p0, p1)) == (p0, p1)


def test_first_param_too_long_for_cpp_is_refused():
    with pytest.raises(ParamError):
        set_param(b"x" * (MAX_P0 + 1), b"")


@pytest.mark.parametrize("frame", [b"", b"\x05ab", b"\xffabc"])
def test_malformed_frames_raise_param_error(frame):
    with pytest.raises(ParamError):
        get_param(frame, 0)
