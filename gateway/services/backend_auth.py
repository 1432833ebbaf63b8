"""SMART Backend Services authorisation (SMART App Launch 2.0 "Backend Services"; issue 24): the token endpoint.

A backend client (an export job's ETL, a research platform) is registered by the site with its public keys
(a JWKS) and the fedgate role, purpose of use and attested attributes its tokens act with (settings section
``[backend_clients.<client_id>]``, docs/bulk-export.md).  It asks ``POST /auth/token`` for an access token
with ``grant_type=client_credentials``, ``scope`` (``system/*.read``, ``system/Patient.read``, v2 ``.rs``) and a
``client_assertion``: a JWT it signed (RS384 or ES384) with ``iss`` = ``sub`` = its client id, ``aud`` = the
token endpoint URL, ``exp`` at most five minutes ahead and a ``jti`` never used before (kept in the store
until the assertion expires, so a replay is refused in every server process).  The answer is a short-lived
bearer token signed like fedgate's own (HS256 with the site's token secret): the client's role, purpose and
attributes, and the granted scopes.  The consent gate then treats the client like any requester of that
role and purpose.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import jwt
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError

from gateway.auth import parse_purpose
from gateway.context import ROLES
from gateway.errors import GatewayError
from gateway.settings import Settings
from gateway.store.bulk_schema import smart_jti
from gateway.store.db import Database

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: SMART Backend Services: servers SHALL support RS384 and ES384 (and may others; these only here)
ALGORITHMS = ("RS384", "ES384")
MAX_ASSERTION_S = 300
TOKEN_TTL_S = 300


class OAuthError(GatewayError):
    """An RFC 6749 §5.2 error (``error`` code + description), rendered as OAuth JSON by the token route."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message, status=status)
        self.oauth_code = code


@dataclass(frozen=True)
class BackendClient:
    client_id: str
    keys: jwt.PyJWKSet
    role: str
    purpose: Any = None
    attrs: Mapping[str, Any] | None = None
    #: the scopes it may be granted (a requested scope outside them is dropped)
    scopes: tuple[str, ...] = ("system/*.read",)


def load_clients(settings: Settings) -> dict[str, BackendClient]:
    """``[backend_clients.<id>]``: ``jwks`` (a JWKS object, or the path of a JWKS file), ``role``, ``purpose``
    (``treatment`` or DUO codes), ``attrs``, ``scopes``."""
    raw = settings.extra.get("backend_clients") or {}
    out = {}
    for cid, spec in raw.items() if isinstance(raw, dict) else ():
        if not isinstance(spec, dict):
            raise ValueError(f"backend_clients.{cid}: expected a table")
        doc = spec.get("jwks")
        if isinstance(doc, str):
            doc = json.loads(Path(doc).read_text())
        if not isinstance(doc, dict) or not doc.get("keys"):
            raise ValueError(f"backend_clients.{cid}.jwks: a JWKS (or its file) with at least one key")
        role = spec.get("role")
        if role not in ROLES:
            raise ValueError(f"backend_clients.{cid}.role: one of {sorted(ROLES)}")
        scopes = spec.get("scopes") or ["system/*.read"]
        out[cid] = BackendClient(cid, jwt.PyJWKSet.from_dict(doc), role, spec.get("purpose"),
                                 dict(spec.get("attrs") or {}), tuple(scopes))
    return out


def _scope_items(text: str) -> list[tuple[str, str, str]]:
    items = []
    for item in text.split():
        context, _, rest = item.partition("/")
        rtype, _, perm = rest.partition(".")
        items.append((context, rtype, perm.split("?")[0]))
    return items


def grant(requested: str, allowed: tuple[str, ...]) -> str:
    """The requested ``system/`` read scopes that ``allowed`` covers (``system/*.read`` covers every type;
    v1 ``read`` and v2 ``rs`` are the same grant here)."""
    ok = {(t, "read") for c, t, p in _scope_items(" ".join(allowed)) if c == "system" and p in ("read", "rs", "*")}
    out = []
    for c, t, p in _scope_items(requested):
        if c != "system" or p not in ("read", "rs"):
            continue  # writes and user/patient contexts are never granted to a backend client
        if (t, "read") in ok or ("*", "read") in ok:
            out.append(f"system/{t}.{p}")
    return " ".join(out)


class BackendAuth:
    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings, self.db = settings, db
        self.clients = load_clients(settings)

    async def token(self, form: Mapping[str, str], token_url: str) -> dict[str, Any]:
        if form.get("grant_type") != "client_credentials":
            raise OAuthError("unsupported_grant_type", "grant_type must be client_credentials")
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise OAuthError("invalid_request", f"client_assertion_type must be {ASSERTION_TYPE}")
        assertion = form.get("client_assertion") or ""
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise OAuthError("invalid_client", "client_assertion is not a JWT", 401) from None
        client = self.clients.get(str(unverified.get("iss")))
        if client is None:
            raise OAuthError("invalid_client", "client_assertion: unknown client (iss)", 401)
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise OAuthError("invalid_client", f"client_assertion: algorithm {alg!r} is not accepted "
                                               f"({', '.join(ALGORITHMS)})", 401)
        kid = header.get("kid")
        kty = "RSA" if alg.startswith("RS") else "EC"
        key = next((k for k in client.keys.keys if (kid is None or k.key_id == kid)
                    and getattr(k, "key_type", kty) == kty), None)
        if key is None:
            raise OAuthError("invalid_client", "client_assertion: signed by a key the client did not register", 401)
        try:
            claims = jwt.decode(assertion, key.key, algorithms=[alg], audience=token_url, issuer=client.client_id,
                                options={"require": ["iss", "sub", "aud", "exp", "jti"]}, leeway=5)
        except jwt.ExpiredSignatureError:
            raise OAuthError("invalid_client", "client_assertion expired", 401) from None
        except jwt.InvalidAudienceError:
            raise OAuthError("invalid_client", "client_assertion: aud must be the token endpoint URL", 401) from None
        except jwt.PyJWTError as exc:
            raise OAuthError("invalid_client", f"client_assertion rejected: {type(exc).__name__}", 401) from None
        except (TypeError, ValueError) as exc:
            raise OAuthError("invalid_client", f"client_assertion rejected: {type(exc).__name__}", 401) from None
        now = time.time()
        if claims.get("sub") != client.client_id:
            raise OAuthError("invalid_client", "client_assertion: sub must equal iss (the client id)", 401)
        if float(claims["exp"]) > now + MAX_ASSERTION_S + 5:
            raise OAuthError("invalid_client", f"client_assertion: exp more than {MAX_ASSERTION_S} s ahead", 401)
        scope = grant(form.get("scope") or "", client.scopes)
        if not scope:
            raise OAuthError("invalid_scope", "no requested scope can be granted (system/*.read, system/[type].read)")
        await self._spend(client.client_id, str(claims["jti"]), float(claims["exp"]), now)
        parse_purpose(client.purpose)  # checked: a wrong purpose in the settings fails here, not at use
        token_claims: dict[str, Any] = {
            "sub": client.client_id, "roles": [client.role], "scope": scope, "iat": int(now),
            "exp": int(now) + TOKEN_TTL_S, "iss": self.settings.jwt_issuer, "aud": self.settings.jwt_audience,
            "jti": str(uuid.uuid4()), "client_id": client.client_id,
        }
        if client.purpose is not None:
            token_claims["purpose"] = client.purpose
        if client.attrs:
            token_claims["attrs"] = dict(client.attrs)
        token = jwt.encode(token_claims, self.settings.dev_secret(), algorithm="HS256")
        return {"access_token": token, "token_type": "bearer", "expires_in": TOKEN_TTL_S, "scope": scope}

    async def _spend(self, client_id: str, jti: str, exp: float, now: float) -> None:
        """Record the assertion's jti; one already recorded (and not yet expired) is a replay."""
        async with self.db.write() as conn:
            await conn.execute(delete(smart_jti).where(smart_jti.c.exp < now - 60))
        try:
            async with self.db.write() as conn:
                await conn.execute(smart_jti.insert().values(jti=f"{client_id} {jti}"[:255], client_id=client_id,
                                                             exp=exp))
        except IntegrityError:
            raise OAuthError("invalid_client", "client_assertion: jti already used (replay)", 401) from None


__all__ = ["BackendAuth", "OAuthError", "grant", "load_clients"]
