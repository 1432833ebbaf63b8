"""``fedgate serve --processes N``: the parent's dispatcher hands DIMSE connections to the serving process with
the fewest open associations, and marks one accepted while ``dimse_max_associations`` are open in all
processes together (that process rejects it); the children's reports of taken and open associations free
the room again. Real socket pairs, the descriptors passed as the parent passes them."""

from __future__ import annotations

import socket

import pytest

from gateway.serve import _DIMSE, _DIMSE_OVER, _HTTP, _REPORT, _Child, _Dispatcher


@pytest.fixture
def dispatch():
    children = [_Child(0), _Child(1)]
    listener, dimse = socket.socket(), socket.socket()
    d = _Dispatcher(listener, children, dimse, dimse_max=3)
    ends = [d.attach(c) for c in children]
    yield d, children, ends
    for c in children:
        d._detach(c)
    for s in (listener, dimse, *ends):
        s.close()


def _received(end: socket.socket) -> list[bytes]:
    """The hand-over messages waiting on a child's end (their descriptors closed)."""
    end.setblocking(False)
    out = []
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(end, 16, 4)
        except BlockingIOError:
            return out
        for fd in fds:
            socket.socket(fileno=fd).close()
        out.append(msg)


def _hand(d: _Dispatcher, dimse: bool) -> None:
    a, b = socket.socketpair()
    try:
        assert d._hand(a, dimse)
    finally:
        a.close()
        b.close()


def test_associations_alternate_and_the_limit_holds_across_processes(dispatch):
    d, (c0, c1), (e0, e1) = dispatch
    for _ in range(3):
        _hand(d, True)
    assert (c0.dimse_handed, c1.dimse_handed) == (2, 1)
    assert _received(e0) == [_DIMSE, _DIMSE] and _received(e1) == [_DIMSE]
    _hand(d, True)  # three open in all: the fourth is handed over marked (rejected there)
    assert _received(e1) == [_DIMSE_OVER]
    # both report: c0 took its two and one ended; c1 took its two and the rejected one ended
    e0.send(_REPORT.pack(0, 0, 2, 1))
    e1.send(_REPORT.pack(0, 0, 2, 1))
    d._read_reports(c0)
    d._read_reports(c1)
    assert (c0.dimse_load(), c1.dimse_load()) == (1, 1)
    _hand(d, True)  # two open: room for one more
    assert _received(e0) + _received(e1) == [_DIMSE]


def test_http_and_dimse_loads_are_counted_apart(dispatch):
    d, (c0, c1), (e0, e1) = dispatch
    _hand(d, False)
    _hand(d, False)
    assert (c0.handed, c1.handed) == (1, 1) and c0.dimse_handed == c1.dimse_handed == 0
    assert _received(e0) == [_HTTP] and _received(e1) == [_HTTP]
    e1.send(_REPORT.pack(1, 0, 0, 0))  # c1's HTTP connection closed: the association goes there
    d._read_reports(c1)
    _hand(d, True)
    assert _received(e1) == [_DIMSE] and _received(e0) == []
    assert c1.dimse_handed == 1 and c1.handed == 1


def test_without_a_limit_none_is_marked(dispatch):
    d, _, ends = dispatch
    d.dimse_max = 0
    for _ in range(6):
        _hand(d, True)
    assert sorted(m for e in ends for m in _received(e)) == [_DIMSE] * 6
