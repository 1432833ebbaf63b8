"""The DIMSE listener's socket options on each association: TCP_NODELAY once the connection opens (a C-FIND
answer is several PDUs), TCP_QUICKACK re-armed after every PDU sent (a peer with Nagle's algorithm on holds a
PDU's body until its header is acknowledged). Checked on a real loopback connection, through the handlers
the listener binds."""

from __future__ import annotations

import socket

import pytest
from pynetdicom import evt

from gateway.handlers.dimse import DimseListener


@pytest.fixture
def pair():
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    yield accepted, client
    for s in (accepted, client, server):
        s.close()


def _event(sock):
    dul = type("Dul", (), {"socket": type("AssocSocket", (), {"socket": sock})()})()
    return type("Event", (), {"assoc": type("Assoc", (), {"dul": dul})()})()


def test_nodelay_when_the_connection_opens(pair):
    accepted, _ = pair
    assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    DimseListener.on_connected(_event(accepted))
    assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux's")
def test_quickack_rearmed_after_each_pdu_sent(pair):
    accepted, client = pair
    for _ in range(3):
        accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)  # (as after a quick reply: delayed ACKs)
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 0
        accepted.sendall(b"\x04\x00\x00\x00\x00\x02\x00\x00")
        DimseListener.on_sent(_event(accepted))
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1
        client.recv(64)


def test_handlers_bound_on_the_server(tmp_path):
    from gateway.settings import Settings

    settings = Settings(data_dir=str(tmp_path), dimse_port=1, dimse_accept_unknown="pacs")
    listener = DimseListener.__new__(DimseListener)
    listener.settings = settings
    bound = {}

    class _AE:
        supported_contexts = []

        def start_server(self, address, block, evt_handlers, ssl_context, contexts):
            bound.update({e: h for e, h in evt_handlers})
            return type("Server", (), {"server_address": ("127.0.0.1", 1)})()

    listener.ae = _AE()
    listener.start()
    assert bound[evt.EVT_CONN_OPEN] == listener.on_connected and bound[evt.EVT_PDU_SENT] == listener.on_sent
