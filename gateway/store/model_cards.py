"""The registered inference model cards (``inf_model_card``): what ``InferenceService`` and
``fedgate model list`` read and write.  Light on purpose (SQLAlchemy and orjson only): the CLI lists and
registers cards without starting the app (issue 27: ``fedgate model list`` in well under a second)."""

from __future__ import annotations

import time
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.store.jobs_schema import inf_model_card


class CardConflict(Exception):
    """A card with this name and version is registered with different content."""


def card_view(row) -> dict[str, Any]:
    return {"card": orjson.loads(row.card), "enabled": bool(row.enabled), "registered": row.registered_ts,
            "registeredBy": row.registered_by}


async def registered_cards(conn: AsyncConnection) -> list[dict[str, Any]]:
    rows = (await conn.execute(select(inf_model_card).order_by(inf_model_card.c.name, inf_model_card.c.version))).all()
    return [card_view(r) for r in rows]


async def store_card(conn: AsyncConnection, name: str, version: str, purpose: str, doc: Any,
                     by: str) -> tuple[dict[str, Any], bool]:
    """Register a (validated) card: (its view, True) when new, (the stored one, False) when the same card is
    there already; :class:`CardConflict` when the name and version hold a different card."""
    canon = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS).decode()
    key = (inf_model_card.c.name == name, inf_model_card.c.version == version)
    prev = (await conn.execute(select(inf_model_card).where(*key))).first()
    if prev is not None:
        if orjson.dumps(orjson.loads(prev.card), option=orjson.OPT_SORT_KEYS).decode() == canon:
            return card_view(prev), False
        raise CardConflict(f"{name}@{version}")
    await conn.execute(inf_model_card.insert().values(name=name, version=version, card=canon, purpose=purpose,
                                                      enabled=1, registered_by=by, registered_ts=time.time()))
    return card_view((await conn.execute(select(inf_model_card).where(*key))).one()), True
