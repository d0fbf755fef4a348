"""Fuzz every decoder that reads network input, then the live sockets behind them.

1. Strategies for valid messages come from msgspec's own introspection of each message class
   (:func:`msgspec.inspect.type_info`), so a field added to a message is fuzzed without touching this file.
2. Round trip: for every control-plane message and every KV-channel frame, ``decode(encode(msg)) == msg``.
3. Hostile input: random bytes, random msgpack of the right shape with wrong types, valid frames truncated or with
   trailing bytes, the largest and smallest msgpack ints in every int field, and deep nesting: each decoder
   (``messages.decode``, ``wire.decode_sender_frame``, ``wire.decode_ack``) returns a message or raises its own
   error (``MessageError`` / ``FrameError``), never anything else.
4. Real processes: a few hundred random and mutated frames on the router's control socket, the workers' peer
   sockets and the decode worker's KV receiver; then every process is alive, none logged a traceback, the KV pages
   are free, and a real request still returns stories260K's reference text.
"""

from __future__ import annotations

import functools
import math
import random
import time
from typing import Any, Callable

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from splitserve.core import messages as msgs
from splitserve.transfer import wire

INT_MIN, UINT_MAX = -(2**63), 2**64 - 1
"""The ints msgpack can carry."""

CONTROL_TYPES = list(msgs.Message.__args__)
FRAME_TYPES = [*wire.SenderFrame.__args__, wire.Ack]
DECODERS: list[tuple[Callable[[bytes], Any], type[Exception], list[type]]] = [
    (msgs.decode, msgs.MessageError, CONTROL_TYPES),
    (wire.decode_sender_frame, wire.FrameError, list(wire.SenderFrame.__args__)),
    (wire.decode_ack, wire.FrameError, [wire.Ack]),
]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- strategies from msgspec introspection -------------------------------------------------------


def _int_strategy(t: mi.IntType) -> st.SearchStrategy:
    lo = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else INT_MIN)
    hi = t.le if t.le is not None else (t.lt - 1 if t.lt is not None else UINT_MAX)
    return st.one_of(st.integers(lo, hi), st.sampled_from([v for v in (lo, hi, 0) if lo <= v <= hi]))


def _float_strategy(t: mi.FloatType) -> st.SearchStrategy:
    lo = t.ge if t.ge is not None else t.gt
    hi = t.le if t.le is not None else t.lt
    return st.floats(lo, hi, allow_nan=False, exclude_min=t.gt is not None, exclude_max=t.lt is not None)


def strategy_for(t: mi.Type) -> st.SearchStrategy:
    """Values of msgspec type ``t``; NaN left out so that ``==`` can check round trips."""
    simple = {mi.NoneType: st.none(), mi.BoolType: st.booleans(), mi.StrType: st.text(max_size=40),
              mi.BytesType: st.binary(max_size=40)}
    if type(t) in simple:
        return simple[type(t)]
    if isinstance(t, mi.IntType):
        return _int_strategy(t)
    if isinstance(t, mi.FloatType):
        return _float_strategy(t)
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, mi.UnionType):
        return st.one_of([strategy_for(x) for x in t.types])
    if isinstance(t, mi.VarTupleType):
        return st.lists(strategy_for(t.item_type), max_size=6).map(tuple)
    if isinstance(t, mi.TupleType):
        return st.tuples(*(strategy_for(x) for x in t.item_types))
    if isinstance(t, mi.StructType):
        fields = {f.name: strategy_for(f.type) for f in t.fields}
        return st.fixed_dictionaries(fields).map(lambda kw: t.cls(**kw))
    raise NotImplementedError(f"no strategy for {t!r}: extend strategy_for")


def messages_of(types: list[type]) -> st.SearchStrategy:
    return _messages_of(tuple(types))


@functools.cache
def _messages_of(types: tuple[type, ...]) -> st.SearchStrategy:
    """Built once for each list of types: building (and on first draw, validating) the strategy of all control
    messages anew for each example was most of the fuzz tests' time (one of them: 12.8 s -> 1.8 s)."""
    return st.one_of([strategy_for(mi.type_info(cls)) for cls in types])


# msgpack-encodable values of any type: what a hostile peer can put in a field.
ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(INT_MIN, UINT_MAX) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def expect_only(decoder: Callable[[bytes], Any], error: type[Exception], data: bytes) -> Any:
    """Decode ``data``: a message or ``error``; anything else fails the test (``pytest.raises`` would hide it)."""
    try:
        return decoder(data)
    except error:
        return None


# --- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [*CONTROL_TYPES, *FRAME_TYPES], ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_message_type_round_trips(cls, data):
    """Every control message and transfer frame, with any field values: ``decode(encode(msg)) == msg``."""
    msg = data.draw(messages_of([cls]))
    if cls in CONTROL_TYPES:
        assert msgs.decode(msgs.encode(msg)) == msg
    else:
        decoder = wire.decode_ack if cls is wire.Ack else wire.decode_sender_frame
        assert decoder(wire.encode(msg)) == msg


def samples(types: list[type], n: int) -> list[Any]:
    """``n`` messages of ``types`` from the strategies above, the same ones every run."""
    out: list[Any] = []

    @settings(max_examples=n, derandomize=True, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(messages_of(types))
    def collect(msg):
        out.append(msg)

    collect()
    return out


# --- hostile input -------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder,error,_types", DECODERS, ids=lambda x: getattr(x, "__name__", ""))
@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_raise_only_the_decoders_error(decoder, error, _types, data):
    expect_only(decoder, error, data)


@pytest.mark.parametrize("decoder,error,types", DECODERS, ids=lambda x: getattr(x, "__name__", ""))
@FUZZ
@given(data=st.data())
def test_right_shape_wrong_types_raise_only_the_decoders_error(decoder, error, types, data):
    """A valid message as a msgpack map, one or more fields (or the tag) replaced by any msgpack value."""
    fields = msgspec.to_builtins(data.draw(messages_of(types)))
    for name in data.draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3)):
        fields[name] = data.draw(ANY_VALUE)
    if data.draw(st.booleans()):
        fields[data.draw(st.text(max_size=8))] = data.draw(ANY_VALUE)  # an unknown (or repeated) field
    expect_only(decoder, error, msgspec.msgpack.encode(fields))


@pytest.mark.parametrize("decoder,error,types", DECODERS, ids=lambda x: getattr(x, "__name__", ""))
@FUZZ
@given(data=st.data())
def test_truncated_or_padded_valid_frames_raise_the_decoders_error(decoder, error, types, data):
    raw = msgspec.msgpack.encode(data.draw(messages_of(types)))
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(error):
        decoder(raw[:cut])
    with pytest.raises(error):
        decoder(raw + data.draw(st.binary(min_size=1, max_size=8)))


@pytest.mark.parametrize("decoder,error,types", DECODERS, ids=lambda x: getattr(x, "__name__", ""))
@FUZZ
@given(data=st.data())
def test_mutated_valid_frames_raise_only_the_decoders_error(decoder, error, types, data):
    """A valid frame with a few bytes overwritten (what a flipped bit or a confused peer sends)."""
    raw = bytearray(msgspec.msgpack.encode(data.draw(messages_of(types))))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    expect_only(decoder, error, bytes(raw))


@pytest.mark.parametrize("decoder,error,types", DECODERS, ids=lambda x: getattr(x, "__name__", ""))
def test_invalid_utf8_in_every_field_and_the_tag(decoder, error, types):
    """A string that is not UTF-8 (msgpack str of bytes C3 28) as the tag, a key, and each field in turn."""
    bad = msgspec.Raw(b"\xa2\xc3\x28")
    for msg in samples(types, len(types)):
        fields = msgspec.to_builtins(msg)
        for name in fields:
            expect_only(decoder, error, msgspec.msgpack.encode({**fields, name: bad}))
        expect_only(decoder, error, msgspec.msgpack.encode(fields)[:1] + b"\xa2\xc3\x28\xc0")


@pytest.mark.parametrize("decoder,error,types", DECODERS, ids=lambda x: getattr(x, "__name__", ""))
@pytest.mark.parametrize("huge", [UINT_MAX, INT_MIN, 2**63, -1, 1e308, -math.inf])
def test_extreme_numbers_in_every_field(decoder, error, types, huge):
    """Every field of every message, in turn, set to an extreme number: a message or the decoder's error."""
    rng = random.Random(1)
    for msg in samples(types, 3 * len(types)):
        fields = msgspec.to_builtins(msg)
        for name in fields:
            expect_only(decoder, error, msgspec.msgpack.encode({**fields, name: huge}))
            expect_only(decoder, error, msgspec.msgpack.encode({**fields, name: [huge] * rng.randint(1, 3)}))


@pytest.mark.parametrize("decoder,error,types", DECODERS, ids=lambda x: getattr(x, "__name__", ""))
@pytest.mark.parametrize("depth", [100, 10_000, 1_000_000])
def test_deep_nesting_raises_the_decoders_error(decoder, error, types, depth):
    """Arrays and maps nested ``depth`` deep, at the top and in every field."""
    arrays, maps = b"\x91" * depth + b"\xc0", b"\x81\xa1k" * depth + b"\xc0"
    with pytest.raises(error):
        decoder(arrays)
    with pytest.raises(error):
        decoder(maps)
    for msg in samples(types, len(types)):
        fields = msgspec.to_builtins(msg)
        for name in fields:
            for deep in (arrays, maps):
                expect_only(decoder, error, msgspec.msgpack.encode({**fields, name: msgspec.Raw(deep)}))


# --- real processes --------------------------------------------------------------------------------


def junk_frames(rng: random.Random, valid: list[bytes]) -> list[list[bytes]]:
    """A few hundred multipart messages: random bytes, valid frames cut, flipped or padded, odd frame counts."""
    out: list[list[bytes]] = []
    for _ in range(300):
        base = rng.choice(valid)
        kind = rng.randrange(6)
        if kind == 0:
            body = rng.randbytes(rng.randint(0, 256))
        elif kind == 1:
            body = base[: rng.randrange(len(base))]
        elif kind == 2:
            pos = rng.randrange(len(base))
            body = base[:pos] + bytes([base[pos] ^ (1 << rng.randrange(8))]) + base[pos + 1:]
        elif kind == 3:
            body = base + rng.randbytes(rng.randint(1, 8))
        elif kind == 4:
            body = rng.choice([b"\x91", b"\x81\xa1k"]) * rng.randint(1, 100_000) + b"\xc0"  # deep arrays or maps
        else:
            body = base
        frames = [body] if rng.random() < 0.8 else [body] * rng.choice([0, 2, 3])
        out.append(frames or [b""])
    return out


def network_addresses(c) -> list[str]:
    """The router's control socket, every worker's peer socket and every KV receiver with a tcp:// address."""
    from test_e2e_ops import admin

    status, listing = admin(c, "GET", "/admin/workers")
    assert status == 200, listing
    addrs = [f"tcp://127.0.0.1:{c.control_port}"]
    addrs += [a for w in listing["workers"] for a in (w["peer_addr"], w["transfer_addr"]) if a.startswith("tcp://")]
    return addrs


def spray(addrs: list[str], messages: list[list[bytes]]) -> None:
    """Send every message to every address from a fresh DEALER (a peer without a key)."""
    import zmq

    ctx = zmq.Context()
    try:
        for addr in addrs:
            with ctx.socket(zmq.DEALER) as sock:
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(addr)
                for frames in messages:
                    sock.send_multipart(frames)
                time.sleep(0.5)  # let the peer read before the socket goes
    finally:
        ctx.term()


def test_live_sockets_survive_random_frames(tmp_path_factory):
    from test_e2e_chaos import assert_clean, model_id, start, still_serves
    from test_e2e_ops import TOKEN

    c = start(tmp_path_factory, "wire-fuzz", prefill=1, decode=1, router_args=["--admin-token", TOKEN],
              worker_args=["--page-size", "8", "--num-pages", "128", "--lease-s", "2"])
    try:
        addrs = network_addresses(c)
        assert len(addrs) >= 4, addrs  # control, two peer sockets, the decode worker's KV receiver
        # A well-formed Register is a registration: only CurveZMQ keys refuse it (test_control_plane.py), and this
        # cluster runs without keys so that the junk reaches the decoders. Every other type goes out as is.
        kinds = [cls for cls in (*CONTROL_TYPES, *FRAME_TYPES) if cls is not msgs.Register]
        spray(addrs, junk_frames(random.Random(12), [msgspec.msgpack.encode(m) for cls in kinds
                                                     for m in samples([cls], 3)]))
        assert all(p.poll() is None for p in c.procs.values()), {k: p.poll() for k, p in c.procs.items()}
        assert still_serves(c, model_id(c))
        assert_clean(c)
    finally:
        c.stop()
