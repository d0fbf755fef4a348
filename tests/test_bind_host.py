"""UCX and NIXL listeners follow the configured transfer host (issue 12), on CPU.

1. The TCP sockets this process listens on are read from ``/proc/net/tcp{,6}`` (state LISTEN) and matched to this
   process by socket inode (``/proc/self/fd``): the listeners a receiver or an engine opens are the difference
   before and after it is made.
2. A UCX receiver bound to 127.0.0.1 (and, where this host has one, to a non-loopback address) listens there only:
   no 0.0.0.0 listener (ucxx's socket listener, which cannot be bound, is gone; senders connect by the receiver's
   UCX worker address) and UCX's TCP transport on that interface alone; a sender still delivers every byte to it.
3. A NIXL engine given a host: the same.
4. :func:`net_devices` leaves UCX alone for a wildcard host, a host on no interface, or ``UCX_NET_DEVICES`` set.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from splitserve.transfer.base import TransferError  # noqa: E402
from test_transfer import sender  # noqa: E402,F401 - the sender-process fixture


def _ucx_unavailable() -> str | None:
    try:
        from splitserve.transfer.ucx_backend import ucx_unavailable_reason
    except ImportError as exc:
        return str(exc)
    return ucx_unavailable_reason()


def _hex_ip(text: str) -> str:
    """The address of a ``/proc/net/tcp{,6}`` ``local_address`` field (``0100007F:1F90``) as text."""
    raw = bytes.fromhex(text.split(":")[0])
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = struct.unpack("<4I", raw)
    return socket.inet_ntop(socket.AF_INET6, struct.pack(">4I", *words))


def listening_addresses() -> set[tuple[str, str]]:
    """(address, port hex) of every TCP socket this process listens on."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                out.add((_hex_ip(fields[1]), fields[1].split(":")[1]))
    return out


def non_loopback_ipv4() -> str | None:
    from splitserve.transfer.ucx_backend import _interface_ipv4

    for _index, name in socket.if_nameindex():
        addr = _interface_ipv4(name)
        if addr is not None and not addr.startswith("127."):
            return addr
    return None


def _hosts() -> list[str]:
    hosts = ["127.0.0.1"]
    other = non_loopback_ipv4() if sys.platform == "linux" else None
    return hosts + ([other] if other else [])


needs_ucx = pytest.mark.skipif(_ucx_unavailable() is not None, reason=f"ucx: {_ucx_unavailable()}")


@needs_ucx
@pytest.mark.parametrize("host", _hosts())
def test_ucx_receiver_listens_on_the_configured_host_only(host):
    from test_transfer import Receiver

    before = listening_addresses()
    rx = Receiver("ucx", 8, host=host)
    try:
        opened = listening_addresses() - before
        assert opened, "the receiver opened no listener"
        assert {addr for addr, _port in opened} == {host}, opened
        assert rx.rx.address.startswith(f"ucx://{host}/")
    finally:
        rx.rx.close()


@needs_ucx
def test_a_sender_in_another_process_reaches_the_bound_ucx_receiver(sender):
    from test_transfer import Receiver, check_landed, run_round_trip

    rx = Receiver("ucx", 8, host="127.0.0.1")
    try:
        jobs, final, report = run_round_trip(sender, rx, "ucx", 16, [5, 40], seed=3)
        check_landed(rx, jobs, 16, 3, final, report)
    finally:
        rx.rx.close()


@needs_ucx
def test_ucx_receiver_addresses_are_checked():
    from splitserve.transfer.ucx_backend import receiver_address, split_address

    addr = receiver_address("10.0.0.1", b"\x01\x02\xff", "tcp://10.0.0.1:5000")
    assert split_address(addr) == ("tcp://10.0.0.1:5000", b"\x01\x02\xff")
    for bad in ("tcp://10.0.0.1:5000", "ucx://10.0.0.1:4000,tcp://10.0.0.1:5000", "ucx://h/zz,tcp://h:1",
                "ucx://h/0102"):
        with pytest.raises(TransferError):
            split_address(bad)


def test_net_devices_leave_ucx_alone_for_wildcards_unknown_hosts_and_the_environment():
    from splitserve.transfer.ucx_backend import net_devices

    assert net_devices("0.0.0.0", environ={}) is None and net_devices("::", environ={}) is None
    assert net_devices("127.0.0.1", environ={"UCX_NET_DEVICES": "eth1"}) is None
    assert net_devices("192.0.2.254" if non_loopback_ipv4() != "192.0.2.254" else "198.51.100.7", environ={}) is None
    loopback = net_devices("127.0.0.1", environ={})
    assert loopback is not None and loopback.split(",")[0] in {name for _i, name in socket.if_nameindex()}


def _nixl_unavailable() -> str | None:
    try:
        from splitserve.transfer.nixl import NixlCopyEngine

        NixlCopyEngine().close()
    except (ImportError, TransferError) as exc:
        return str(exc)
    return None


@pytest.mark.skipif(_nixl_unavailable() is not None, reason=f"nixl: {_nixl_unavailable()}")
@pytest.mark.parametrize("host", _hosts())
def test_nixl_engine_listens_on_the_configured_host_only(host):
    from splitserve.transfer.nixl import NixlCopyEngine

    before = listening_addresses()
    engine = NixlCopyEngine(host=host)
    try:
        engine.allocate((2, 2, 4, 8, 2, 8), torch.float32, torch.device("cpu"))
        opened = listening_addresses() - before
        assert {addr for addr, _port in opened} <= {host}, opened
        assert "UCX_NET_DEVICES" not in os.environ  # set only while the agent is made
    finally:
        engine.close()
