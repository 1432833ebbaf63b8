"""The ``processes`` setting (``fedgate serve --processes``) and the worker-pool default that follows it."""

from __future__ import annotations

import pytest

import gateway.settings as settings_module
from gateway.settings import MAX_AUTO_PROCESSES, SettingsError, available_cores, load_settings


def test_processes_from_env_toml_and_flags(tmp_path):
    cores = min(MAX_AUTO_PROCESSES, available_cores())
    # default (issue 27): one process per core, capped — the configuration the figures are measured with
    assert load_settings(env={}).processes == 0 and load_settings(env={}).serve_processes == cores
    assert load_settings(env={"FEDGATE_PROCESSES": "1"}).serve_processes == 1  # the documented way back
    assert load_settings(env={"FEDGATE_PROCESSES": "3"}).serve_processes == 3
    assert load_settings(env={"FEDGATE_PROCESSES": "auto"}).serve_processes == cores
    assert load_settings(env={"FEDGATE_PROCESSES": "12"}).serve_processes == 12  # explicit: no cap
    cfg = tmp_path / "f.toml"
    cfg.write_text('processes = "auto"\n')
    assert load_settings(config_file=cfg, env={}).processes == 0
    assert load_settings(config_file=cfg, env={}, overrides={"processes": "2"}).serve_processes == 2
    for bad in ("-1", "many"):
        with pytest.raises(SettingsError, match="processes"):
            load_settings(env={"FEDGATE_PROCESSES": bad})


def test_auto_is_capped_and_follows_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(settings_module, "available_cores", lambda: 64)
    assert load_settings(env={}).serve_processes == MAX_AUTO_PROCESSES == 8
    assert load_settings(env={}).validation_processes == 4  # the cores the 8 processes leave, at most 4
    monkeypatch.setattr(settings_module, "available_cores", lambda: 1)
    assert load_settings(env={}).serve_processes == 1  # one core: the single-process path


def test_worker_pools_use_the_cores_the_server_processes_leave():
    cores = available_cores()
    assert load_settings(env={"FEDGATE_PROCESSES": "1"}).validation_processes == max(0, min(4, cores - 1))
    assert load_settings(env={"FEDGATE_PROCESSES": "auto"}).validation_processes == max(0, min(4, cores - min(8, cores)))
    assert load_settings(env={"FEDGATE_PROCESSES": "auto", "FEDGATE_VALIDATION_WORKERS": "2"}).validation_processes == 2


def test_boolean_settings_from_env_and_toml(tmp_path):
    assert load_settings(env={}).stow_direct_io is True
    for word, want in (("0", False), ("false", False), ("Off", False), ("1", True), ("yes", True)):
        assert load_settings(env={"FEDGATE_STOW_DIRECT_IO": word}).stow_direct_io is want
    cfg = tmp_path / "f.toml"
    cfg.write_text("stow_direct_io = false\n")
    assert load_settings(config_file=cfg, env={}).stow_direct_io is False
    with pytest.raises(SettingsError, match="stow_direct_io"):
        load_settings(env={"FEDGATE_STOW_DIRECT_IO": "maybe"})
