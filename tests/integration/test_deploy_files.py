"""The deployment files are checked, not just written: both compose files pass ``docker-compose config``
(Debian's docker-compose; a syntax or reference error fails the suite), every file they mount exists in the
repository, the federation's TOML files load with fedgate's own settings and federation config, and
make-secrets.sh produces every secret the compose file names — which then work as fedgate settings."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from gateway.services.federation import FederationConfig, HubTokenVerifier, hub_private_key
from gateway.settings import load_settings
from tests.conftest import REPO

FED = REPO / "deploy" / "federation"


def _compose_config(compose: Path, cwd: Path) -> dict:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is not installed (scripts/setup.d/40-docker-compose.sh installs it)"
    out = subprocess.run([exe, "-f", str(compose), "config"], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_root_compose_file_is_valid():
    cfg = _compose_config(REPO / "docker-compose.yml", REPO)
    assert {"gateway", "postgres", "triton", "orthanc"} <= set(cfg["services"])


def test_federation_compose_file_is_valid_and_complete(tmp_path):
    # a copy of the repository's deploy/ + what it mounts, so make-secrets.sh writes outside the checkout
    root = tmp_path / "repo"
    shutil.copytree(FED, root / "deploy" / "federation")
    shutil.copytree(REPO / "inference" / "model_repository", root / "inference" / "model_repository")
    shutil.copy(REPO / "Dockerfile", root / "Dockerfile")
    fed = root / "deploy" / "federation"
    made = subprocess.run(["bash", str(fed / "make-secrets.sh")], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    cfg = _compose_config(fed / "docker-compose.yml", fed)
    services = cfg["services"]
    assert {"hub", "site-a", "site-b", "pg-site-a", "pg-site-b", "triton-site-a", "triton-site-b"} <= set(services)
    for name, svc in services.items():
        assert "healthcheck" in svc, f"{name} has no health check"
    for site in ("site-a", "site-b"):
        deps = services[site]["depends_on"]
        assert deps[f"pg-{site}"]["condition"] == "service_healthy"
        assert deps[f"triton-{site}"]["condition"] == "service_healthy"
        assert services[f"triton-{site}"]["image"].startswith("nvcr.io/nvidia/tritonserver")
        assert any(v["target"] == "/models" if isinstance(v, dict) else ":/models" in v
                   for v in services[f"triton-{site}"]["volumes"])
    # every secret file exists and is non-empty; every bind mount exists
    for name, sec in cfg["secrets"].items():
        assert Path(sec["file"]).stat().st_size > 0, name
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            src = v["source"] if isinstance(v, dict) else v.split(":")[0]
            if src.startswith("/"):
                assert Path(src).exists(), f"{name} mounts {src}, which does not exist"

    secrets = fed / "secrets"
    # the settings as the containers get them: TOML + the *_FILE variables pointing at the secrets
    for who, toml in (("hub", "hub.toml"), ("site-a", "site-a.toml"), ("site-b", "site-b.toml")):
        text = (fed / toml).read_text().replace("/run/secrets/hub_key", str(secrets / "hub.pem")) \
            .replace("/run/secrets/hub_pub", str(secrets / "hub.pub.pem")).replace('"/data"', f'"{tmp_path / who}"')
        cfg_file = tmp_path / f"{who}.toml"
        cfg_file.write_text(text)
        env = {"FEDGATE_JWT_SECRET_FILE": str(secrets / f"{who}-jwt.secret")}
        if who != "hub":
            env["FEDGATE_DATABASE_URL_FILE"] = str(secrets / f"{who}-database.url")
        settings = load_settings(config_file=cfg_file, env=env)
        assert len(settings.jwt_secret) >= 32
        fc = FederationConfig.from_settings(settings)
        if who == "hub":
            assert fc.is_hub and {s.id for s in fc.sites} == {"site-a", "site-b"}
            hub_private_key(settings, fc)  # the generated key loads
        else:
            assert settings.database_url.startswith(f"postgresql://fedgate:") and f"@pg-{who}:5432/" in settings.database_url
            assert [h for h, _ in fc.trusted_hubs] == ["hub"], "the site trusts no hub"
            HubTokenVerifier.from_config(settings, fc)  # the hub's public key loads
            assert settings.extra["inference"]["url"] == f"triton-{who}:8001"
