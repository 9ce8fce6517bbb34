"""The sys service's register_unit reply."""

from __future__ import annotations

import pytest

from edgellm.protocol.sys_rpc import FALSE, SysReplyError, decode_registration, encode_registration


def test_a_refused_registration_says_so():
    """Found by bench/soak.py: a manager out of ports answers upstream's ``False``, which
    was reported as a malformed reply."""
    assert decode_registration("llm", encode_registration(3, "ipc://a", "ipc://b")).work_id == "llm.3"
    with pytest.raises(SysReplyError, match="refused register_unit"):
        decode_registration("llm", FALSE)
    with pytest.raises(SysReplyError, match="malformed"):
        decode_registration("llm", b"\x05junk")
