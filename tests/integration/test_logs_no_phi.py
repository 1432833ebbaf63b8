"""Issue 19: no query string, header value, DICOM/FHIR value or SQL parameter in any log line, error paths
included.  Names and identifiers are planted in a table of bad (and a few good) requests driven through a
running gateway; every log record of every logger (root at DEBUG, aiohttp.access and aiohttp.server
included) is formatted by the production formatters and grepped for them."""

from __future__ import annotations

import base64
import io
import json
import logging

import aiohttp
import pytest

from gateway.logs import JsonFormatter, TextFormatter

FAMILY, GIVEN, MRN, ACCESSION = "Quenneville", "Ottoline", "MRN88442211", "ACC55310977"
PLANTED = (FAMILY, GIVEN, MRN, ACCESSION)
FHIR_JSON = {"Content-Type": "application/fhir+json"}


def _b64(s: str) -> str:
    return base64.urlsafe_b64encode(s.encode()).decode().rstrip("=")


def _claims_token() -> str:
    """A token-looking header value whose claims name the planted patient (base64url, as a JWT's would)."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}))
    body = _b64(json.dumps({"sub": FAMILY, "name": f"{GIVEN} {FAMILY}", "mrn": MRN}))
    return f"{head}.{body}.c2ln"


def _needles() -> list[str]:
    out = [p.lower() for p in PLANTED]
    body = _b64(json.dumps({"sub": FAMILY, "name": f"{GIVEN} {FAMILY}", "mrn": MRN}))
    out += [body[i:i + 16].lower() for i in range(0, len(body) - 16, 8)]  # any stretch of the claims
    return out


@pytest.fixture
def captured():
    """Every record of every logger, formatted by both production formatters."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    keep = Keep(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    levels = {n: logging.getLogger(n).level for n in ("aiohttp.access", "aiohttp.server", "aiohttp.web")}
    root.addHandler(handler)
    root.addHandler(keep)
    root.setLevel(logging.DEBUG)
    for name in levels:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        root.removeHandler(keep)
        root.setLevel(old_level)
        for name, lvl in levels.items():
            logging.getLogger(name).setLevel(lvl)


def _cohort(leaf_code: str) -> dict:
    return {"cohort": {"all": [{"id": "a", "condition": {"code": [f"http://snomed.info/sct|{leaf_code}"]}},
                               {"condition": {"code": [f"x|{FAMILY}"],
                                              "within": {"of": "a", "min_days": 10**30}}}]}}


async def test_no_planted_value_reaches_any_log_line(gateway, captured):
    gw = gateway
    admin = gw.headers("admin")
    analyst = gw.headers("analyst", purpose={"codes": ["DUO:0000042"]}, attrs={"irb_approved": True})
    patient = {"resourceType": "Patient", "id": "plant1", "name": [{"family": FAMILY, "given": [GIVEN]}],
               "identifier": [{"system": "urn:mrn", "value": MRN}]}
    long_query = f"name={FAMILY}&identifier={MRN}&" + "x" * 9000
    # (method, path, headers, body, acceptable statuses)
    table = [
        ("PUT", "/fhir/Patient/plant1", admin | FHIR_JSON, json.dumps(patient), {201}),
        ("GET", f"/fhir/Patient?name={FAMILY}&identifier=urn:mrn|{MRN}", admin, None, {200}),
        ("GET", f"/fhir/Patient?{long_query}", admin, None, {400, 414, 431}),
        ("GET", "/fhir/Patient", {"Authorization": "Bearer " + _claims_token() * 200}, None, {400, 401, 431}),
        ("GET", "/fhir/Patient", {"Authorization": "Bearer " + _claims_token()}, None, {401}),
        ("GET", f"/fhir/Patient?name={FAMILY}&birthdate={GIVEN}", admin, None, {400}),
        ("GET", f"/fhir/Patient?identifier={MRN}&_sort={GIVEN}", admin, None, {400}),
        ("GET", f"/fhir/Patient?{FAMILY}={MRN}", admin, None, {400}),
        ("GET", f"/fhir/Patient?name={FAMILY}&_offset={'9' * 30}", admin, None, {400}),
        ("GET", f"/fhir/Patient/{MRN}", admin, None, {404}),
        ("GET", f"/fhir/Patient/plant1/_history/{MRN}", admin, None, {404}),
        ("POST", "/fhir/Patient", admin | FHIR_JSON, f'{{"resourceType": "Patient", "name": [{{"family": "{FAMILY}"',
         {400}),
        ("POST", "/fhir/Patient", admin | FHIR_JSON,
         json.dumps({"resourceType": "Patient", "birthDate": FAMILY, "name": [{"family": GIVEN}]}), {400, 422}),
        ("POST", "/fhir", admin | FHIR_JSON, json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "Patient", "gender": MRN}, "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "GET", "url": f"Patient?name={FAMILY}&bad={GIVEN}"}}]}), {400, 422}),
        ("PUT", "/fhir/Patient/plant1", analyst | FHIR_JSON, json.dumps(patient), {403}),
        ("GET", f"/dicomweb/studies?PatientName={FAMILY}^{GIVEN}&StudyDate={MRN}", admin, None, {400}),
        ("GET", f"/dicomweb/studies?PatientID={MRN}&AccessionNumber={ACCESSION}&Rows={GIVEN}", admin, None, {400}),
        ("GET", f"/dicomweb/instances?Rows={FAMILY}", admin, None, {400}),
        ("GET", f"/dicomweb/studies?PatientName={FAMILY}&includefield={GIVEN}", admin, None, {400}),
        ("GET", f"/dicomweb/studies/1.2.3/series/{MRN}/instances/{ACCESSION}", admin, None, {400, 404}),
        ("POST", "/federation/cohort/count", analyst, json.dumps(_cohort(MRN)), {200, 400}),
        ("POST", "/federation/cohort/count", analyst, json.dumps({"cohort": {FAMILY: GIVEN}}), {400}),
        ("GET", f"/no/such/route?name={FAMILY}", admin | {"X-Patient": MRN, "User-Agent": GIVEN,
                                                          "Referer": f"http://x/?name={FAMILY}"}, None, {404}),
        ("GET", "/fhir/Patient", admin | {"X-Purpose": json.dumps({"codes": [FAMILY]}), "Cookie": f"n={MRN}"},
         None, {200, 400}),
    ]
    async with aiohttp.ClientSession() as http:
        for method, path, headers, body, ok in table:
            try:
                async with http.request(method, gw.url + path, headers=headers, data=body) as r:
                    await r.read()
                    assert r.status in ok, (method, path[:120], r.status, (await r.text())[:300])
            except aiohttp.ClientResponseError as exc:  # the server closed on an over-long line: a 4xx too
                assert exc.status in ok, (method, path[:120], exc.status)

    assert captured, "nothing was logged: the capture is broken"
    statuses = {r.__dict__.get("status") for r in captured if r.getMessage() == "request"}
    assert {400, 401, 403, 404} <= statuses, statuses  # the requests' own log lines were captured
    assert any(r.name == "aiohttp.access" for r in captured)
    needles = _needles()
    for fmt in (JsonFormatter(), TextFormatter()):
        for record in captured:
            line = fmt.format(record).lower()
            hit = [n for n in needles if n in line]
            assert not hit, (hit, line[:400])
    # the planted values did reach the raw log records (e.g. aiohttp's access line): the formatters removed them
    assert any(FAMILY.lower() in (r.getMessage() + str(r.exc_info and r.exc_info[1])).lower() for r in captured)


def test_formatters_drop_exception_messages_and_third_party_arguments():
    import sys

    try:
        try:
            raise KeyError(f"params ('{MRN}',)")
        except KeyError as inner:
            raise ValueError(f"SELECT ... WHERE name = '{FAMILY}'") from inner
    except ValueError:
        exc_info = sys.exc_info()
    own = logging.LogRecord("gateway.x", logging.ERROR, __file__, 1, "query failed: %s", ("ValueError",), exc_info)
    third = logging.LogRecord("sqlalchemy.engine", logging.INFO, __file__, 1, "[params] %r", ((FAMILY,),), exc_info)
    for fmt in (JsonFormatter(), TextFormatter()):
        for rec in (own, third):
            line = fmt.format(rec)
            assert FAMILY not in line and MRN not in line, line
            assert "ValueError" in line and "test_logs_no_phi.py" in line  # type and frames stay
    assert "query failed: ValueError" in JsonFormatter().format(own)
