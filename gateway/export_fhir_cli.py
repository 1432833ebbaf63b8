"""``fedgate export fhir``: a Bulk Data export from a running gateway into a folder (docs/bulk-export.md).

The same job as any Bulk Data client's (``$export`` kick-off, status polling with a progress bar, the
manifest, every NDJSON file downloaded, then ``DELETE`` to release the files on the server).  Authorisation:
a bearer token (``--token`` or ``$FEDGATE_TOKEN``), or SMART Backend Services with the client's private key
(``--client-id`` + ``--key``: a client assertion signed RS384/ES384 is exchanged at ``/auth/token``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class ExportFailed(Exception):
    pass


def add_parser(esub) -> None:
    """``fedgate export fhir`` under the ``export`` command's sub-parsers (``esub``)."""
    f = esub.add_parser("fhir", help="FHIR Bulk Data $export from a gateway into a folder of NDJSON files "
                                     "(docs/bulk-export.md)")
    f.add_argument("--url", required=True, help="the gateway's base URL (http://host:port)")
    f.add_argument("--out", required=True, help="folder for the NDJSON files and manifest.json")
    f.add_argument("--level", choices=("system", "patient", "group"), default="system")
    f.add_argument("--group", help="Group id (with --level group)")
    f.add_argument("--type", dest="types", help="comma-separated resource types (_type)")
    f.add_argument("--since", help="only resources changed after this FHIR instant (_since)")
    f.add_argument("--type-filter", action="append", default=[], help="[type]?[search query] (_typeFilter; repeatable)")
    f.add_argument("--token", help="bearer token (default $FEDGATE_TOKEN)")
    f.add_argument("--client-id", help="SMART Backend Services client id (with --key)")
    f.add_argument("--key", help="the client's private key (PEM), RSA (RS384) or EC P-384 (ES384)")
    f.add_argument("--kid", help="key id of --key in the client's registered JWKS")
    f.add_argument("--scope", default="system/*.read", help="scopes asked for with --client-id")
    f.add_argument("--keep", action="store_true", help="do not DELETE the export on the server after download")
    f.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the export (default 3600)")
    f.add_argument("--quiet", action="store_true", help="no progress bars")


def _kickoff_url(args: argparse.Namespace) -> str:
    base = args.url.rstrip("/") + "/fhir"
    path = {"system": "$export", "patient": "Patient/$export"}.get(args.level) or f"Group/{args.group}/$export"
    params = [(k, v) for k, v in (("_type", args.types), ("_since", args.since)) if v]
    params += [("_typeFilter", q) for q in args.type_filter]
    return f"{base}/{path}" + ("?" + urlencode(params) if params else "")


def client_assertion(client_id: str, key_pem: bytes, token_url: str, kid: str | None) -> str:
    """A SMART Backend Services client assertion (RS384 for an RSA key, ES384 for an EC key)."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(key_pem, password=None)
    alg = "ES384" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS384"
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": token_url, "exp": now + 240, "jti": uuid.uuid4().hex}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid} if kid else None)


async def _token(http, args: argparse.Namespace) -> str:
    if not args.client_id:
        token = args.token or os.environ.get("FEDGATE_TOKEN")
        if not token:
            raise ExportFailed("give --token (or $FEDGATE_TOKEN), or --client-id with --key")
        return token
    if not args.key:
        raise ExportFailed("--client-id needs --key (the client's private key, PEM)")
    token_url = args.url.rstrip("/") + "/auth/token"
    assertion = client_assertion(args.client_id, Path(args.key).read_bytes(), token_url, args.kid)
    form = {"grant_type": "client_credentials", "scope": args.scope, "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion}
    async with http.post(token_url, data=form) as r:
        body = await r.json(content_type=None)
        if r.status != 200:
            raise ExportFailed(f"token request refused ({r.status}): {body.get('error_description') or body}")
        return body["access_token"]


def _outcome(text: str) -> str:
    try:
        doc = json.loads(text)
        return "; ".join(i.get("diagnostics", "") for i in doc.get("issue", [])) or text[:300]
    except (ValueError, AttributeError):
        return text[:300]


async def run_export(args: argparse.Namespace) -> dict:
    import aiohttp
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    async with aiohttp.ClientSession() as http:
        token = await _token(http, args)
        auth = {"Authorization": f"Bearer {token}"}
        headers = auth | {"Accept": "application/fhir+json", "Prefer": "respond-async"}
        async with http.get(_kickoff_url(args), headers=headers) as r:
            if r.status != 202:
                raise ExportFailed(f"kick-off refused ({r.status}): {_outcome(await r.text())}")
            status_url = r.headers["Content-Location"]
        deadline = time.monotonic() + args.timeout
        with tqdm(desc="exporting", unit="", bar_format="{desc} [{elapsed}]", disable=args.quiet) as bar:
            while True:
                async with http.get(status_url, headers=auth) as r:
                    text = await r.text()
                    if r.status == 200:
                        manifest = json.loads(text)
                        break
                    if r.status != 202:
                        raise ExportFailed(f"export failed ({r.status}): {_outcome(text)}")
                    bar.set_description_str(f"exporting: {r.headers.get('X-Progress', 'in progress')}")
                    wait = float(r.headers.get("Retry-After", "2"))
                if time.monotonic() > deadline:
                    raise ExportFailed(f"export not complete after {args.timeout:.0f} s (status: {status_url})")
                await asyncio.sleep(min(max(wait, 0.2), 30.0))
        files = []
        for item in manifest["output"]:
            name = Path(item["url"]).name
            target = out / name
            with tqdm(total=item.get("count"), desc=name, unit="res", disable=args.quiet) as bar:
                async with http.get(item["url"], headers=auth | {"Accept": "application/fhir+ndjson"}) as r:
                    if r.status != 200:
                        raise ExportFailed(f"download of {name} failed ({r.status})")
                    with open(target, "wb") as fh:
                        async for chunk in r.content.iter_chunked(1 << 20):
                            fh.write(chunk)
                            bar.update(chunk.count(b"\n"))
            files.append(name)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if not args.keep:
            async with http.delete(status_url, headers=auth) as r:
                await r.read()
    return manifest


def cmd_export_fhir(args: argparse.Namespace) -> int:
    import aiohttp

    if args.level == "group" and not args.group:
        print("fedgate export fhir: --level group needs --group", file=sys.stderr)
        return 2
    try:
        manifest = asyncio.run(run_export(args))
    except ExportFailed as exc:
        print(f"fedgate export fhir: {exc}", file=sys.stderr)
        return 1
    except (OSError, aiohttp.ClientError) as exc:
        print(f"fedgate export fhir: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    total = sum(o.get("count", 0) for o in manifest["output"])
    print(f"exported {total} resources in {len(manifest['output'])} files to {args.out} "
          f"(transactionTime {manifest['transactionTime']})")
    return 0
