"""``fedgate`` command line: serve, load, token, consent, ...

Every sub-command builds the same :class:`~gateway.settings.Settings` (flags > env > TOML > defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from gateway.settings import Settings, SettingsError, load_settings

log = logging.getLogger("gateway.cli")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML settings file (also $FEDGATE_CONFIG)")
    p.add_argument("--data-dir", help="data directory: SQLite file, blobs, dev secrets (default ./data)")
    p.add_argument("--database-url", help="e.g. postgresql://user@host:5432/db (default: SQLite in the data dir)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides = {"data_dir": args.data_dir, "database_url": args.database_url, "log_level": args.log_level}
    overrides.update(extra)
    return load_settings(config_file=args.config, overrides=overrides)


def settings_source(args: argparse.Namespace, env: dict | None = None) -> str:
    """Where the settings came from, for the start log line: names only (no values: they may be secrets)."""
    import os

    env = os.environ if env is None else env
    parts = ["defaults"]
    config = getattr(args, "config", None) or env.get("FEDGATE_CONFIG")
    if config:
        parts.append(f"config {config}")
    names = sorted(k for k in env if k.startswith("FEDGATE_") and k != "FEDGATE_CONFIG")
    if names:
        parts.append("env " + ",".join(names))
    flags = sorted(k for k in ("host", "port", "processes", "data_dir", "database_url", "log_level")
                   if getattr(args, k, None) is not None)
    if flags:
        parts.append("flags " + ",".join("--" + f.replace("_", "-") for f in flags))
    return "; ".join(parts)


def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from gateway import __version__
    from gateway.logs import setup_logging

    settings = _settings(args, host=args.host, port=args.port, processes=args.processes, dimse_port=args.dimse_port)
    setup_logging(settings.log_level, settings.log_format)
    if args.serve_child:  # one of the serving processes started by the parent below
        from gateway.serve import serve_child

        return serve_child(settings, args.serve_child)
    engine = "postgresql" if settings.effective_database_url.startswith("postgres") else "sqlite"
    log.info("starting", extra={"version": __version__, "settings_source": settings_source(args), "engine": engine,
                                "host": settings.host, "port": settings.port, "processes": settings.serve_processes})
    if settings.serve_processes > 1:
        from gateway.metrics import prepare_multiprocess_dir
        from gateway.serve import supervise

        prepare_multiprocess_dir(settings.data_dir)  # before the serving processes start: they inherit it
        code = supervise(settings, getattr(args, "argv", None) or sys.argv[1:])
        log.info("stopped", extra={"exit_code": code})
        return code
    from gateway.app import create_app
    from gateway.services.workers import tune_gc

    app = create_app(settings)
    tune_gc()

    def listening(_banner: str) -> None:
        log.info("serving", extra={"url": f"http://{settings.host}:{settings.port}", "processes": 1})

    web.run_app(app, host=settings.host, port=settings.port, print=listening,
                access_log=None, shutdown_timeout=10)
    log.info("stopped", extra={"exit_code": 0})
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from gateway.loader import load_paths
    from gateway.logs import setup_logging

    settings = _settings(args)
    setup_logging(settings.log_level, "text")
    summary = asyncio.run(load_paths(settings, [Path(p) for p in args.paths], progress=not args.quiet))
    print(json.dumps(summary, indent=2))
    return 1 if summary.get("failed") and args.strict else 0


def cmd_token(args: argparse.Namespace) -> int:
    from gateway.auth import issue_dev_token

    settings = _settings(args)
    attrs: dict[str, Any] = {}
    for item in args.attr or ():
        key, sep, value = item.partition("=")
        if not sep:
            print(f"--attr {item!r}: expected key=value", file=sys.stderr)
            return 2
        attrs[key] = json.loads(value) if value in ("true", "false") or value.isdigit() else value
    purpose: Any = None
    if args.purpose:
        if args.purpose == "treatment":
            purpose = "treatment"
        else:
            items = [t for t in args.purpose.replace(",", " ").split() if t]
            purpose = {"codes": [t for t in items if "DUO" in t.upper()],
                       "diseases": [t for t in items if "DUO" not in t.upper()]}
    try:
        token = issue_dev_token(settings, subject=args.subject or f"dev-{args.role}", roles=[args.role],
                                purpose=purpose, attrs=attrs, org=args.org, ttl_s=args.ttl)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(token)
    return 0


def cmd_consent(args: argparse.Namespace) -> int:
    from ontologies.cli import consent_evaluate_main

    return consent_evaluate_main(sys.stdin, sys.stdout, disease_files=tuple(args.disease_ontology or ()))


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from gateway.services.audit import verify_main

    return verify_main(_settings(args))


def cmd_query(args: argparse.Namespace) -> int:
    from gateway.federation_cli import cmd_query as run

    return run(args, _settings(args))


def cmd_train(args: argparse.Namespace) -> int:
    from gateway.training_cli import cmd_train as run

    return run(args, _settings(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.federation_cli import cmd_demo as run

    return run(args)


def cmd_import(args: argparse.Namespace) -> int:
    from gateway.dicom_cli import cmd_import as run

    return run(args, _settings(args))


def cmd_dicom_conflicts(args: argparse.Namespace) -> int:
    from gateway.dicom_cli import cmd_conflicts as run

    return run(args, _settings(args))


def cmd_reindex(args: argparse.Namespace) -> int:
    from gateway.reindex_cli import cmd_reindex as run

    return run(args, _settings(args))


def cmd_omop_export(args: argparse.Namespace) -> int:
    from gateway.omop_cli import cmd_export

    return cmd_export(args, _settings(args))


def cmd_export_dicom(args: argparse.Namespace) -> int:
    from gateway.export_dicom_cli import cmd_export_dicom as run

    return run(args, _settings(args))


def cmd_omop_import(args: argparse.Namespace) -> int:
    from gateway.omop_cli import cmd_import

    return cmd_import(args, _settings(args))


def cmd_model_register(args: argparse.Namespace) -> int:
    from gateway.inference_cli import cmd_register

    return cmd_register(args, _settings(args))


def cmd_model_list(args: argparse.Namespace) -> int:
    from gateway.inference_cli import cmd_list

    return cmd_list(args, _settings(args))


def cmd_vocab(args: argparse.Namespace) -> int:
    from gateway.vocab_cli import cmd_vocab as run

    return run(args, _settings(args))


def cmd_export_fhir(args: argparse.Namespace) -> int:
    from gateway.export_fhir_cli import cmd_export_fhir as run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedgate", description="fedgate: federated FHIR + DICOMweb gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway HTTP server")
    _common(p)
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 8080)")
    p.add_argument("--processes", help="server processes sharing the port: 1 (default), N, or auto (one per "
                                       "CPU core); also setting 'processes' / $FEDGATE_PROCESSES")
    p.add_argument("--dimse-port", type=int, help="DIMSE listener port (C-ECHO/STORE/FIND/MOVE/GET; docs/dimse.md); "
                                                  "also setting 'dimse_port' / $FEDGATE_DIMSE_PORT (default: none)")
    p.add_argument("--serve-child", help=argparse.SUPPRESS)  # FD:INDEX:PARENT, set by the parent process
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("load", help="load FHIR resources/Bundles (files or folders of .json) into the store")
    _common(p)
    p.add_argument("paths", nargs="+")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--strict", action="store_true", help="exit 1 if any file failed to load")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("token", help="print a development bearer token signed with the data dir's secret")
    _common(p)
    p.add_argument("--role", required=True, help="ehr-system, pacs, clinician, analyst, site, admin")
    p.add_argument("--subject", help="token subject (default dev-ROLE)")
    p.add_argument("--org", help="requester organisation")
    p.add_argument("--purpose", help="'treatment' or DUO purpose codes and disease CURIEs, e.g. 'DUO:0000040 MONDO:0005105'")
    p.add_argument("--attr", action="append", help="requester attribute key=value (repeatable)")
    p.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("query", help="federated cohort query through a hub (table output; --json for JSON)")
    _common(p)
    p.add_argument("cohort", help="JSON file: a cohort criterion or a request {cohort, breakdowns, stats}")
    p.add_argument("--hub", help="hub base URL (default $FEDGATE_HUB or this gateway's host:port)")
    p.add_argument("--json", action="store_true", help="print the hub's JSON answer")
    p.add_argument("--token", help="bearer token for the hub (default $FEDGATE_TOKEN, else a dev token from --data-dir)")
    p.add_argument("--purpose", help="DUO purpose codes for a dev token (default DUO:0000042)")
    p.add_argument("--deadline", type=float, help="per-site deadline in seconds")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("train", help="federated training through a hub: start / status / cancel / deploy (docs/training.md)")
    _common(p)
    p.add_argument("action", choices=["start", "status", "cancel", "deploy"])
    p.add_argument("target", nargs="?", help="start: spec JSON file; status/cancel: run id; deploy: NAME@VERSION")
    p.add_argument("--hub", help="hub base URL (default $FEDGATE_HUB or this gateway's host:port)")
    p.add_argument("--token", help="bearer token (default $FEDGATE_TOKEN, else a dev token from --data-dir)")
    p.add_argument("--purpose", help="DUO purpose codes for a dev token (default DUO:0000042)")
    p.add_argument("--wait", action="store_true", help="start/status: follow the run until it ends")
    p.add_argument("--json", action="store_true", help="status: print the hub's JSON")
    p.add_argument("--sites", help="deploy: comma-separated site ids (default all)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="start a federation hub and three sites on loopback with synthetic data")
    p.add_argument("--dir", default="./demo-federation", help="data directory for the four gateways")
    p.add_argument("--base-port", type=int, default=8700, help="hub port; sites use the next three")
    p.add_argument("--patients", type=int, default=2000, help="synthetic patients per site")
    p.add_argument("--seconds", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("import", help="bulk-load a folder of DICOM files (same path as STOW-RS), with a progress bar")
    _common(p)
    p.add_argument("path", help="folder (searched recursively) or file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="JSON output: a summary and one entry per file")
    p.add_argument("--strict", action="store_true", help=argparse.SUPPRESS)  # (the default now: kept for old scripts)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("dicom-conflicts", help="list DICOM studies holding instances of several patients "
                                               "(admin: a PACS merge error or a reused StudyInstanceUID)")
    _common(p)
    p.add_argument("--json", action="store_true", help="JSON output")
    p.add_argument("--strict", action="store_true", help="exit 1 if any study is conflicting")
    p.set_defaults(func=cmd_dicom_conflicts)

    p = sub.add_parser("reindex", help="rebuild the FHIR search index and common model from the stored "
                                       "resources (after an upgrade that changes search parameters or mappings)")
    p.add_argument("--json", action="store_true", help="JSON output, no progress bar")
    _common(p)
    p.set_defaults(func=cmd_reindex)

    p = sub.add_parser("export", help="research exports, de-identified through the consent gate (docs/deidentification.md)")
    esub = p.add_subparsers(dest="export_command", required=True)
    from gateway.export_dicom_cli import add_parser as add_export_dicom

    add_export_dicom(esub, _common)
    esub.choices["dicom"].set_defaults(func=cmd_export_dicom)
    from gateway.export_fhir_cli import add_parser as add_export_fhir

    add_export_fhir(esub)
    esub.choices["fhir"].set_defaults(func=cmd_export_fhir)

    p = sub.add_parser("omop", help="OMOP CDM v5.4 export (consent-gated) and import")
    osub = p.add_subparsers(dest="omop_command", required=True)
    e = osub.add_parser("export", help="export the consented common model to a PostgreSQL schema or CSV files")
    _common(e)
    e.add_argument("--purpose", required=True, help="research purpose: DUO codes (+ disease CURIEs)")
    e.add_argument("--pg-url", help="target PostgreSQL database URL")
    e.add_argument("--schema", help="target schema (created with the official DDL)")
    e.add_argument("--csv", help="target directory for CSV files")
    e.add_argument("--replace", action="store_true", help="drop and re-create an existing schema, or replace an earlier CSV export in --csv")
    e.add_argument("--vocabulary", help="OHDSI vocabulary directory (CONCEPT.csv, CONCEPT_RELATIONSHIP.csv)")
    e.add_argument("--subject", default="cli-omop-export", help="requester subject recorded in the audit")
    e.set_defaults(func=cmd_omop_export)
    i = osub.add_parser("import", help="import an OMOP CDM v5.4 schema into the common model (incremental)")
    _common(i)
    i.add_argument("--pg-url", required=True, help="source PostgreSQL database URL")
    i.add_argument("--schema", required=True, help="source schema")
    i.add_argument("--vocabulary", help="OHDSI vocabulary directory (CONCEPT.csv, CONCEPT_RELATIONSHIP.csv)")
    i.set_defaults(func=cmd_omop_import)

    p = sub.add_parser("consent", help="data-steward tools for DUO consent")
    csub = p.add_subparsers(dest="consent_command", required=True)
    e = csub.add_parser("evaluate", help="evaluate consent × purpose × requester JSON (stdin) → decision JSON")
    e.add_argument("--disease-ontology", action="append", help="OWL/OBO disease hierarchy file (repeatable)")
    e.set_defaults(func=cmd_consent)

    p = sub.add_parser("model", help="inference model cards (docs/inference.md)")
    msub = p.add_subparsers(dest="model_command", required=True)
    m = msub.add_parser("register", help="register model card JSON files (validated; the model must be on the backend)")
    m.add_argument("cards", nargs="+", help="model card JSON file(s)")
    _common(m)
    m.set_defaults(func=cmd_model_register)
    m = msub.add_parser("list", help="list registered model cards")
    m.add_argument("--json", action="store_true", help="JSON output")
    _common(m)
    m.set_defaults(func=cmd_model_list)

    from gateway.vocab_cli import add_parser as add_vocab_parser

    add_vocab_parser(sub, _common, cmd_vocab)

    p = sub.add_parser("audit", help="audit trail tools")
    asub = p.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser("verify", help="check the AuditEvent hash chain; exit 1 naming the first tampered row")
    _common(v)
    v.set_defaults(func=cmd_audit_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(f"fedgate: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
