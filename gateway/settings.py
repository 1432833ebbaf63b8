"""One settings object for the whole process.

Sources, later ones winning: built-in defaults < TOML file (``--config`` or ``$FEDGATE_CONFIG``)
< environment variables ``FEDGATE_<FIELD>`` (or ``FEDGATE_<FIELD>_FILE``: the value is that file's content,
for secrets mounted as files) < command-line flags.  The data directory holds the
SQLite file (``fedgate.db``), the blob store (``blobs/``) and development secrets (``secrets/``).
"""

from __future__ import annotations

import dataclasses
import os
import hashlib
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


#: ``processes = auto`` runs at most this many serving processes (beyond it the store's write serialisation,
#: not the event loops, bounds throughput; set ``processes`` explicitly for more).
MAX_AUTO_PROCESSES = 8


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: a container's CPU set), else the CPU count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


class SettingsError(ValueError):
    """A setting has a value the gateway cannot use; the message names the setting."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Process settings; immutable once built (see :func:`load_settings`)."""

    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("./data")
    #: SQLAlchemy-style URL. Empty means the embedded SQLite file in ``data_dir``.
    database_url: str = ""
    #: Public base URL used in Bundle links and ImagingStudy endpoints; empty = derived from request.
    base_url: str = ""
    site_id: str = "site-local"
    organization: str = "fedgate site"
    #: Largest accepted request body for FHIR/JSON routes, in bytes (413 beyond).
    max_body_bytes: int = 20 * 1024 * 1024
    #: Largest accepted STOW-RS request body, in bytes.
    max_stow_bytes: int = 4 * 1024 * 1024 * 1024
    #: Largest accepted single instance (one STOW-RS body part), in bytes (larger parts fail with 0xA700).
    max_instance_bytes: int = 1024 * 1024 * 1024
    #: Write STOW-RS part files with O_DIRECT (bypassing the page cache) where the file system supports it;
    #: false: through the page cache. See docs/dicomweb.md.
    stow_direct_io: bool = True
    #: Default and maximum page size for FHIR search.
    default_page_size: int = 50
    max_page_size: int = 1000
    #: Worker processes (per server process) validating large FHIR bundles and parsing STOW-RS instances
    #: (-1 = the cores the server processes leave: CPU count − ``processes``, at most 4; 0 = none, in a thread).
    validation_workers: int = -1
    #: HTTP server processes sharing the port (``fedgate serve``): 0 or "auto" (default) = one per CPU core
    #: available to the process, at most :data:`MAX_AUTO_PROCESSES`; 1 = one process (no supervising
    #: parent); N = N.  The parent does the one-time start-up (migrations, blob reconcile, consent policy)
    #: and supervises the serving processes (restarts one that dies; SIGTERM stops all).
    processes: int = 0
    log_level: str = "INFO"
    log_format: str = "json"
    #: Authentication: "jwt" (default) verifies bearer tokens on every non-public route.
    auth_mode: str = "jwt"
    #: HS256 shared secret; default: generated once into data_dir/secrets/jwt-hs256.key.
    jwt_secret: str = ""
    jwt_issuer: str = "fedgate-dev"
    jwt_audience: str = "fedgate"
    #: RS256/ES256 verification material for production: a JWKS file path or URL.
    jwks: str = ""
    #: SMART App Launch (/.well-known/smart-configuration): the OIDC issuer's authorization and token
    #: endpoints that issue the tokens fedgate verifies (empty: not advertised; tokens still accepted)
    smart_authorize_url: str = ""
    smart_token_url: str = ""
    #: Prometheus metrics at /metrics: "protected" (the metrics_token, or an admin/site token), "open", "off".
    metrics: str = "protected"
    #: Bearer token a Prometheus scraper sends to /metrics (empty: only admin/site gateway tokens).
    metrics_token: str = ""
    #: Browser origins allowed to call the gateway cross-origin (CORS), comma/space separated, e.g.
    #: "https://viewer.example.org"; "*" = any origin (development only); empty (default) = none: no CORS
    #: headers are sent and preflights are refused (see docs/deploy.md).
    cors_origins: str = ""
    #: Reverse proxies whose Forwarded / X-Forwarded-Host/-Proto/-Prefix headers are believed (IPs or CIDRs,
    #: comma/space separated); empty (default) = none: such headers are ignored. ``base_url`` wins over both.
    trusted_proxies: str = ""
    #: The OHIF viewer at /viewer (installed by scripts/setup.d/40-ohif.sh into ``viewer_dir``).
    viewer_enabled: bool = True
    #: Where the OHIF build (its ``dist/``) lies; empty = ``viewer/ohif`` in the repository.
    viewer_dir: str = ""
    #: Development sign-in for the viewer: ``POST /viewer/dev-token`` signs a token with the dev secret for a
    #: chosen role/purpose. Never enable in production (any caller becomes any role); production signs in
    #: through ``viewer_oidc_authority`` (the OIDC issuer whose JWKS is ``jwks``).
    viewer_dev_login: bool = False
    #: OIDC issuer URL for the viewer's production sign-in (authorization code + PKCE), and its client id.
    viewer_oidc_authority: str = ""
    viewer_oidc_client_id: str = "fedgate-viewer"
    #: Scopes the viewer's sign-in asks the issuer for, and the RFC 8707 resource indicator it sends (some
    #: issuers issue JWT access tokens for a named resource only; empty: none sent).
    viewer_oidc_scope: str = "openid profile"
    viewer_oidc_resource: str = ""
    #: Where the fedgate roles are in an issuer's (RS256/ES256) token: a claim name or dotted path
    #: ("roles", "groups", "realm_access.roles"), and how its values map onto fedgate roles
    #: ("idp-value=role" entries, comma/space separated; empty: the values are fedgate role names).
    oidc_roles_claim: str = "roles"
    oidc_role_map: str = ""
    #: De-identification (issue #24, docs/deidentification.md). The site's secret keying every pseudonym,
    #: UID and date offset (env FEDGATE_DEID_SECRET or FEDGATE_DEID_SECRET_FILE; default: generated once
    #: into data_dir/secrets/deid.key). Never logged (not in repr), never exported.
    deid_secret: str = field(default="", repr=False)
    #: Who gets identified or de-identified data: "role[/purpose]=identified|deidentified" entries, comma or
    #: space separated, first match wins; purpose is "treatment", "research" or "*". Without a match: a role
    #: of ``[export] deidentify_roles`` (default analyst) or a research purpose → deidentified, else identified.
    deid_policy: str = ""
    #: Apply ``deid_policy`` to WADO-RS retrievals too (instances and metadata de-identified on the fly);
    #: false: WADO-RS serves the stored (identified) instances to whoever the consent gate lets read them.
    deid_wado: bool = False
    #: DIMSE listener (docs/dimse.md): TCP port for C-ECHO/C-STORE/C-FIND/C-MOVE/C-GET (0 = no listener), the
    #: gateway's AE title, and the role that calling AE titles not listed in ``[dimse_peers.<AE>]`` get
    #: (empty, default: they are rejected at association time).
    dimse_port: int = 0
    dimse_host: str = ""
    dimse_ae_title: str = "FEDGATE"
    dimse_accept_unknown: str = ""
    #: Association limits: concurrent associations, largest PDU received (bytes; 0 = no limit), and the
    #: ACSE (association set-up), DIMSE (a message) and network (idle connection) timeouts in seconds.
    dimse_max_associations: int = 16
    dimse_max_pdu: int = 262144
    dimse_acse_timeout_s: float = 30.0
    dimse_dimse_timeout_s: float = 60.0
    dimse_network_timeout_s: float = 60.0
    #: PS3.15 Annex B secure transport: a PEM certificate and key (both, or neither: plain TCP), and an optional
    #: CA bundle that calling peers' certificates must chain to (empty: no client certificate asked for).
    dimse_tls_cert: str = ""
    dimse_tls_key: str = ""
    dimse_tls_ca: str = ""
    #: Extra settings sections (federation, inference, ...) kept verbatim for later sections.
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def validation_processes(self) -> int:
        if self.validation_workers >= 0:
            return self.validation_workers
        # one server process per core already uses every core: a pool per process would only add contention
        # (STOW with 2 processes on 2 cores parses faster in a thread than with a 1-worker pool each)
        return max(0, min(4, available_cores() - self.serve_processes))

    @property
    def serve_processes(self) -> int:
        """How many serving processes ``fedgate serve`` runs (``processes``; 0 = one per available core,
        at most :data:`MAX_AUTO_PROCESSES`)."""
        return self.processes if self.processes > 0 else max(1, min(MAX_AUTO_PROCESSES, available_cores()))

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        """``cors_origins`` as a tuple of origins (no trailing slash)."""
        return tuple(o.rstrip("/") for o in self.cors_origins.replace(",", " ").split() if o)

    @property
    def trusted_proxy_list(self) -> tuple[str, ...]:
        return tuple(p for p in self.trusted_proxies.replace(",", " ").split() if p)

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "fedgate.db"

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.sqlite_path.resolve()}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def secrets_dir(self) -> Path:
        return self.data_dir / "secrets"

    def dev_secret(self) -> str:
        """The HS256 development secret, created on first use in ``data_dir/secrets``."""
        if self.jwt_secret:
            return self.jwt_secret
        return secret_file(self.secrets_dir / "jwt-hs256.key", lambda: secrets.token_urlsafe(48))

    def deid_key(self) -> bytes:
        """The de-identification secret (``deid_secret``), created on first use in ``data_dir/secrets``."""
        if self.deid_secret:
            return self.deid_secret.encode()
        return secret_file(self.secrets_dir / "deid.key", lambda: secrets.token_urlsafe(48)).encode()


    def search_cursor_key(self) -> bytes:
        """The key of the FHIR search cursors (``gateway.services.search_cursor``), derived from the server
        secret: the same in every serving process and across restarts."""
        return hashlib.sha256(b"fedgate-search-cursor:" + self.dev_secret().encode()).digest()


def secret_file(path: Path, generate) -> str:
    """The secret in ``path``, created (mode 0600, from ``generate()``) on first use; several processes
    starting at once agree on one value (atomic create-if-absent)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(generate())
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_LIST_FIELDS = {"cors_origins", "trusted_proxies"}


def _coerce(name: str, value: Any) -> Any:
    f = _FIELDS[name]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if name == "processes" and isinstance(value, str) and value.strip().lower() == "auto":
        return 0
    try:
        if kind == "int":
            return int(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            word = str(value).strip().lower()
            if word in {"1", "true", "yes", "on"}:
                return True
            if word in {"0", "false", "no", "off"}:
                return False
            raise ValueError("not a boolean (true/false, 1/0, yes/no, on/off)")
        if kind == "Path":
            return Path(value)
        if kind == "float":
            return float(value)
        if kind == "str" and name in _LIST_FIELDS and isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)  # TOML arrays for the list-valued settings
        if kind == "str":
            return str(value)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"setting {name!r}: cannot use {value!r} ({exc})") from None
    return value


def load_settings(
    *,
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build :class:`Settings` from defaults, TOML, environment and explicit overrides."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    config_file = config_file or env.get("FEDGATE_CONFIG")
    if config_file:
        try:
            with open(config_file, "rb") as fh:
                doc = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"config file {config_file}: {exc}") from None
        section = doc.get("fedgate", doc)
        for key, value in section.items():
            key = key.replace("-", "_")
            if key in _FIELDS and key != "extra":
                values[key] = _coerce(key, value)
            else:
                extra[key] = value
    for name in _FIELDS:
        env_key = f"FEDGATE_{name.upper()}"
        if name == "extra":
            continue
        if env_key + "_FILE" in env:  # a secret mounted as a file (Docker/Kubernetes secrets)
            path = env[env_key + "_FILE"]
            try:
                values[name] = _coerce(name, Path(path).read_text().strip())
            except OSError as exc:
                raise SettingsError(f"setting {name!r}: cannot read {env_key}_FILE {path}: "
                                    f"{exc.strerror or exc}") from None
        if env_key in env:
            values[name] = _coerce(name, env[env_key])
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in _FIELDS:
            raise SettingsError(f"unknown setting {key!r}")
        values[key] = value if key == "extra" else _coerce(key, value)
    if extra:
        values["extra"] = {**extra, **values.get("extra", {})}
    settings = Settings(**values)
    if not (0 < settings.port < 65536):
        raise SettingsError(f"setting 'port': {settings.port} is not a TCP port")
    if settings.processes < 0:
        raise SettingsError(f"setting 'processes': {settings.processes} "
                            "(use 1, 2, ... or 0 / \"auto\" for one per core)")
    if settings.dimse_port and not (0 < settings.dimse_port < 65536):
        raise SettingsError(f"setting 'dimse_port': {settings.dimse_port} is not a TCP port")
    if not (0 < len(settings.dimse_ae_title.strip()) <= 16):
        raise SettingsError(f"setting 'dimse_ae_title': {settings.dimse_ae_title!r} is not an AE title (1-16 characters)")
    if settings.auth_mode not in {"jwt", "none"}:
        raise SettingsError(f"setting 'auth_mode': {settings.auth_mode!r} is not one of jwt, none")
    if settings.trusted_proxies:
        import ipaddress

        for item in settings.trusted_proxy_list:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise SettingsError(f"setting 'trusted_proxies': {item!r} is not an IP address or CIDR") from None
    if settings.deid_secret and len(settings.deid_secret) < 16:
        raise SettingsError("setting 'deid_secret': use at least 16 characters")
    if settings.deid_policy:
        from gateway.services.deid import parse_policy

        try:
            parse_policy(settings.deid_policy)
        except ValueError as exc:
            raise SettingsError(f"setting 'deid_policy': {exc}") from None
    from gateway.context import ROLES

    for item in settings.oidc_role_map.replace(",", " ").split():
        if item.partition("=")[2] not in ROLES:
            raise SettingsError(f"setting 'oidc_role_map': {item!r} is not idp-value=role (roles: {sorted(ROLES)})")
    for origin in settings.cors_origin_list:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise SettingsError(f"setting 'cors_origins': {origin!r} is not an origin (scheme://host[:port]) or *")
    return settings
