"""Verified bearer tokens are remembered briefly (gateway/auth.py TokenVerifier.verify) — never past their
``exp``, keyed by token and purpose header, and a changed signature is still checked."""

from __future__ import annotations

import time

import pytest

from gateway.auth import TokenVerifier, issue_dev_token
from gateway.errors import Unauthorized
from gateway.settings import load_settings


@pytest.fixture
def settings(tmp_path):
    return load_settings(env={}, overrides={"data_dir": tmp_path})


def test_cached_token_still_expires(settings):
    v = TokenVerifier(settings)
    token = issue_dev_token(settings, subject="u1", roles=["pacs"], ttl_s=2)
    first = v.verify(token)
    assert v.verify(token) is first  # served from the cache
    time.sleep(max(0.0, int(time.time()) + 2.2 - time.time()) + 0.1)  # past exp (whole seconds)
    deadline = time.time() + 3
    while time.time() < deadline:
        try:
            v.verify(token)
        except Unauthorized as exc:
            assert "expired" in str(exc)
            break
        time.sleep(0.1)
    else:
        pytest.fail("an expired token was still accepted from the cache")


def test_cache_keys_on_the_purpose_header_and_never_skips_the_signature(settings):
    v = TokenVerifier(settings)
    token = issue_dev_token(settings, subject="a1", roles=["analyst"])
    plain = v.verify(token)
    hmb = v.verify(token, "DUO:0000006")
    assert plain.purpose != hmb.purpose and "DUO:0000006" in hmb.purpose.codes
    head, payload, sig = token.split(".")
    forged = ".".join([head, payload, ("A" if sig[0] != "A" else "B") + sig[1:]])
    with pytest.raises(Unauthorized):
        v.verify(forged)
    assert v.verify(token) is plain
