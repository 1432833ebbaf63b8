"""``fedgate export dicom``: an imaging cohort export (issue #24; docs/deidentification.md).

Starts the application's wiring (no HTTP listener) and runs :class:`DicomExportService` for a requester
with the given role and purpose, so the export reads exactly what that requester may read through the
consent gate, de-identified with the project's keys.  Prints the per-study outcome report (JSON) on stdout;
a progress bar on stderr.  Exit status 1 when a study failed, 0 otherwise (not-found and withheld
instances are outcomes, not failures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from gateway.context import Requester
from gateway.errors import GatewayError
from gateway.settings import Settings


def add_parser(esub, common) -> None:
    d = esub.add_parser("dicom", help="export studies de-identified (PS3.15 Basic Profile) to a folder with a "
                                      "DICOMDIR or to a DICOMweb server (STOW-RS)")
    common(d)
    d.add_argument("studies", nargs="*", help="Study Instance UIDs")
    d.add_argument("--studies-file", help="file with one Study Instance UID per line, or a JSON list")
    d.add_argument("--cohort", help="JSON file with a federation cohort (as for 'fedgate query': {\"cohort\": ...} "
                                    "or the bare criterion): the studies it selects here, through the consent gate")
    d.add_argument("--out", help="target folder (written with a DICOMDIR)")
    d.add_argument("--stow-url", help="target DICOMweb base URL (STOW-RS to <url>/studies)")
    d.add_argument("--stow-token-file", help="file holding a bearer token for the target")
    d.add_argument("--purpose", required=True, help='purpose of use: "treatment" or DUO codes (+ disease CURIEs)')
    d.add_argument("--role", default="analyst", help="requester role the consent gate applies (default analyst)")
    d.add_argument("--project", help="research project (keys the pseudonyms, UIDs and date offsets)")
    d.add_argument("--subject", default="cli-dicom-export", help="requester subject recorded in the audit")
    d.add_argument("--clean-descriptors", action="store_true", help="PS3.15 Clean Descriptors Option")
    d.add_argument("--retain-patient-characteristics", action="store_true")
    d.add_argument("--retain-device-identity", action="store_true")
    d.add_argument("--no-progress", action="store_true")


def _studies(args: argparse.Namespace) -> list[str]:
    out = list(args.studies or [])
    if args.studies_file:
        text = Path(args.studies_file).read_text()
        if text.lstrip().startswith("["):
            out += [str(s) for s in json.loads(text)]
        else:
            out += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return out


def cmd_export_dicom(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.auth import parse_purpose
    from gateway.services.dicom_export import ExportTarget
    from mappings.deid.dicom import DeidOptions

    try:
        purpose = parse_purpose(args.purpose)
        studies = _studies(args)
        cohort = None
        if args.cohort:
            doc = json.loads(Path(args.cohort).read_text())
            cohort = doc["cohort"] if isinstance(doc, dict) and "cohort" in doc else doc
            if studies:
                raise ValueError("give studies or --cohort, not both")
        token = Path(args.stow_token_file).read_text().strip() if args.stow_token_file else None
        target = ExportTarget(folder=Path(args.out).resolve() if args.out else None, stow_url=args.stow_url,
                              stow_token=token)
    except (GatewayError, OSError, ValueError) as exc:
        print(f"fedgate export dicom: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    if not studies and cohort is None:
        print("fedgate export dicom: no studies given", file=sys.stderr)
        return 2
    from gateway.context import Purpose

    requester = Requester(args.subject, frozenset({args.role}), None, {}, purpose or Purpose())
    options = DeidOptions(clean_descriptors=args.clean_descriptors,
                          patient_characteristics=args.retain_patient_characteristics,
                          device_identity=args.retain_device_identity)
    try:
        report = asyncio.run(_run(settings, requester, studies, cohort, target, args.project, options,
                                  not args.no_progress))
    except GatewayError as exc:
        print(f"fedgate export dicom: {exc.message}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 1 if any(s["status"] == "failed" for s in report["studies"]) else 0


async def _run(settings, requester, studies, cohort, target, project, options, progress: bool) -> dict:
    from aiohttp import web

    from gateway import keys
    from gateway.app import create_app

    app = create_app(settings, startup="once")  # a one-shot command: no job workers (they would claim the server's jobs)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        svc = app[keys.DICOM_EXPORT]
        if cohort is not None:
            studies = await svc.cohort_studies(requester, cohort, expand=app[keys.CODE_EXPANDER])
            if not studies:
                from gateway.services.dicom_export import ExportReport

                return ExportReport(svc.policy.keys_for(requester, project).project, target.describe()).as_json()
        from tqdm import tqdm  # imported when used: the CLI starts without it

        with tqdm(total=len(studies), desc="exporting", unit="study", disable=not progress, file=sys.stderr) as bar:
            done: set[str] = set()

            def tick(study: str, _n: int) -> None:
                if study not in done:
                    done.add(study)
                    bar.update(1)

            report = await svc.export(requester, studies, target, project=project, options=options, progress=tick)
        return report.as_json()
    finally:
        await runner.cleanup()
