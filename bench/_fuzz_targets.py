"""The parsers the coverage-guided fuzzer drives (``bench/fuzz.py``, the suite's short runs).

Each :class:`Target` takes one input (bytes), runs it through its parser and checks what
must hold whatever the bytes; a broken property raises ``AssertionError`` and anything the
parser raises beyond its documented error is a crash too. ``load()`` imports the code under
test (the runner does it inside atheris' instrumentation, so that Python coverage guides
the search); ``seeds()`` and ``tokens`` start the search where the interesting inputs are.

- ``framer``: the TCP front door's input path: :class:`JsonStreamFramer` fed whole and in
  chunks (the same messages either way), every frame the exact bytes it was sent as and a
  JSON object, memory bounded, a line that is one whole request read as such after any
  garbage; then every frame through the manager's :class:`Dispatcher` (one answer in the
  envelope's form, -2 as request ``"0"`` of ``sys`` when the envelope fields are not
  strings, or a unit call).
- ``kv_events``: :func:`decode_batch` raises only :class:`KVEventDecodeError`; a decoded
  batch holds only canonical, consistent events; a stream's :class:`BatchDecoder` (whatever
  form it last saw) agrees with the stateless decoder; what decodes re-encodes to the same
  bytes in both of vLLM's forms.
- ``params``: ``get_param``/``split_params`` raise only :class:`ParamError` and undo
  ``set_param`` exactly; ``set_param`` refuses a first parameter over 127 bytes.
- ``gateway`` (``bench/_fuzz_gateway.py``): the gateway's request parsing;
- ``rows`` (``bench/_fuzz_rows.py``): the index's C extension against a model of it.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
from typing import Any, Callable

__all__ = ["TARGETS", "Target"]


_EDGE_INTS = (0, 1, -1, 2, 16, 255, 256, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63,
              -(1 << 63), (1 << 64) - 1, 1 << 64, 10**30)


def mutate_tree(value: Any, rng: random.Random, words: tuple[str, ...], *, binary: bool) -> Any:
    """``value`` (decoded JSON or msgpack) with one node replaced, removed, duplicated or
    added: structure-aware mutation, so that the search gets past the syntax into the
    checks behind it. ``words`` are field names and values worth trying."""
    if isinstance(value, (list, dict)) and value and rng.random() < 0.75:
        keys = list(value) if isinstance(value, dict) else list(range(len(value)))
        key = rng.choice(keys)
        op = rng.random()
        if op < 0.15:
            del value[key]
        elif op < 0.25 and isinstance(value, list):
            value.insert(key, value[key])
        elif op < 0.35 and isinstance(value, dict):
            value[rng.choice(words)] = _random_value(rng, words, binary)
        else:
            value[key] = mutate_tree(value[key], rng, words, binary=binary)
        return value
    return _random_value(rng, words, binary)


def _random_value(rng: random.Random, words: tuple[str, ...], binary: bool) -> Any:
    pick = rng.randrange(9 if binary else 8)
    if pick == 0:
        return rng.choice(_EDGE_INTS) * rng.choice((1, 1, -1))
    if pick == 1:
        return rng.choice((0.0, -0.0, 0.5, 1.5, 2.0, 1e308, -1e-308, float("inf"), float("nan")))
    if pick == 2:
        return rng.choice(words)
    if pick == 3:
        return "".join(chr(rng.choice((0, 9, 10, 34, 92, 0xE9, 0xD800, 0x1F600, 0xFFFF,
                                       rng.randrange(32, 127)))) for _ in range(rng.randrange(4)))
    if pick == 4:
        return rng.choice((None, True, False))
    if pick == 5:
        return [_random_value(rng, words, binary) for _ in range(rng.randrange(4))]
    if pick == 6:
        return {rng.choice(words): _random_value(rng, words, binary) for _ in range(rng.randrange(3))}
    if pick == 7:
        return [rng.randrange(1 << 32) for _ in range(rng.choice((0, 1, 4, 16, 17)))]
    return bytes(rng.getrandbits(8) for _ in range(rng.choice((0, 1, 8, 32, 64, 65))))


class Target:
    name = ""
    max_len = 4096
    tokens: tuple[bytes, ...] = ()

    def load(self) -> None:
        """Import the code under test; called once, before the first input."""

    def seeds(self) -> list[bytes]:
        return []

    def __call__(self, data: bytes) -> None:
        raise NotImplementedError


# --- the TCP front door --------------------------------------------------------------------

_FENCE_VALUE = {"request_id": "f", "work_id": "sys", "action": "ping"}
_FENCE = b"\n" + json.dumps(_FENCE_VALUE, separators=(",", ":")).encode() + b"\n"


class _Link:
    """The client connection as dispatch sees it: records what it is sent."""

    def __init__(self, pending, client_url: str) -> None:
        self.pending = pending
        self.client_url = client_url
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)


class FramerTarget(Target):
    """Header: byte 0 picks ``max_message`` (64..2104), byte 1 the chunk size (1..32)."""

    name = "framer"
    max_len = 2048
    tokens = (b'{"request_id":"1",', b'"work_id":"sys",', b'"action":"ping"}', b'"inference"',
              b'"data":{"delta":"x","index":0,"finish":false}', b'"object":"llm.utf-8.stream"',
              b'\\"', b'\\u00e9', b'\\ud83d\\ude00', b"\xc3\xa9", b"\xf0\x9f\x98\x80", b"\xed\xa0\x80",
              b"true", b"false", b"null", b"-0.5e+10", b"[", b"]", b"{", b"}", b":", b",", b"\n",
              b'"unit_call"', b'"setup"', b'"zmq_com":"x"', b"    ", b"\r\n")  # fmt: skip

    def load(self) -> None:
        import msgspec

        from edgellm.manager.config import ManagerConfig
        from edgellm.manager.dispatch import Dispatcher
        from edgellm.manager.pending import PendingTable
        from edgellm.manager.store import KeyValueStore
        from edgellm.manager.sysinfo import HwInfo
        from edgellm.manager.units import UnitRegistry
        from edgellm.protocol.framing import Frame, FramingError, JsonStreamFramer

        self.Frame, self.FramingError, self.Framer = Frame, FramingError, JsonStreamFramer
        self._decode = msgspec.json.Decoder().decode
        self._decode_error = msgspec.DecodeError
        self._runtime = tempfile.TemporaryDirectory(prefix="el-fuzz-")
        self.loop = asyncio.new_event_loop()
        config = ManagerConfig(runtime_dir=self._runtime.name, box_name="fuzz")
        store = KeyValueStore({})
        self.registry = UnitRegistry(config, self.loop, store)
        self.dispatcher = Dispatcher(config, self.registry, store, HwInfo(), lambda: 1.0)
        self.link = _Link(PendingTable(self.loop, 30.0, lambda p, reason: None),
                          config.client_url(1))  # fmt: skip

    def seeds(self) -> list[bytes]:
        import os

        corpus = os.path.join(os.path.dirname(__file__), "..", "tests", "bad_input", "corpus.jsonl")
        out = [b"\x40\x03" + _FENCE, b"\xff\x00" + b'{"a":"}"}{"b":[1,{"c":2}]}\n  [1]\n}']
        with open(corpus, "rb") as f:
            for line in f:
                case = json.loads(line)
                if "send" in case:
                    out.append(b"\x80\x05" + case["send"].encode()[:2000])
        return out

    def _frames(self, stream: bytes, max_message: int, chunk: int) -> tuple[list, int]:
        framer = self.Framer(max_message)
        out: list = []
        most = 0
        for i in range(0, len(stream), chunk):
            piece = stream[i : i + chunk]
            out += framer.feed(piece)
            most = max(most, framer.buffered - len(piece))
        return out, most

    def __call__(self, data: bytes) -> None:
        if len(data) < 2:
            return
        max_message, chunk = 64 + data[0] * 8, 1 + data[1] % 32
        stream = data[2:]
        whole = self.Framer(max_message).feed(stream)
        pieces, held = self._frames(stream, max_message, chunk)
        assert pieces == whole, f"chunks of {chunk} frame differently: {pieces} != {whole}"
        # Memory: the current message and the unread part of the last chunk, no more.
        assert held <= max_message + 1, f"{held} bytes held beyond the last chunk"
        at = 0
        for item in whole:
            if type(item) is self.FramingError:
                assert isinstance(item.reason, str) and item.reason
                continue
            assert type(item) is self.Frame and type(item.value) is dict, item
            assert len(item.raw) <= max_message, "a frame over the size limit"
            found = stream.find(item.raw, at)
            assert found >= 0, f"frame {item.raw!r} is not bytes the client sent, in order"
            at = found + len(item.raw)
            assert self._decode(item.raw) == item.value
        self._check_lines(stream, whole, max_message)
        # After anything, a line that is a whole request is read as that request.
        framer = self.Framer(max_message)
        got = framer.feed(stream) + framer.feed(_FENCE)
        assert got and type(got[-1]) is self.Frame and got[-1].value == _FENCE_VALUE, got[-3:]
        self._dispatch(whole)

    def _check_lines(self, stream: bytes, got: list, max_message: int) -> None:
        """A stream of lines that are each one JSON object is framed as exactly those."""
        values = []
        for line in stream.split(b"\n"):
            line = line.strip(b" \t\r")
            if not line:
                continue
            if len(line) > max_message or line[:1] != b"{":
                return
            try:
                value = self._decode(line)
            except (self._decode_error, ValueError, RecursionError):
                return
            if type(value) is not dict:
                return
            values.append(value)
        assert [type(x) is self.Frame and x.value for x in got] == values, (got, values)

    def _dispatch(self, items: list) -> None:
        for item in items:
            if type(item) is not self.Frame:
                continue
            sent = self.link.sent
            call = self.dispatcher.handle(self.link, item)
            value = item.value
            fields_ok = all(type(value.get(k)) is str for k in ("request_id", "work_id", "action"))
            if call is not None:
                call.close()  # a unit call: not made here, only its checks
                assert fields_ok and not sent, (value, sent)
                continue
            assert len(sent) == 1, f"{len(sent)} answers to {value!r}"
            answer = json.loads(sent.pop())
            assert set(answer) == {"created", "data", "error", "object", "request_id", "work_id"}
            assert type(answer["error"]["code"]) is int and type(answer["error"]["message"]) is str
            if not fields_ok:
                assert answer["error"]["code"] == -2 and answer["request_id"] == "0"
                assert answer["work_id"] == "sys"
            else:
                assert answer["request_id"] == value["request_id"]


# --- KV event batches ----------------------------------------------------------------------


class KvEventsTarget(Target):
    name = "kv_events"
    max_len = 4096
    tokens = (b"\xabBlockStored", b"\xacBlockRemoved", b"\xb0AllBlocksCleared", b"\xa4type",
              b"\xa2ts", b"\xa6events", b"\xb2data_parallel_rank", b"\xacblock_hashes",
              b"\xb1parent_block_hash", b"\xa9token_ids", b"\xaablock_size", b"\xc4\x08",
              b"\xc4\x20", b"\xcf", b"\xd3", b"\xcb", b"\xc0", b"\x93", b"\x95", b"\x81",
              b"\xdc\x00\x10", b"\xce\xff\xff\xff\xff")  # fmt: skip

    def load(self) -> None:
        from edgellm.protocol import kv_events as codec
        from edgellm.protocol.kv_event_types import MAX_BLOCK_SIZE, MAX_TOKEN

        self.codec = codec
        self.kinds = (codec.BlockStored, codec.BlockRemoved, codec.AllBlocksCleared)
        self.stream = codec.BatchDecoder()  # shared: its remembered form varies with inputs
        self.max_block, self.max_token = MAX_BLOCK_SIZE, MAX_TOKEN

    def seeds(self) -> list[bytes]:
        c = self.codec
        events = [c.BlockStored([1, 2], None, list(range(8)), 4, None, None, None),
                  c.BlockStored([3], 2, [9] * 4, 4, 7, "cpu", "lora", [1, "x"], 0),
                  c.BlockRemoved([1, 2 ** 63]), c.AllBlocksCleared()]  # fmt: skip
        out = []
        for style in ("array", "map"):
            out.append(c.encode_batch(c.EventBatch(1.5, events, 0), style))
            out.append(c.encode_batch(c.EventBatch(2.0, events[:1], None), style))
        import msgspec

        out.append(msgspec.msgpack.encode([1.0, [["BlockStored", [-5, b"\x01" * 32], None,
                                                   [1, 2], 1]]]))  # fmt: skip
        out.append(msgspec.msgpack.encode({"ts": 1, "events": [{"type": "BlockRemoved",
                                                               "block_hashes": [1]}]}))
        return out

    def mutate(self, data: bytes, max_size: int, seed_value: int) -> bytes | None:
        import msgspec

        rng = random.Random(seed_value)
        if rng.random() < 0.5:
            return None
        try:
            value = msgspec.msgpack.decode(data)
        except Exception:  # not msgpack: byte-level mutation only
            return None
        words = tuple(t[1:].decode("latin-1") for t in self.tokens[:11])
        try:
            out = msgspec.msgpack.encode(mutate_tree(value, rng, words, binary=True))
        except Exception:  # a mutation msgpack cannot carry (an int over 64 bits...)
            return None
        return out if len(out) <= max_size else None

    def __call__(self, data: bytes) -> None:
        c = self.codec
        try:
            batch = c.decode_batch(data)
        except c.KVEventDecodeError:
            batch = None
        try:
            again = self.stream.decode(data)
        except c.KVEventDecodeError:
            again = None
        assert (batch is None) == (again is None), "a stream's decoder disagrees"
        if batch is None:
            return
        assert type(batch.ts) is float
        assert batch.data_parallel_rank is None or type(batch.data_parallel_rank) is int
        plain = True
        for ev in batch.events:
            if type(ev) is c.InvalidEvent:
                plain = False
                assert ev.kind == "BlockStored" and ev.reason
                continue
            assert type(ev) in self.kinds, type(ev)
            for h in getattr(ev, "block_hashes", ()):
                assert type(h) is int and h >= 0
                plain = plain and h < 1 << 64
            if type(ev) is c.BlockStored:
                parent = ev.parent_block_hash
                assert parent is None or (type(parent) is int and parent >= 0)
                plain = plain and (parent is None or parent < 1 << 64)
                assert 1 <= ev.block_size <= self.max_block
                assert len(ev.token_ids) == len(ev.block_hashes) * ev.block_size
                assert all(type(t) is int and 0 <= t <= self.max_token for t in ev.token_ids)
        assert repr(again) == repr(batch), "a stream's decoder decodes differently"
        if plain:
            for style in ("array", "map"):
                wire = c.encode_batch(batch, style)
                assert c.encode_batch(c.decode_batch(wire), style) == wire, style


# --- parameter packing ---------------------------------------------------------------------


class ParamsTarget(Target):
    name = "params"
    max_len = 512

    def load(self) -> None:
        from edgellm.protocol import params

        self.p = params

    def seeds(self) -> list[bytes]:
        return [self.p.set_param("ipc:///tmp/llm/1.sock", b'{"a":1}'), b"\x00", b"\x7f" + b"x" * 127,
                b"\x80abc", b""]  # fmt: skip

    def __call__(self, data: bytes) -> None:
        p = self.p
        try:
            p0, p1 = p.split_params(data)
        except p.ParamError:
            assert not data or data[0] > p.MAX_P0 or 1 + data[0] > len(data)
        else:
            assert data == bytes((len(p0),)) + p0 + p1
            assert p.get_param(data, 2) == p0 and p.get_param(data, 3) == p1
            assert p.set_param(p0, p1) == data
        cut = data[0] if data else 0
        first, second = data[1 : 1 + cut], data[1 + cut :]
        try:
            packed = p.set_param(first, second)
        except p.ParamError:
            assert len(first) > p.MAX_P0
        else:
            assert p.split_params(packed) == (first, second)
        text = data.decode("utf-8", errors="replace")
        try:
            packed = p.set_param(text[:cut], text[cut:])
        except p.ParamError:
            assert len(text[:cut].encode()) > p.MAX_P0
        else:
            assert p.split_params(packed) == (text[:cut].encode(), text[cut:].encode())


# Modules of their own: the gateway's bodies (a tokenizer behind them), the C extension's model
from _fuzz_gateway import GatewayTarget  # noqa: E402
from _fuzz_rows import RowsTarget  # noqa: E402

TARGETS: dict[str, Callable[[], Target]] = {
    t.name: t for t in (FramerTarget, KvEventsTarget, ParamsTarget, GatewayTarget, RowsTarget)
}
