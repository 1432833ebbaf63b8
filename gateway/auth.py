"""Bearer-token authentication: JWT → :class:`~gateway.context.Requester` (decides nothing else).

* Development: HS256 with the shared secret in ``data_dir/secrets`` (``fedgate token`` signs with it).
* Production: RS256/ES256 verified against a JWKS (file path or URL, fetched at start-up).

Claims: ``sub``, ``roles`` (list), ``org``, ``purpose`` (``"treatment"`` or
``{"codes": [DUO CURIEs], "diseases": [...]}``), ``attrs`` (requester attributes for DUO modifiers:
``not_for_profit``, ``irb_approved``, ``location``, ...), ``exp``, ``iat``, ``iss``, ``aud``, ``jti``.
The purpose may also come in the ``X-Purpose-Of-Use`` header (``treatment`` or space/comma separated
CURIEs: DUO terms are purpose codes, anything else is a disease); a token purpose wins over the header.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Mapping

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.context import CLINICAL_ROLES, ROLES, TREATMENT, Purpose, Requester
from gateway.errors import BadRequest, Forbidden, Unauthorized
from gateway.settings import Settings, SettingsError, secret_file

if TYPE_CHECKING:  # pragma: no cover
    from gateway.services.federation import FederationConfig

PURPOSE_HEADER = "X-Purpose-Of-Use"

#: SMART App Launch scope contexts → the fedgate role a token with such scopes acts as (docs/fhir.md, "SMART").
#: ``patient/`` scopes act as a clinician restricted to the launch patient's compartment (and read only).
SMART_CONTEXT_ROLES = {"user": "clinician", "system": "ehr-system", "patient": "clinician"}
_SMART_TYPE = re.compile(r"\*|[A-Z][A-Za-z]{1,63}")


@dataclass(frozen=True, slots=True)
class SmartGrant:
    """What a token's SMART scopes grant (SMART App Launch 2.x §"Scopes and Launch Context")."""

    roles: frozenset[str] = frozenset()
    read_only: bool = False
    #: resource types granted; None = every type (a ``*`` scope)
    types: frozenset[str] | None = None
    #: every granted data scope is ``patient/``: the token reads one patient's compartment only
    patient_only: bool = False


def _scope_items(scope: Any) -> list[str]:
    if isinstance(scope, list):
        return [str(s) for s in scope]
    return scope.split() if isinstance(scope, str) else []


def smart_grant(scope: Any) -> SmartGrant:
    """The grant of SMART data scopes ``(patient|user|system)/(Type|*).(perm)``: v1 ``read``/``write``/``*``,
    v2 ``c r u d s`` in that order, each once.  Fails closed: a v2 scope with query constraints
    (``patient/Observation.rs?category=laboratory``) grants nothing (fedgate cannot narrow a role by them),
    and ``patient/`` write permissions are not granted (a patient-context token reads only).  Other scopes
    (``openid``, ``fhirUser``, ``launch/patient``, ``offline_access``) are not data scopes."""
    granted: list[tuple[str, str, bool]] = []  # (context, type, writes)
    for item in _scope_items(scope):
        context, _, rest = item.partition("/")
        rtype, _, perm = rest.partition(".")
        if context not in SMART_CONTEXT_ROLES or not _SMART_TYPE.fullmatch(rtype) or not perm or "?" in perm:
            continue
        if perm in ("read", "write", "*"):
            reads, writes = perm in ("read", "*"), perm in ("write", "*")
        elif (set(perm) <= set("cruds") and len(set(perm)) == len(perm)
              and list(perm) == sorted(perm, key="cruds".index)):
            reads, writes = bool(set(perm) & set("rs")), bool(set(perm) & set("cud"))
        else:
            continue
        if context == "patient":
            writes = False
        if reads or writes:
            granted.append((context, rtype, writes))
    if not granted:
        return SmartGrant()
    patient_only = all(c == "patient" for c, _, _ in granted)
    if not patient_only:  # user/system scopes decide; patient/ ones would only add types beyond them
        granted = [g for g in granted if g[0] != "patient"]
    types = None if any(t == "*" for _, t, _ in granted) else frozenset(t for _, t, _ in granted)
    return SmartGrant(frozenset(SMART_CONTEXT_ROLES[c] for c, _, _ in granted),
                      not any(w for _, _, w in granted), types, patient_only)


def smart_roles(scope: Any) -> tuple[frozenset[str], bool]:
    """Roles and read-only flag from SMART scopes (:func:`smart_grant`)."""
    g = smart_grant(scope)
    return g.roles, g.read_only


def scope_resource_types(scope: Any) -> frozenset[str] | None:
    """The resource types SMART scopes grant (``system/Patient.read``, ``patient/Observation.rs``); None when a
    scope covers every type (``*``) or there is no SMART scope."""
    return smart_grant(scope).types


def launch_patient(claims: Mapping[str, Any]) -> str | None:
    """The patient a token is bound to: SMART's ``patient`` launch-context claim, else a ``fhirUser`` that is
    a Patient (``Patient/x`` or ``https://.../Patient/x``); None when neither."""
    pid = claims.get("patient")
    if pid is None:
        user = claims.get("fhirUser")
        if isinstance(user, str):
            m = re.search(r"(?:^|/)Patient/([^/]+)$", user)
            pid = m.group(1) if m else None
    if pid is None:
        return None
    if not isinstance(pid, str) or not re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", pid):
        raise Unauthorized("bearer token claim 'patient' is not a FHIR Patient id")
    return pid


def parse_purpose(value: Any) -> Purpose | None:
    """A purpose from a claim (str or object) or header text; None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, Mapping):
        if value.get("kind") == TREATMENT:
            return Purpose()
        codes = tuple(str(c) for c in value.get("codes") or ())
        diseases = tuple(str(d) for d in value.get("diseases") or ())
        if not codes:
            raise BadRequest("purpose: research purpose needs at least one DUO code")
        return Purpose("research", codes, diseases)
    text = str(value).strip()
    if text.lower() in (TREATMENT, "clinical-care", "treat"):
        return Purpose()
    items = [t for t in text.replace(",", " ").split() if t]
    codes = tuple(t for t in items if "DUO" in t.upper())
    diseases = tuple(t for t in items if "DUO" not in t.upper())
    if not codes:
        raise BadRequest(f"{PURPOSE_HEADER}: expected 'treatment' or DUO purpose codes")
    return Purpose("research", codes, diseases)


def jwt_failure(what: str, exc: jwt.PyJWTError, *, audience: str = "audience is not this gateway") -> Unauthorized:
    """The 401 for a token PyJWT refused, in words (``what``: "bearer token", "hub token")."""
    for cls, reason in ((jwt.ExpiredSignatureError, "expired"), (jwt.InvalidSignatureError, "signature is invalid"),
                        (jwt.ImmatureSignatureError, "not valid yet (nbf)"),
                        (jwt.InvalidIssuerError, "issuer is not accepted"), (jwt.InvalidAudienceError, audience)):
        if isinstance(exc, cls):
            return Unauthorized(f"{what} {reason}")
    return Unauthorized(f"{what} rejected: {type(exc).__name__}")


class TokenVerifier:
    def __init__(self, settings: Settings, jwks: Mapping[str, Any] | None = None) -> None:
        self.settings = settings
        self._secret = settings.dev_secret()
        self._cache: dict[tuple[str, str | None], tuple[Requester, float]] = {}
        self._jwks = jwt.PyJWKSet.from_dict(dict(jwks)) if jwks else None
        #: the OIDC issuer's discovery document (``viewer_oidc_authority``), fetched at start-up
        self.oidc_metadata: dict[str, Any] = {}
        self._role_map = dict(item.split("=", 1) for item in settings.oidc_role_map.replace(",", " ").split())
        if self._jwks is None and settings.jwks and not settings.jwks.startswith(("http://", "https://")):
            self._jwks = jwt.PyJWKSet.from_dict(json.loads(Path(settings.jwks).read_text()))

    def _issuer_roles(self, claims: dict[str, Any]) -> dict[str, Any]:
        """An issuer's token with its roles claim (``oidc_roles_claim``, a dotted path) mapped through
        ``oidc_role_map`` into ``roles``; values that map to no fedgate role are dropped."""
        path = self.settings.oidc_roles_claim or "roles"
        value: Any = claims
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str):
            value = value.split()
        if not isinstance(value, list):
            return {**claims, "roles": []} if path != "roles" else claims
        roles = [self._role_map.get(str(v), str(v) if not self._role_map else "") for v in value]
        return {**claims, "roles": [r for r in roles if r in ROLES]}

    def load_remote_jwks(self, doc: Mapping[str, Any]) -> None:
        self._jwks = jwt.PyJWKSet.from_dict(dict(doc))
        self._cache.clear()

    #: A verified token is remembered this long (never past its ``exp``): the same client sends the same
    #: token on every request, and signature + claim checks are a large part of a small request.
    CACHE_TTL_S = 60.0
    CACHE_MAX = 4096

    def verify(self, token: str, purpose_header: str | None = None) -> Requester:
        key = (token, purpose_header)
        now = time.time()
        hit = self._cache.get(key)
        if hit is not None and now < hit[1]:
            return hit[0]
        requester, exp = self._verify(token, purpose_header)
        if len(self._cache) >= self.CACHE_MAX:
            self._cache.clear()
        self._cache[key] = (requester, min(exp, now + self.CACHE_TTL_S))
        return requester

    def _verify(self, token: str, purpose_header: str | None) -> tuple[Requester, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("bearer token is not a JWT") from None
        alg = header.get("alg")
        opts = {"require": ["exp", "sub"]}
        try:
            if alg == "HS256":
                claims = jwt.decode(token, self._secret, algorithms=["HS256"], audience=self.settings.jwt_audience,
                                    issuer=self.settings.jwt_issuer, options=opts)
            elif alg in ("RS256", "ES256") and self._jwks is not None:
                kid = header.get("kid")
                kty = "RSA" if alg == "RS256" else "EC"  # a key of the other family cannot verify it (was a 500)
                key = next((k for k in self._jwks.keys if (kid is None or k.key_id == kid)
                            and getattr(k, "key_type", kty) == kty), None)
                if key is None:
                    raise Unauthorized("bearer token signed by an unknown key")
                claims = jwt.decode(token, key.key, algorithms=[alg], audience=self.settings.jwt_audience,
                                    issuer=self.oidc_metadata.get("issuer") or self.settings.jwt_issuer, options=opts)
                claims = self._issuer_roles(claims)
            elif alg in ("RS256", "ES256"):
                raise Unauthorized(f"bearer token algorithm {alg!r} needs a configured JWKS (settings.jwks)")
            else:
                raise Unauthorized(f"bearer token algorithm {alg!r} is not accepted")
        except jwt.PyJWTError as exc:
            raise jwt_failure("bearer token", exc) from None
        except (TypeError, ValueError, AttributeError) as exc:  # key material the algorithm cannot use
            raise Unauthorized(f"bearer token rejected: {type(exc).__name__}") from None
        roles = frozenset(r for r in claims.get("roles") or () if r in ROLES)
        grant = smart_grant(claims.get("scope", claims.get("scp")))
        read_only = False
        if not roles:  # an OIDC/SMART token: roles from its scopes
            roles, read_only = grant.roles, grant.read_only
        if not roles:
            raise Unauthorized("bearer token carries no known role (roles claim) or SMART scope "
                               "(patient/*.read, user/*.read, user/*.*, system/*.read, v2 .rs/.cruds)")
        patient = None
        if grant.patient_only:  # one patient's compartment, whatever the roles claim says (narrows only)
            patient = launch_patient(claims)
            if patient is None:
                raise Unauthorized("bearer token: patient/ scopes need a patient launch context "
                                   "(claim 'patient', or fhirUser Patient/[id])")
            read_only = True
        attrs = claims.get("attrs") or {}
        if not isinstance(attrs, dict):
            raise Unauthorized("bearer token claim 'attrs' must be an object")
        purpose = parse_purpose(claims.get("purpose")) or parse_purpose(purpose_header)
        if purpose is None:
            purpose = Purpose() if roles & CLINICAL_ROLES or "admin" in roles else Purpose("research", (), ())
        return (Requester(str(claims["sub"]), roles, claims.get("org"), attrs, purpose, claims.get("jti"),
                          read_only, grant.types, patient), float(claims["exp"]))


def issue_dev_token(
    settings: Settings,
    *,
    subject: str,
    roles: list[str],
    purpose: Any = None,
    attrs: Mapping[str, Any] | None = None,
    org: str | None = None,
    ttl_s: int = 3600,
) -> str:
    """An HS256 token signed with the data dir's development secret (``fedgate token``)."""
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ValueError(f"unknown role(s) {bad}; known: {sorted(ROLES)}")
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject, "roles": roles, "iat": now, "exp": now + ttl_s, "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience, "jti": str(uuid.uuid4()),
    }
    if org:
        claims["org"] = org
    if purpose is not None:
        claims["purpose"] = purpose
    if attrs:
        claims["attrs"] = dict(attrs)
    return jwt.encode(claims, settings.dev_secret(), algorithm="HS256")


async def jwks_ctx(app) -> AsyncIterator[None]:
    """cleanup_ctx: fetch a JWKS given by URL once at start-up and keep it (production RS256/ES256)."""
    import aiohttp

    from gateway import keys

    settings = app[keys.SETTINGS]
    verifier = app[keys.VERIFIER]
    jwks_url = settings.jwks if settings.jwks.startswith(("http://", "https://")) else ""
    if settings.viewer_oidc_authority or jwks_url:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            if settings.viewer_oidc_authority:  # OIDC discovery: issuer, endpoints, and the JWKS unless given
                url = settings.viewer_oidc_authority.rstrip("/") + "/.well-known/openid-configuration"
                try:
                    async with http.get(url) as resp:
                        resp.raise_for_status()
                        meta = await resp.json(content_type=None)
                except (aiohttp.ClientError, ValueError) as exc:
                    raise SettingsError(f"setting 'viewer_oidc_authority': OIDC discovery at {url} failed: "
                                        f"{type(exc).__name__}") from None
                if not isinstance(meta, dict) or not all(meta.get(k) for k in (
                        "issuer", "authorization_endpoint", "token_endpoint")):
                    raise SettingsError(f"setting 'viewer_oidc_authority': {url} is not an OIDC discovery document")
                verifier.oidc_metadata = meta
                if not settings.jwks:
                    jwks_url = str(meta.get("jwks_uri") or "")
            if jwks_url:
                async with http.get(jwks_url) as resp:
                    resp.raise_for_status()
                    verifier.load_remote_jwks(await resp.json(content_type=None))
    yield

# ------------------------------------------------------------------------------------------------
# Hub → site tokens (federation and training): ES256, signed by the hub over the exact request body
# ------------------------------------------------------------------------------------------------

#: The longest lifetime a hub token may have (seconds).
MAX_HUB_TOKEN_TTL_S = 60
MAX_TTL_S = MAX_HUB_TOKEN_TTL_S


def _pem(value: str) -> bytes:
    return value.encode() if "-----BEGIN" in value else Path(value).read_bytes()


def hub_private_key(settings: Settings, cfg: FederationConfig) -> ec.EllipticCurvePrivateKey:
    """The hub's signing key: ``federation.hub_key`` or one generated once into ``data_dir/secrets``."""
    if cfg.hub_key:
        key = serialization.load_pem_private_key(_pem(cfg.hub_key), password=None)
    else:
        pem = secret_file(settings.secrets_dir / "federation-hub-es256.pem", lambda: ec.generate_private_key(
            ec.SECP256R1()).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()).decode())
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SettingsError("setting 'federation.hub_key': not an EC private key (ES256 needs P-256)")
    return key


def public_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def body_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _purpose_claim(requester: Requester) -> Any:
    p = requester.purpose
    return "treatment" if p.is_treatment else {"codes": list(p.codes), "diseases": list(p.diseases)}


def sign_hub_token(key: ec.EllipticCurvePrivateKey, hub_id: str, site_id: str, requester: Requester,
                   body: bytes, ttl_s: int = 30, now: float | None = None) -> str:
    now = int(now if now is not None else time.time())
    claims = {"iss": hub_id, "aud": site_id, "sub": requester.subject, "roles": sorted(requester.roles),
              "attrs": dict(requester.attributes), "purpose": _purpose_claim(requester), "iat": now,
              "exp": now + ttl_s, "jti": uuid.uuid4().hex, "qh": body_hash(body)}
    if requester.organization:
        claims["org"] = requester.organization
    return jwt.encode(claims, key, algorithm="ES256", headers={"typ": "fedgate-hub+jwt"})


@dataclass
class HubTokenVerifier:
    """Verifies hub → site tokens against the hubs this site trusts (its own configuration)."""

    site_id: str
    hubs: Mapping[str, Any]  # hub id → public key object
    _seen: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, settings: Settings, cfg: FederationConfig) -> "HubTokenVerifier":
        hubs = {}
        for hub_id, pem in cfg.trusted_hubs:
            try:
                hubs[hub_id] = serialization.load_pem_public_key(_pem(pem))
            except (OSError, ValueError) as exc:
                raise SettingsError(f"setting 'federation.trusted_hubs' ({hub_id}): {exc}") from None
        return cls(settings.site_id, hubs)

    def is_hub_token(self, token: str) -> bool:
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return False
        return header.get("typ") == "fedgate-hub+jwt" or claims.get("iss") in self.hubs

    async def remember(self, db, jti: str) -> None:
        """Record an accepted token id in the store; Unauthorized when another server process of this
        site (``processes`` > 1) has accepted it already.  Rows outlive the token's lifetime limit."""
        from sqlalchemy import delete
        from sqlalchemy.exc import IntegrityError

        from gateway.store.audit_schema import fed_token_seen

        now = time.time()
        try:
            async with db.write() as conn:
                await conn.execute(delete(fed_token_seen).where(fed_token_seen.c.expires_ts < now))
                await conn.execute(fed_token_seen.insert().values(
                    jti=hashlib.sha256(str(jti).encode()).hexdigest(), expires_ts=now + MAX_TTL_S + 10))
        except IntegrityError:
            raise Unauthorized("hub token replayed") from None

    def verify(self, token: str, body: bytes) -> tuple[Requester, str]:
        from gateway.context import ROLES as KNOWN_ROLES

        try:
            iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
        except jwt.PyJWTError:
            raise Unauthorized("hub token is not a JWT") from None
        key = self.hubs.get(iss)
        if key is None:
            raise Unauthorized("hub token from a hub this site does not trust")
        try:
            claims = jwt.decode(token, key, algorithms=["ES256"], audience=self.site_id, issuer=iss,
                                options={"require": ["exp", "iat", "sub", "aud", "jti", "qh"]}, leeway=2)
        except jwt.PyJWTError as exc:
            raise jwt_failure("hub token", exc, audience="is for another site") from None
        if int(claims["exp"]) - int(claims["iat"]) > MAX_TTL_S:
            raise Unauthorized(f"hub token lives longer than {MAX_TTL_S} s")
        if claims["qh"] != body_hash(body):
            raise Unauthorized("hub token does not cover this request body")
        now = time.time()
        for jti, exp in list(self._seen.items()):
            if exp < now - 5:
                del self._seen[jti]
        if claims["jti"] in self._seen:
            raise Unauthorized("hub token replayed")
        self._seen[claims["jti"]] = float(claims["exp"])
        roles = frozenset(r for r in claims.get("roles") or () if r in KNOWN_ROLES)
        attrs = claims.get("attrs") or {}
        if not isinstance(attrs, dict):
            raise Unauthorized("hub token claim 'attrs' must be an object")
        purpose = parse_purpose(claims.get("purpose"))
        if purpose is None:
            raise Forbidden("purpose of use: the hub token carries none")
        return Requester(str(claims["sub"]), roles, claims.get("org"), attrs, purpose, claims["jti"]), str(iss)
