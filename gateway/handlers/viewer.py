"""The OHIF viewer at ``/viewer`` (docs/viewer.md): the prebuilt ``@ohif/app`` (installed by
scripts/setup.d/40-ohif.sh, not committed), its ``app-config.js`` generated from the settings, and a small
sign-in page.

Static files only: every byte of patient data the viewer shows comes through ``/dicomweb`` with the user's
bearer token, so the consent gate applies as for any other client. Sign-in:

* development (``viewer_dev_login``): ``POST /viewer/dev-token`` signs a short-lived token with the dev secret
  for the role and purpose chosen on the sign-in page — anyone reaching it can become any role, so it is
  off by default and answers 404 while off;
* production (``viewer_oidc_authority``): the sign-in page runs the authorization code flow with PKCE
  (RFC 7636) against the issuer found by OIDC discovery at start-up, as a public client: the code comes
  back in the URL fragment (``response_mode=fragment``, never sent to fedgate, so never in its logs), the
  page exchanges it at the issuer's token endpoint and keeps the access token; fedgate verifies it with
  the issuer's JWKS and maps its roles claim (``oidc_roles_claim``/``oidc_role_map``) as for any client.

The token lives in the tab's ``sessionStorage`` and a tiny OHIF extension (in the generated config) hands it
to OHIF's user-authentication service, which puts ``Authorization: Bearer …`` on every DICOMweb request.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from gateway import keys
from gateway.auth import issue_dev_token, parse_purpose
from gateway.context import ROLES
from gateway.errors import BadRequest, GatewayError, NotFound

REPO = Path(__file__).resolve().parents[2]
MOUNT = "/viewer"
#: How long a development viewer token lives.
DEV_TOKEN_TTL_S = 8 * 3600
TOKEN_KEY = "fedgate.token"

VIEWER_DIR: web.AppKey[Path] = web.AppKey("viewer_dir", Path)
#: Origin of the gateway when the viewer is served from another one (cross-origin deployment); "" = same.
VIEWER_GATEWAY: web.AppKey[str] = web.AppKey("viewer_gateway", str)


def viewer_dir(settings) -> Path:
    return Path(settings.viewer_dir) if settings.viewer_dir else REPO / "viewer" / "ohif"


def _dist(request: web.Request) -> Path:
    d = request.app[VIEWER_DIR]
    if not (d / "index.html").is_file():
        raise GatewayError("the OHIF viewer is not installed: run scripts/setup (scripts/setup.d/40-ohif.sh)",
                           status=503)
    return d


_ASSET_RE = re.compile(r'((?:src|href)=")/(?!/)')


def _index_html(dist: Path) -> bytes:
    """OHIF's index.html re-rooted under /viewer, with a sign-in check before the app starts."""
    html = (dist / "index.html").read_text()
    html = _ASSET_RE.sub(rf"\1{MOUNT}/", html)
    html = html.replace('window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{MOUNT}/"')
    guard = ("<script>(function(){if(!sessionStorage.getItem("
             f"'{TOKEN_KEY}')){{location.replace('{MOUNT}/login?next='+encodeURIComponent(location.pathname+"
             "location.search));}})();</script>")
    # the config first (it defines FEDGATE_VIEWER), then the guard
    cfg = f'<script rel="preload" as="script" src="{MOUNT}/app-config.js"></script>'
    if cfg in html:
        html = html.replace(cfg, cfg + guard, 1)
    else:
        html = html.replace("</head>", f'<script src="{MOUNT}/app-config.js"></script>{guard}</head>', 1)
    return html.encode()


_PUBLIC_PATH = b'__webpack_require__.p = "/";'
_CSS_URL = re.compile(rb"url\((['\"]?)/(?!/)")
_ROOTED: dict[tuple[str, int], bytes | None] = {}


def _rooted(path: Path) -> bytes | None:
    """A bundle or style sheet of the OHIF build re-rooted under /viewer (None: nothing to change). The build
    hard-codes "/" (it is made for a site's root): webpack's public path in the bundles (chunks, workers,
    wasm) and absolute ``url(/...)`` in the CSS (fonts) then point under /viewer."""
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _ROOTED:
        data = path.read_bytes()
        if path.suffix == ".js":
            out = data.replace(_PUBLIC_PATH, f'__webpack_require__.p = "{MOUNT}/";'.encode())
        else:
            out = _CSS_URL.sub(rb"url(\1" + MOUNT.encode() + b"/", data)
        _ROOTED[key] = out if out != data else None
    return _ROOTED[key]


def app_config(settings, gateway_origin: str = "", oidc_metadata: dict | None = None) -> str:
    """OHIF's ``window.config`` for this gateway: one DICOMweb data source at ``/dicomweb``; and the sign-in
    page's settings (``window.FEDGATE_VIEWER``: the OIDC issuer's endpoints from discovery, or dev sign-in)."""
    root = f"{gateway_origin.rstrip('/')}/dicomweb" if gateway_origin else None
    oidc: dict[str, Any] | bool = False
    if settings.viewer_oidc_authority and oidc_metadata:
        oidc = {"authorization_endpoint": oidc_metadata["authorization_endpoint"],
                "token_endpoint": oidc_metadata["token_endpoint"], "client_id": settings.viewer_oidc_client_id,
                "scope": settings.viewer_oidc_scope, "resource": settings.viewer_oidc_resource}
    fedgate = {"gateway": gateway_origin, "oidc": oidc, "devLogin": bool(settings.viewer_dev_login),
               "tokenKey": TOKEN_KEY, "mount": MOUNT}
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "fedgate",
        "configuration": {
            "friendlyName": f"fedgate {settings.site_id}", "name": "fedgate",
            "wadoUriRoot": "__ROOT__", "qidoRoot": "__ROOT__", "wadoRoot": "__ROOT__",
            "qidoSupportsIncludeField": True, "supportsReject": False, "imageRendering": "wadors",
            "thumbnailRendering": "wadors", "enableStudyLazyLoad": True, "supportsFuzzyMatching": False,
            "supportsWildcard": True, "staticWado": False, "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True}, "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": MOUNT, "showStudyList": True, "extensions": [], "modes": [],
        "maxNumberOfWebWorkers": 3, "showWarningMessageForCrossOrigin": False, "showCPUFallbackMessage": True,
        "showLoadingIndicator": True, "strictZSpacingForVolumeViewport": True, "defaultDataSourceName": "fedgate",
        "investigationalUseDialog": {"option": "never"}, "dataSources": [source],
    }
    root_js = orjson.dumps(root).decode() if root else "window.location.origin + '/dicomweb'"
    return f"""/* generated by fedgate (gateway/handlers/viewer.py) from its settings; do not edit */
window.FEDGATE_VIEWER = {orjson.dumps(fedgate).decode()};
(function () {{
  var cfg = {orjson.dumps(config).decode()};
  var root = {root_js};
  var c = cfg.dataSources[0].configuration;
  c.wadoUriRoot = c.qidoRoot = c.wadoRoot = root;
  {{
    // hand the signed-in token to OHIF's user-authentication service: it adds the Authorization header
    // to every QIDO/WADO request OHIF makes; a 401 sends the user back to the sign-in page
    cfg.extensions = [{{
      id: 'fedgate-auth',
      preRegistration: function (args) {{
        var auth = args.servicesManager.services.userAuthenticationService;
        auth.setServiceImplementation({{
          getAuthorizationHeader: function () {{
            var t = sessionStorage.getItem('{TOKEN_KEY}');
            return t ? {{ Authorization: 'Bearer ' + t }} : {{}};
          }},
          handleUnauthenticated: function () {{
            sessionStorage.removeItem('{TOKEN_KEY}');
            window.location.assign('{MOUNT}/login');
          }},
        }});
      }},
    }}];
  }}
  cfg.httpErrorHandler = function (error) {{
    if (error && error.status === 401) {{ sessionStorage.removeItem('{TOKEN_KEY}'); window.location.assign('{MOUNT}/login'); }}
  }};
  window.config = cfg;
}})();
"""


LOGIN_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedgate viewer — sign in</title>
<meta name="viewport" content="width=device-width,initial-scale=1">
<style>body{font-family:sans-serif;background:#090c29;color:#eee;display:flex;justify-content:center;padding-top:10vh}
form{background:#151a3d;padding:2em;border-radius:8px;min-width:22em}label{display:block;margin:.8em 0 .3em}
input,select,button{width:100%;padding:.5em;box-sizing:border-box}button{margin-top:1.2em;cursor:pointer}
#error{color:#f88;margin-top:1em;white-space:pre-wrap}</style>
<script src="__MOUNT__/app-config.js"></script></head>
<body><form id="login">
<h2>fedgate viewer</h2>
<div id="dev">
<p>Development sign-in (a token signed with this gateway's development secret).</p>
<label for="role">Role</label>
<select id="role" name="role">__ROLES__</select>
<label for="purpose">Purpose of use</label>
<input id="purpose" name="purpose" value="treatment" placeholder="treatment, or DUO codes e.g. DUO:0000042">
<button id="signin" type="submit">Sign in</button>
</div>
<p id="nodev" hidden>Development sign-in is off (setting <code>viewer_dev_login</code>) and no OIDC issuer is
configured (setting <code>viewer_oidc_authority</code>).</p>
<div id="oidc" hidden><p>Signing in through this gateway's identity provider…</p>
<button id="oidc-signin" type="button">Sign in again</button></div>
<div id="error" role="alert"></div>
</form>
<script>
(function () {
  var cfg = window.FEDGATE_VIEWER || {};
  var next = new URLSearchParams(location.search).get('next') || '__MOUNT__/';
  if (next.charAt(0) !== '/' || next.charAt(1) === '/') next = '__MOUNT__/';
  if (cfg.oidc) { oidcSignIn(cfg, next); return; }
  if (!cfg.devLogin) { document.getElementById('dev').hidden = true; document.getElementById('nodev').hidden = false; }
  document.getElementById('login').addEventListener('submit', function (ev) {
    ev.preventDefault();
    var err = document.getElementById('error');
    err.textContent = '';
    fetch((cfg.gateway || '') + '__MOUNT__/dev-token', {
      method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({role: document.getElementById('role').value,
                            purpose: document.getElementById('purpose').value})
    }).then(function (r) {
      return r.json().then(function (b) { if (!r.ok) throw new Error(b.detail || r.status); return b; });
    }).then(function (b) {
      sessionStorage.setItem(cfg.tokenKey, b.access_token);
      location.assign(next);
    }).catch(function (e) { err.textContent = 'Sign-in failed: ' + e.message; });
  });
})();
// OIDC authorization code flow with PKCE (RFC 7636), public client, code returned in the fragment
function b64url(bytes) {
  return btoa(String.fromCharCode.apply(null, new Uint8Array(bytes)))
    .replace(/[+]/g, '-').replace(/[/]/g, '_').replace(/=+$/, '');
}
function randomText() { var b = new Uint8Array(32); crypto.getRandomValues(b); return b64url(b); }
function oidcSignIn(cfg, next) {
  var o = cfg.oidc, err = document.getElementById('error'), key = 'fedgate.oidc';
  document.getElementById('dev').hidden = true;
  document.getElementById('oidc').hidden = false;
  document.getElementById('oidc-signin').onclick = function () { start(); };
  var redirect = location.origin + '__MOUNT__/login';
  var back = new URLSearchParams(location.hash.slice(1));
  history.replaceState(null, '', location.pathname + location.search);  // the code leaves the address bar
  if (back.get('code') || back.get('error')) {
    var pending = JSON.parse(sessionStorage.getItem(key) || 'null');
    sessionStorage.removeItem(key);
    if (back.get('error')) { err.textContent = 'Sign-in failed: ' + back.get('error'); return; }
    if (!pending || back.get('state') !== pending.state) { err.textContent = 'Sign-in failed: state mismatch'; return; }
    var form = new URLSearchParams({grant_type: 'authorization_code', code: back.get('code'), redirect_uri: redirect,
                                    client_id: o.client_id, code_verifier: pending.verifier});
    if (o.resource) form.set('resource', o.resource);
    fetch(o.token_endpoint, {method: 'POST', body: form}).then(function (r) {
      return r.json().then(function (b) { if (!r.ok) throw new Error(b.error_description || b.error || r.status); return b; });
    }).then(function (b) {
      sessionStorage.setItem(cfg.tokenKey, b.access_token);
      sessionStorage.setItem(key + '.at', String(Date.now()));
      location.assign(pending.next);
    }).catch(function (e) { err.textContent = 'Sign-in failed: ' + e.message; });
    return;
  }
  // back here right after a sign-in: the gateway refused the token (401); no automatic round trip again
  if (Date.now() - Number(sessionStorage.getItem(key + '.at') || 0) < 30000) {
    sessionStorage.removeItem(key + '.at');
    err.textContent = 'Sign-in failed: the gateway refused the token of the identity provider (no fedgate role in ' +
                      'its claims?). Ask the site to map your account onto a role.';
    return;
  }
  start();
  function start() {
    var state = randomText(), verifier = randomText();
    crypto.subtle.digest('SHA-256', new TextEncoder().encode(verifier)).then(function (h) {
      sessionStorage.setItem(key, JSON.stringify({state: state, verifier: verifier, next: next}));
      var q = new URLSearchParams({response_type: 'code', response_mode: 'fragment', client_id: o.client_id,
                                   redirect_uri: redirect, scope: o.scope, state: state,
                                   code_challenge: b64url(h), code_challenge_method: 'S256'});
      if (o.resource) q.set('resource', o.resource);
      location.assign(o.authorization_endpoint + '?' + q.toString());
    });
  }
}
</script></body></html>
"""


async def index(request: web.Request) -> web.StreamResponse:
    """Any path under /viewer: a file of the OHIF build, else its index.html (client-side routes)."""
    dist = _dist(request)
    tail = request.match_info.get("tail", "")
    if tail:
        path = (dist / tail).resolve()
        if path.is_relative_to(dist.resolve()) and path.is_file() and path.name != "index.html":
            if path.name == "app-config.js":
                raise NotFound("no such file")  # the generated config is served instead (route below)
            headers = {"Cache-Control": "public, max-age=3600"}
            if path.suffix in (".js", ".css"):
                body = _rooted(path)
                if body is not None:
                    ctype = "application/javascript" if path.suffix == ".js" else "text/css"
                    return web.Response(body=body, content_type=ctype, headers=headers)
            if path.suffix == ".wasm":
                headers["Content-Type"] = "application/wasm"
            return web.FileResponse(path, headers=headers)
        if "." in tail.rsplit("/", 1)[-1]:
            raise NotFound("no such file")
    return web.Response(body=_index_html(dist), content_type="text/html", headers={"Cache-Control": "no-cache"})


async def config_js(request: web.Request) -> web.Response:
    settings = request.app[keys.SETTINGS]
    verifier = request.app.get(keys.VERIFIER)
    body = app_config(settings, request.app.get(VIEWER_GATEWAY, ""), verifier.oidc_metadata if verifier else None)
    return web.Response(text=body, content_type="application/javascript", headers={"Cache-Control": "no-cache"})


async def login(request: web.Request) -> web.Response:
    roles = "".join(f'<option value="{r}"{" selected" if r == "clinician" else ""}>{r}</option>'
                    for r in sorted(ROLES))
    return web.Response(text=LOGIN_HTML.replace("__MOUNT__", MOUNT).replace("__ROLES__", roles),
                        content_type="text/html", headers={"Cache-Control": "no-cache"})


async def dev_token(request: web.Request) -> web.Response:
    """Development sign-in: a token for the chosen role and purpose (404 unless ``viewer_dev_login``)."""
    settings = request.app[keys.SETTINGS]
    if not settings.viewer_dev_login:
        raise NotFound("development sign-in is off (setting viewer_dev_login)")
    try:
        body = await request.json(loads=orjson.loads)
    except ValueError:
        raise BadRequest("body: expected a JSON object {role, purpose}") from None
    if not isinstance(body, dict):
        raise BadRequest("body: expected a JSON object {role, purpose}")
    role = body.get("role")
    if role not in ROLES:
        raise BadRequest(f"role: one of {', '.join(sorted(ROLES))}", expression=["role"])
    purpose_text = body.get("purpose") or None
    if purpose_text is not None and not isinstance(purpose_text, str):
        raise BadRequest("purpose: a string", expression=["purpose"])
    purpose = parse_purpose(purpose_text)  # 400 for text that is neither treatment nor DUO codes
    claim: Any = None
    if purpose is not None:
        claim = ({"kind": "treatment"} if purpose.kind != "research"
                 else {"codes": list(purpose.codes), "diseases": list(purpose.diseases)})
    token = issue_dev_token(settings, subject=f"viewer-{role}", roles=[role], purpose=claim, ttl_s=DEV_TOKEN_TTL_S)
    return web.json_response({"access_token": token, "token_type": "Bearer", "expires_in": DEV_TOKEN_TTL_S},
                             headers={"Cache-Control": "no-store"})


def add_viewer_routes(app: web.Application, settings, *, gateway_origin: str = "") -> None:
    """The viewer's routes on ``app`` (the gateway, or a separate origin serving only the viewer)."""
    app[VIEWER_DIR] = viewer_dir(settings)
    if gateway_origin:
        app[VIEWER_GATEWAY] = gateway_origin
    app.router.add_get(MOUNT + "/app-config.js", config_js, name="viewer-config")
    app.router.add_get(MOUNT + "/login", login, name="viewer-login")
    app.router.add_get(MOUNT, index, name="viewer")
    app.router.add_get(MOUNT + "/{tail:.*}", index, name="viewer-files")


def setup_routes(app: web.Application) -> None:
    settings = app[keys.SETTINGS]
    if not settings.viewer_enabled:
        return
    app.router.add_post(MOUNT + "/dev-token", dev_token, name="viewer-dev-token")
    add_viewer_routes(app, settings)
    app[keys.PUBLIC_ROUTES].update({"viewer-config", "viewer-login", "viewer", "viewer-files", "viewer-dev-token"})


def viewer_only_app(settings, gateway_origin: str) -> web.Application:
    """A separate web app serving only the viewer, talking to the gateway at ``gateway_origin`` (cross-origin)."""
    app = web.Application()
    app[keys.SETTINGS] = settings
    add_viewer_routes(app, settings, gateway_origin=gateway_origin)
    return app
