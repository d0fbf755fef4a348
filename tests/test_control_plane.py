"""Each socket accepts only its own message types, from the peer that owns the request or the worker id (issue 12).

A rogue ZeroMQ peer (no key: the control plane has no authentication yet, docs/security.md) talks to a real
router and real workers: role switches, drains and generate requests on a worker's peer port are dropped; aborts
of a prefill it did not ask for are ignored; heartbeats for a registered worker from another connection, and token
output for a request from anyone but its decode worker, change nothing. Real requests keep their reference text.
With per-worker keys, a client holding another worker's allow-listed key (or the shared worker key) cannot
register as, heartbeat as, take over the connection of, or stream tokens for a worker id bound to its own key.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
import zmq

from conftest import shared_model_path
from splitserve.core.messages import (
    AbortReq, Drain, GenerateReq, Heartbeat, SamplingParams, SetRole, TokenOut, encode,
)
from test_e2e import REF_TEXT, complete, model_id, start_cluster

TOKEN = "cp-admin-token"


@pytest.fixture(scope="module")
def cp(tmp_path_factory):
    c = start_cluster(tmp_path_factory, "cp", model=str(shared_model_path("stories260K")),
                      worker_args=["--page-size", "8", "--num-pages", "256", "--heartbeat-s", "0.3"],
                      router_args=["--admin-token", TOKEN])
    yield c
    c.stop()


def _workers(c) -> dict[str, dict]:
    req = urllib.request.Request(f"{c.url}/admin/workers", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return {w["worker_id"]: w for w in json.load(r)["workers"]}


def _rogue(addr: str, identity: bytes | None = None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 2000)  # a send that cannot be queued raises zmq.Again instead of hanging the test
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(addr)
    return sock


def test_peer_port_takes_only_prefill_messages(cp):
    import openai

    workers = _workers(cp)
    prefill = workers["prefill-0"]
    sock = _rogue(prefill["peer_addr"])
    try:
        sock.send(encode(Drain()))
        sock.send(encode(SetRole(role="decode", epoch=99)))
        sock.send(encode(GenerateReq(request_id="rogue-1", prompt_token_ids=(1, 2, 3), params=SamplingParams())))
        sock.send(encode(AbortReq(request_id="anything", reason="rogue")))
        time.sleep(1.0)  # let a heartbeat carry any change (the assertion is that nothing changed)
        after = _workers(cp)["prefill-0"]
        assert after["role"] == "prefill" and not after["draining"]
        log = (cp.log_dir / "prefill-0.log").read_text()
        for kind in ("Drain", "SetRole", "GenerateReq"):
            assert f"{kind} is not accepted on the peer socket" in log
        client = openai.OpenAI(base_url=f"{cp.url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert complete(client, model_id(cp), "Once upon a time", max_tokens=32).choices[0].text == REF_TEXT
    finally:
        sock.close()


def test_router_ignores_heartbeats_and_tokens_from_the_wrong_connection(cp):
    import openai

    ctrl = f"tcp://127.0.0.1:{cp.control_port}"
    sock = _rogue(ctrl, identity=b"not-decode-1")
    try:
        forged = Heartbeat(worker_id="decode-1", role="decode", running=0, waiting=0, queued_tokens=0,
                           kv_pages_used=0, kv_pages_free=0, kv_pages_cached=0, draining=True, role_epoch=99)
        for _ in range(3):
            sock.send(encode(forged))
        client = openai.OpenAI(base_url=f"{cp.url}/v1", api_key="unused", max_retries=0, timeout=60)
        stream = complete(client, model_id(cp), "Once upon a time", max_tokens=32, stream=True)
        text = ""
        for i, chunk in enumerate(stream):
            if i == 0:  # inject a forged final output for this live request
                sock.send(encode(TokenOut(request_id=chunk.id + "-0", token_ids=(5,), finish_reason="stop")))
                sock.send(encode(TokenOut(request_id=chunk.id, token_ids=(5,), finish_reason="stop")))
            text += chunk.choices[0].text
        assert text == REF_TEXT
        assert not _workers(cp)["decode-1"]["draining"]
        router_log = (cp.log_dir / "router.log").read_text()
        assert "heartbeat for worker decode-1 from another connection: dropped" in router_log
    finally:
        sock.close()


def _keyed_cluster(tmp_path_factory, name: str, worker_keys: tuple[str, ...] = ()):
    """A stories260K cluster whose processes authenticate with a fresh key set (named worker keys: ``worker_keys``)."""
    from splitserve.core.keys import write_keys

    keys_dir = str(tmp_path_factory.mktemp(f"{name}-keys"))
    write_keys(keys_dir, worker_keys)
    c = start_cluster(tmp_path_factory, name, model=str(shared_model_path("stories260K")),
                      worker_args=["--page-size", "8", "--num-pages", "256", "--heartbeat-s", "0.3",
                                   "--keys-dir", keys_dir],
                      router_args=["--admin-token", TOKEN, "--keys-dir", keys_dir])
    return c, keys_dir


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    c, keys_dir = _keyed_cluster(tmp_path_factory, "keyed")
    yield c, keys_dir
    c.stop()


def _register(worker_id: str, peer_addr: str = "tcp://127.0.0.1:1") -> bytes:
    from splitserve.core.messages import Register

    return encode(Register(worker_id=worker_id, role="decode", model_id="x", peer_addr=peer_addr,
                           transfer_addr=peer_addr, num_pages=9999, page_size=8, max_model_len=512, vocab_size=512))


def test_with_keys_a_peer_without_an_allow_listed_key_reaches_no_socket(keyed):
    """Authenticated control plane: plaintext and unknown-key peers never get a message through, keyed workers serve."""
    import openai

    c, _keys_dir = keyed
    workers = _workers(c)
    assert set(workers) == {"prefill-0", "decode-1"}
    stranger = zmq.curve_keypair()
    socks = []
    for curve in (None, stranger):  # no key at all, and a key the allow-list does not hold
        for addr, payload in ((f"tcp://127.0.0.1:{c.control_port}", _register(f"rogue-{len(socks)}")),
                              (workers["prefill-0"]["peer_addr"], encode(Drain())),
                              (workers["decode-1"]["peer_addr"], encode(SetRole(role="prefill", epoch=99)))):
            sock = _rogue(addr)
            if curve is not None:
                sock.curve_publickey, sock.curve_secretkey = curve
                sock.curve_serverkey = zmq.curve_keypair()[0]
            try:
                sock.send(payload)
            except zmq.Again:  # the refused handshake left no pipe to queue on: nothing was sent at all
                pass
            socks.append(sock)
    try:
        time.sleep(1.0)  # heartbeats would carry any change; the assertion is that nothing changed
        after = _workers(c)
        assert set(after) == {"prefill-0", "decode-1"}
        assert after["prefill-0"]["role"] == "prefill" and not after["prefill-0"]["draining"]
        assert after["decode-1"]["role"] == "decode"
        client = openai.OpenAI(base_url=f"{c.url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert complete(client, model_id(c), "Once upon a time", max_tokens=32).choices[0].text == REF_TEXT
        log = (c.log_dir / "prefill-0.log").read_text()
        assert "not accepted on the peer socket" not in log  # nothing was even delivered
    finally:
        for s in socks:
            s.close()


# --- per-worker keys: a worker id is bound to its key -------------------------------------------------------------


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    """Workers with their own named keys; ``intruder-0`` is a third allow-listed worker key held by the test."""
    c, keys_dir = _keyed_cluster(tmp_path_factory, "named", ("prefill-0", "decode-1", "intruder-0"))
    yield c, keys_dir
    c.stop()


def _keyed_rogue(addr: str, keys_dir: str, key_name: str, identity: bytes | None = None) -> zmq.Socket:
    """A client holding the allow-listed key ``key_name`` (another worker's, or the shared worker key)."""
    import os

    import zmq.auth

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 2000)  # a send that cannot be queued raises zmq.Again instead of hanging the test
    sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(
        os.path.join(keys_dir, f"{key_name}.key_secret"))
    sock.curve_serverkey = zmq.auth.load_certificate(os.path.join(keys_dir, "public", "router.key"))[0]
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(addr)
    return sock


def test_named_keys_another_workers_key_cannot_speak_for_a_worker_id(named):
    """Worker A's key (and the shared worker key) cannot register as, heartbeat as, take over the connection of, or
    stream tokens for worker B; B keeps serving with the reference text."""
    import openai

    c, keys_dir = named
    ctrl = f"tcp://127.0.0.1:{c.control_port}"
    forged_hb = Heartbeat(worker_id="decode-1", role="decode", running=0, waiting=0, queued_tokens=0,
                          kv_pages_used=0, kv_pages_free=0, kv_pages_cached=0, draining=True, role_epoch=99)
    socks = [_keyed_rogue(ctrl, keys_dir, "intruder-0", identity=b"decode-1"),  # the old identity takeover
             _keyed_rogue(ctrl, keys_dir, "intruder-0"), _keyed_rogue(ctrl, keys_dir, "worker")]
    try:
        for sock in socks:
            sock.send(_register("decode-1"))
            for _ in range(3):
                sock.send(encode(forged_hb))
        socks[1].send(_register("ghost-0"))  # a named key speaks for its own id only
        client = openai.OpenAI(base_url=f"{c.url}/v1", api_key="unused", max_retries=0, timeout=60)
        text = ""
        for i, chunk in enumerate(complete(client, model_id(c), "Once upon a time", max_tokens=32, stream=True)):
            if i == 0:  # forged final output for this live request, from every rogue
                for sock in socks:
                    for rid in (chunk.id, chunk.id + "-0"):
                        sock.send(encode(TokenOut(request_id=rid, token_ids=(5,), finish_reason="stop")))
            text += chunk.choices[0].text
        assert text == REF_TEXT
        time.sleep(1.0)  # heartbeats would carry any change; the assertion is that nothing changed
        after = _workers(c)
        assert set(after) == {"prefill-0", "decode-1"}
        assert after["decode-1"]["role"] == "decode" and not after["decode-1"]["draining"]
        assert after["decode-1"]["healthy"]
        assert complete(client, model_id(c), "Once upon a time", max_tokens=32).choices[0].text == REF_TEXT
        log = (c.log_dir / "router.log").read_text()
        for kind in ("Register", "Heartbeat", "TokenOut"):
            assert f"{kind} for worker decode-1 refused" in log
        assert "the named key of worker intruder-0 speaks only for intruder-0" in log
        assert "worker id decode-1 has a named key and this is another key" in log
        assert "worker decode-1 registered" in log and "(replaces previous entry)" not in log
        assert log.count("Heartbeat for worker decode-1 refused") == 1  # rate-limited: 9 refused, one line
        with urllib.request.urlopen(f"{c.url}/metrics", timeout=10) as resp:  # but every one is counted
            metrics = resp.read().decode()
        assert 'splitserve_control_refused_total{kind="Heartbeat"} 9.0' in metrics
        assert "CurveZMQ: decode-1 uses the decode-1 key pair" in (c.log_dir / "decode-1.log").read_text()
    finally:
        for s in socks:
            s.close()


def test_a_worker_id_is_bound_to_the_key_it_registered_with():
    """Without named keys (a shared key set, or keys the router has no name for): the first key that registers an id
    owns it while it stays registered; the same key re-registers (a restart), another is refused everywhere."""
    from splitserve.core.messages import Register
    from splitserve.router.control import ControlPlane
    from splitserve.router.pools import WorkerRegistry

    cp = ControlPlane(None, WorkerRegistry(heartbeat_timeout_s=5.0), "127.0.0.1", 0)
    reg = Register(worker_id="d-0", role="decode", model_id="x", peer_addr="tcp://127.0.0.1:1",
                   transfer_addr="tcp://127.0.0.1:1", num_pages=8, page_size=8, max_model_len=64, vocab_size=512)
    hb = Heartbeat(worker_id="d-0", role="decode", running=0, waiting=0, queued_tokens=0, kv_pages_used=0,
                   kv_pages_free=0, kv_pages_cached=0, draining=True, role_epoch=0)
    cp._dispatch(b"d-0/a", reg, "KEY-A")
    cp._dispatch(b"d-0/b", reg, "KEY-B")  # another key: refused
    cp._dispatch(b"d-0/a", hb, "KEY-B")  # even on the registered connection (a handover)
    w = cp.registry.get("d-0")
    assert w.identity == b"d-0/a" and w.curve_key == "KEY-A" and not w.draining
    assert cp.refused == {"Register": 1, "Heartbeat": 1}
    cp._dispatch(b"d-0/c", reg, "KEY-A")  # the same key after a restart: accepted
    assert cp.registry.get("d-0").identity == b"d-0/c" and cp.registry.get("d-0").restarts == 1
    assert cp.key_mismatch("d-0", None) is None  # a socket without keys checks connections only


def test_a_steps_tokens_in_one_frame_give_first_tokens_first_and_are_checked_one_by_one():
    """``TokenOuts``: each output is checked as a ``TokenOut`` alone (only the request's decode worker streams it);
    outputs of requests still waiting for their first token are queued before the others, and one request's
    outputs keep their order."""
    from splitserve.core.messages import Register, TokenOuts
    from splitserve.router.control import ControlPlane
    from splitserve.router.pools import WorkerRegistry

    cp = ControlPlane(None, WorkerRegistry(heartbeat_timeout_s=5.0), "127.0.0.1", 0)
    for wid in ("d-0", "d-1"):
        cp._dispatch(f"{wid}/a".encode(), Register(worker_id=wid, role="decode", model_id="x", peer_addr="tcp://h:1",
                                                   transfer_addr="tcp://h:1", num_pages=8, page_size=8,
                                                   max_model_len=64, vocab_size=512))
    order: list[tuple[str, tuple[int, ...]]] = []
    streams = {}
    for rid, wid in (("old", "d-0"), ("new", "d-0"), ("other", "d-1")):
        streams[rid] = cp.open_stream(rid, cp.registry.get(wid), None, 10)
        streams[rid].queue.put_nowait = lambda out: order.append((out.request_id, out.token_ids))
    streams["old"].first_token_seen = True
    batch = TokenOuts(outs=(TokenOut(request_id="old", token_ids=(1,)), TokenOut(request_id="other", token_ids=(9,)),
                            TokenOut(request_id="new", token_ids=(2,)), TokenOut(request_id="old", token_ids=(3,),
                                                                                  finish_reason="stop")))
    cp._dispatch(b"d-0/a", batch)
    assert order == [("new", (2,)), ("old", (1,)), ("old", (3,))]  # "other" is d-1's request: dropped
    assert streams["new"].first_token_seen
