"""Keyset cursors of FHIR search ``next`` links (FHIR R4 §3.1.1.6 "Paging": the server decides how
paging links are formed; a client follows them as given).

A cursor is ``base64url(payload) "." base64url(mac)``: the payload holds the keyset of the last row a
page returned (its ``_sort`` key values, then its ``rid``) and how many rows came before the next page;
the MAC (HMAC-SHA-256, first 128 bits) covers the payload *and* what the cursor is bound to — the
search's canonical form (:func:`mappings.fhir.search.search_signature`, its compartment) and the
requester (subject, organisation, roles, purpose).  A cursor that was altered, or presented with another
search or by another requester, is refused (400); so it cannot be used to learn anything about other
rows.  And it carries no rights: the page it names is still read by the same consent-scoped query as the
first page (``gateway.store.fhir_repo.search``), so a valid cursor only says *where* to resume.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import TYPE_CHECKING

import orjson

from gateway.errors import BadRequest

if TYPE_CHECKING:  # pragma: no cover
    from gateway.context import Requester
    from mappings.fhir.search import SearchQuery

_INVALID = ("_cursor is not valid for this search: it was altered, or belongs to another search or requester; "
            "start again from the first page")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class CursorCodec:
    """Issues and checks cursors with one server key (the same in every serving process)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    @staticmethod
    def _binding(q: "SearchQuery", requester: "Requester") -> bytes:
        who = (requester.subject, requester.organization or "", ",".join(sorted(requester.roles)),
               requester.purpose.describe())
        return orjson.dumps([q.signature, q.compartment or "", *who])

    def _mac(self, payload: bytes, q: "SearchQuery", requester: "Requester") -> bytes:
        return hmac.new(self._key, self._binding(q, requester) + b"\0" + payload, hashlib.sha256).digest()[:16]

    def issue(self, q: "SearchQuery", requester: "Requester", last_key: tuple, position: int) -> str:
        """The cursor of the page after the row with keyset ``last_key``; ``position``: rows before that page."""
        payload = orjson.dumps({"k": list(last_key), "n": position})
        return _b64(payload) + "." + _b64(self._mac(payload, q, requester))

    def open(self, q: "SearchQuery", requester: "Requester") -> None:
        """Check ``q.cursor`` and set ``q.after`` / ``q.position`` from it; BadRequest (400) if it is not one
        this server issued for this search and this requester."""
        token = q.cursor or ""
        head, _, tail = token.partition(".")
        try:
            payload, mac = _unb64(head), _unb64(tail)
        except (ValueError, UnicodeEncodeError):
            raise BadRequest(_INVALID, expression=["_cursor"]) from None
        if not hmac.compare_digest(mac, self._mac(payload, q, requester)):
            raise BadRequest(_INVALID, expression=["_cursor"])
        data = orjson.loads(payload)  # ours (the MAC matched): well formed
        keys, position = data["k"], data["n"]
        from gateway.store.fhir_search import keyset_width

        if len(keys) != keyset_width(q):  # (bound to the search, so only a server change could do this)
            raise BadRequest(_INVALID, expression=["_cursor"])
        q.after, q.position = tuple(keys), position
