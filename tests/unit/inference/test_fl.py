"""inference.fl: FedAvg, state encoding, DP clipping/noise/accounting and pairwise-masking secure aggregation,
each checked against an independent computation (flat numpy vectors, the RDP formula by hand, numerical
integration, plaintext sums)."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from inference import fl
from inference.models import SliceClassifier


def random_state(seed: int) -> fl.State:
    """A real SliceClassifier's state with a fresh random initialisation, perturbed further."""
    torch.manual_seed(seed)
    state = fl.state_from_module(SliceClassifier())
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in state.items()}


def flat(state: fl.State, keys: list[str]) -> np.ndarray:
    return np.concatenate([state[k].ravel().astype(np.float64) for k in keys])


# ------------------------------------------------------------------------------------------ FedAvg


@pytest.mark.parametrize("k", [3, 5, 8])
def test_fedavg_equals_central_weighted_average(k: int) -> None:
    rng = np.random.default_rng(100 + k)
    states = [random_state(10 * k + i) for i in range(k)]
    weights = rng.uniform(1, 5000, size=k)
    result = fl.fedavg([(s, float(w)) for s, w in zip(states, weights)])

    keys = list(states[0])
    matrix = np.stack([flat(s, keys) for s in states])  # (k, n_params)
    expected = (weights @ matrix) / weights.sum()
    assert list(result) == keys
    assert all(v.dtype == np.float32 and v.shape == states[0][n].shape for n, v in result.items())
    np.testing.assert_allclose(flat(result, keys), expected, rtol=2e-7, atol=1e-9)
    # Not just any average: the unweighted mean is measurably different.
    assert not np.allclose(flat(result, keys), matrix.mean(axis=0), rtol=1e-4, atol=1e-6)

    # The averaged state loads into the real module and runs.
    module = SliceClassifier()
    fl.load_state(module, result)
    out = module(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 2)
    assert torch.equal(module.head.bias.detach(), torch.from_numpy(result["head.bias"]))


def test_fedavg_single_and_zero_weight() -> None:
    a, b = random_state(1), random_state(2)
    only_a = fl.fedavg([(a, 3.0), (b, 0.0)])
    assert all(np.array_equal(only_a[k], a[k]) for k in a)


def test_fedavg_errors() -> None:
    a, b = random_state(1), random_state(2)
    with pytest.raises(ValueError, match="at least one"):
        fl.fedavg([])
    with pytest.raises(ValueError, match="sum"):
        fl.fedavg([(a, 0.0), (b, 0.0)])
    with pytest.raises(ValueError, match="weight"):
        fl.fedavg([(a, 1.0), (b, -1.0)])
    with pytest.raises(ValueError, match="weight"):
        fl.fedavg([(a, 1.0), (b, math.nan)])
    missing = {k: v for k, v in b.items() if k != "head.bias"}
    with pytest.raises(ValueError, match="head.bias"):
        fl.fedavg([(a, 1.0), (missing, 1.0)])
    reshaped = dict(b, **{"head.weight": b["head.weight"].reshape(16, 2)})
    with pytest.raises(ValueError, match="head.weight"):
        fl.fedavg([(a, 1.0), (reshaped, 1.0)])


def test_sub_add_scale_l2() -> None:
    a, b = random_state(3), random_state(4)
    keys = list(a)
    delta = fl.sub(a, b)
    assert all(delta[k].dtype == np.float32 for k in keys)
    np.testing.assert_allclose(flat(delta, keys), flat(a, keys) - flat(b, keys), rtol=0, atol=1e-7)
    back = fl.add(b, delta)
    np.testing.assert_allclose(flat(back, keys), flat(a, keys), atol=1e-6)
    np.testing.assert_allclose(flat(fl.scale(a, -2.5), keys), -2.5 * flat(a, keys), rtol=1e-6)
    assert fl.l2_norm(a) == pytest.approx(float(np.linalg.norm(flat(a, keys))), rel=1e-12)
    with pytest.raises(ValueError):
        fl.sub(a, {k: v for k, v in b.items() if k != "head.bias"})


def test_load_state_strict() -> None:
    module = SliceClassifier()
    state = random_state(5)
    fl.load_state(module, state)
    again = fl.state_from_module(module)
    assert all(np.array_equal(again[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="head.bias"):
        fl.load_state(module, {k: v for k, v in state.items() if k != "head.bias"})
    with pytest.raises(ValueError, match="shape"):
        fl.load_state(module, dict(state, **{"head.bias": np.zeros(3, np.float32)}))
    # The module's dtype wins (float64 module loads float32 state).
    module64 = SliceClassifier().double()
    fl.load_state(module64, state)
    assert module64.head.weight.dtype == torch.float64


# ------------------------------------------------------------------------------------------ encoding


def test_encode_decode_round_trip_bitwise() -> None:
    rng = np.random.default_rng(7)
    state = random_state(6)
    state["special"] = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45], dtype=np.float32)
    state["f64"] = rng.normal(size=(3, 5))
    state["scalar"] = np.array(2.5, dtype=np.float32)
    state["empty"] = np.zeros((0, 4), dtype=np.float32)
    state["u64"] = np.array([0, 1, 2**63, 2**64 - 1], dtype=np.uint64)
    state["big_endian"] = np.arange(6, dtype=">f4").reshape(2, 3)
    data = fl.encode_state(state)
    assert data == fl.encode_state(state)  # deterministic
    back = fl.decode_state(data)
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].shape == v.shape
        expected_dtype = v.dtype.newbyteorder("<") if v.dtype.byteorder == ">" else v.dtype
        assert back[k].dtype == expected_dtype
        assert back[k].tobytes() == v.astype(back[k].dtype).tobytes()  # bitwise, incl. NaN payload, -0.0
        assert back[k].flags.writeable
    # Compact: header + raw buffers only.
    raw = sum(v.nbytes for v in state.values())
    assert raw < len(data) < raw + 1024


def _header(data: bytes) -> tuple[int, bytes, bytes]:
    (n,) = struct.unpack_from("<I", data, len(fl.MAGIC))
    start = len(fl.MAGIC) + 4
    return n, data[start : start + n], data[start + n :]


def _with_header(header: bytes, body: bytes) -> bytes:
    return fl.MAGIC + struct.pack("<I", len(header)) + header + body


def test_decode_malformed_raises_value_error() -> None:
    good = fl.encode_state({"w": np.arange(4, dtype=np.float32), "b": np.ones(2, dtype=np.float64)})
    _, header, body = _header(good)
    bad_inputs = [
        b"",
        b"FGST",
        b"PK\x03\x04 not us",
        good[:-1],  # truncated body
        good + b"\x00",  # trailing byte
        good[: len(fl.MAGIC) + 4 + 5],  # truncated header
        fl.MAGIC + struct.pack("<I", 10**9) + header,  # header length lies
        _with_header(b"{not json", body),
        _with_header(b'{"w": 1}', body),
        _with_header(header.replace(b"<f4", b"|O8"), body),  # object dtype (pickle) refused
        _with_header(header.replace(b"[4]", b"[5]"), body),  # shape lies
        _with_header(header.replace(b"[4]", b"[-4]"), body),
        _with_header(header.replace(b'"b"', b'"w"'), body),  # duplicate name
        _with_header(b'[["w","<f4",[4],1]]', body),
        _with_header(b"[" * 100_000, body),  # nesting bomb
        _with_header(b'[["w","<f4",[0,' + str(10**30).encode() + b"]]]", b""),  # absurd empty dimension
        _with_header(b'[["w","<f4",[4.0]]]', body),
        _with_header(b'[[7,"<f4",[4]]]', body),
    ]
    for data in bad_inputs:
        with pytest.raises(ValueError):
            fl.decode_state(data)
    with pytest.raises(ValueError, match="dtype"):
        fl.encode_state({"o": np.array([object()], dtype=object)})


def test_state_hash_stable_and_sensitive() -> None:
    state = random_state(8)
    h = fl.state_hash(state)
    assert len(h) == 64 and int(h, 16) >= 0
    assert fl.state_hash(fl.decode_state(fl.encode_state(state))) == h
    assert fl.state_hash(dict(reversed(list(state.items())))) == h  # order-fixed
    assert fl.state_hash(random_state(8)) == h

    changed = {k: v.copy() for k, v in state.items()}
    changed["features.3.weight"][5, 2, 1, 0] = np.nextafter(changed["features.3.weight"][5, 2, 1, 0], np.float32(9))
    assert fl.state_hash(changed) != h
    renamed = {("x" + k if k == "head.bias" else k): v for k, v in state.items()}
    assert fl.state_hash(renamed) != h
    assert fl.state_hash(dict(state, **{"head.weight": state["head.weight"].reshape(16, 2)})) != h
    assert fl.state_hash(dict(state, **{"head.bias": state["head.bias"].astype(np.float64)})) != h


# ------------------------------------------------------------------------------------------ DP


def test_clip() -> None:
    update = fl.sub(random_state(9), random_state(10))
    keys = list(update)
    norm = float(np.linalg.norm(flat(update, keys)))
    clipped, original = fl.clip(update, norm / 3)
    assert original == pytest.approx(norm, rel=1e-12)
    assert fl.l2_norm(clipped) <= norm / 3
    assert fl.l2_norm(clipped) == pytest.approx(norm / 3, rel=1e-6)
    # Same direction.
    u, c = flat(update, keys), flat(clipped, keys)
    assert float(u @ c) / (np.linalg.norm(u) * np.linalg.norm(c)) == pytest.approx(1.0, abs=1e-6)
    # No-op below the bound (and at it).
    same, original2 = fl.clip(update, norm * 2)
    assert original2 == pytest.approx(norm, rel=1e-12)
    assert all(np.array_equal(same[k], update[k]) for k in keys)
    same[keys[0]][...] = 0  # a copy, not the caller's arrays
    assert fl.l2_norm(update) == pytest.approx(norm, rel=1e-12)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            fl.clip(update, bad)


def test_gaussian_noise() -> None:
    template = {"a": np.zeros((400, 500), np.float32), "b": np.zeros(3, np.float64)}
    noise = fl.gaussian_noise(template, 0.7, np.random.default_rng(1))
    assert noise["a"].shape == (400, 500) and noise["a"].dtype == np.float32
    assert noise["b"].dtype == np.float64
    assert abs(float(noise["a"].std()) - 0.7) < 0.7 * 0.02
    assert abs(float(noise["a"].mean())) < 0.01
    again = fl.gaussian_noise(template, 0.7, np.random.default_rng(1))
    assert np.array_equal(noise["a"], again["a"])
    assert not np.array_equal(noise["a"], fl.gaussian_noise(template, 0.7, np.random.default_rng(2))["a"])
    with pytest.raises(ValueError):
        fl.gaussian_noise(template, -1.0, np.random.default_rng(1))


def test_dp_epsilon_hand_computed() -> None:
    # z = 1, T = 10, delta = 1e-5: eps(alpha) = 10·alpha/2 + ln(1e5)/(alpha − 1); the continuous optimum is
    # alpha* = 1 + sqrt(2 ln(1e5) / 10) ≈ 2.517, so on the 0.1-step grid alpha = 2.5 wins.
    expected = 10 * 2.5 / 2 + math.log(1e5) / 1.5
    assert fl.dp_epsilon(1.0, 10, 1e-5) == pytest.approx(expected, rel=1e-12)
    assert fl.dp_epsilon(1.0, 10, 1e-5, alphas=[4.0]) == pytest.approx(20 + math.log(1e5) / 3, rel=1e-12)
    # Never below the continuous minimum, and the grid is fine enough to be within 1 % of it.
    for z, t, d in [(0.5, 1, 1e-5), (1.1, 100, 1e-6), (4.0, 50, 1e-5), (20.0, 3, 1e-8)]:
        a_star = 1 + math.sqrt(2 * z * z * math.log(1 / d) / t)
        continuous = t * a_star / (2 * z * z) + math.log(1 / d) / (a_star - 1)
        grid = fl.dp_epsilon(z, t, d)
        assert continuous - 1e-12 <= grid <= continuous * 1.01


def test_dp_epsilon_monotone_and_edges() -> None:
    by_noise = [fl.dp_epsilon(z, 20, 1e-5) for z in (0.5, 0.8, 1.0, 1.5, 3.0, 10.0)]
    assert all(x > y for x, y in zip(by_noise, by_noise[1:]))
    by_rounds = [fl.dp_epsilon(1.2, t, 1e-5) for t in (1, 2, 10, 100, 1000)]
    assert all(x < y for x, y in zip(by_rounds, by_rounds[1:]))
    assert fl.dp_epsilon(1.0, 10, 1e-7) > fl.dp_epsilon(1.0, 10, 1e-5)
    assert fl.dp_epsilon(0.0, 10, 1e-5) == math.inf
    assert fl.dp_epsilon(1.0, 0, 1e-5) == 0.0
    for args in [(-1.0, 10, 1e-5), (1.0, -1, 1e-5), (1.0, 10, 0.0), (1.0, 10, 1.0), (1.0, 2.5, 1e-5)]:
        with pytest.raises(ValueError):
            fl.dp_epsilon(*args)
    with pytest.raises(ValueError):
        fl.dp_epsilon(1.0, 10, 1e-5, sampling_rate=0.0)


def _sgm_rdp_numeric(z: float, q: float, alpha: int) -> float:
    """D_alpha((1−q)N(0,z²) + qN(1,z²) ‖ N(0,z²)) by numerical integration (Mironov et al. 2019, Thm. 4)."""
    x = np.linspace(-30 * z, alpha + 30 * z, 400_001)
    log_mu0 = -(x**2) / (2 * z * z)
    log_mu1 = -((x - 1) ** 2) / (2 * z * z)
    log_mu = log_mu1 if q == 1 else np.logaddexp(math.log1p(-q) + log_mu0, math.log(q) + log_mu1)
    log_integrand = (1 - alpha) * log_mu0 + alpha * log_mu - math.log(z * math.sqrt(2 * math.pi))
    peak = log_integrand.max()
    integral = np.trapezoid(np.exp(log_integrand - peak), x)
    return (peak + math.log(integral)) / (alpha - 1)


@pytest.mark.parametrize("z,q,alpha", [(1.1, 0.01, 8), (0.8, 0.1, 4), (2.0, 0.3, 16), (1.0, 1.0, 5)])
def test_sampled_gaussian_rdp_matches_integration(z: float, q: float, alpha: int) -> None:
    assert fl.rdp_sampled_gaussian(z, q, alpha) == pytest.approx(_sgm_rdp_numeric(z, q, alpha), rel=1e-6)


def test_dp_epsilon_sampling() -> None:
    integer_alphas = [float(a) for a in range(2, 64)]
    full = fl.dp_epsilon(1.1, 50, 1e-5, alphas=integer_alphas)
    assert fl.dp_epsilon(1.1, 50, 1e-5, sampling_rate=1.0, alphas=integer_alphas) == full
    assert fl.dp_epsilon(1.1, 50, 1e-5, sampling_rate=0.9999999, alphas=integer_alphas) == pytest.approx(full, rel=1e-4)
    sampled = [fl.dp_epsilon(1.1, 50, 1e-5, sampling_rate=q) for q in (0.01, 0.1, 0.5)]
    assert all(x < y for x, y in zip(sampled, sampled[1:])) and sampled[-1] < full


# ------------------------------------------------------------------------------------------ secure aggregation


def test_quantize_round_trip_and_limits() -> None:
    rng = np.random.default_rng(11)
    s = {"a": rng.normal(0, 100, (50, 7)), "b": np.array([-1.5, 0.0, 2**-30, -(2.0**38)])}
    q = fl.quantize(s)
    assert all(v.dtype == np.uint64 for v in q.values())
    back = fl.dequantize(q)
    for k in s:
        assert np.abs(back[k] - s[k]).max() <= 2.0 ** -(fl.SCALE_BITS + 1)
    # Two's complement: −1.5 → 2^64 − 1.5·2^24.
    assert int(q["b"][0]) == 2**64 - 3 * 2**23
    with pytest.raises(ValueError, match="'x'"):
        fl.quantize({"x": np.array([2.0**40])})
    with pytest.raises(ValueError):
        fl.quantize({"x": np.array([np.nan])})
    with pytest.raises(ValueError):
        fl.dequantize({"x": np.zeros(2, np.int64)})


def _sites(n: int, seed: int) -> tuple[list[str], dict[str, fl.SiteKeys], dict[str, fl.State], dict[str, int]]:
    rng = np.random.default_rng(seed)
    ids = [f"site-{chr(ord('a') + i)}" for i in range(n)]
    keys = {sid: fl.SiteKeys.generate() for sid in ids}
    global_state = random_state(seed)
    deltas = {sid: fl.sub(random_state(seed + 1 + i), global_state) for i, sid in enumerate(ids)}
    counts = {sid: int(rng.integers(10, 5000)) for sid in ids}
    return ids, keys, deltas, counts


@pytest.mark.parametrize("n_sites", [3, 4, 5])
def test_secure_aggregation_pairwise_masking(n_sites: int) -> None:
    ids, keys, deltas, counts = _sites(n_sites, 40 + n_sites)
    publics = {sid: keys[sid].public_b64() for sid in ids}
    run_id, round_no = "run-7f3", 2
    plain_q: dict[str, dict[str, np.ndarray]] = {}
    masked: dict[str, dict[str, np.ndarray]] = {}
    for sid in ids:
        weighted = {k: v.astype(np.float64) * counts[sid] for k, v in deltas[sid].items()}
        plain_q[sid] = fl.quantize(weighted)
        peers = {p: keys[sid].shared(publics[p]) for p in ids if p != sid}
        masked[sid] = fl.mask(plain_q[sid], sid, peers, run_id, round_no)
        # What travels survives the wire format bit for bit.
        masked[sid] = fl.decode_state(fl.encode_state(masked[sid]))

    names = list(deltas[ids[0]])
    for sid in ids:
        m = np.concatenate([masked[sid][k].ravel() for k in names])
        p = np.concatenate([plain_q[sid][k].ravel() for k in names])
        assert np.all(m != p)  # differs everywhere
        corr = np.corrcoef(m.view(np.int64).astype(np.float64), p.view(np.int64).astype(np.float64))[0, 1]
        assert abs(corr) < 0.1
        ones = np.unpackbits(m.view(np.uint8)).mean()
        assert 0.47 < ones < 0.53  # looks uniform over Z_2^64

    total = fl.unmask_sum([masked[sid] for sid in ids])
    for k in names:
        expected = np.zeros_like(total[k])
        for sid in ids:
            expected += plain_q[sid][k]  # mod 2^64
        assert np.array_equal(total[k], expected)

    sum_plain = {k: sum(deltas[sid][k].astype(np.float64) * counts[sid] for sid in ids) for k in names}
    recovered = fl.dequantize(total)
    for k in names:
        assert np.abs(recovered[k] - sum_plain[k]).max() <= 2.0**-fl.SCALE_BITS * n_sites

    # Hub-side average equals plaintext FedAvg of the deltas.
    avg = fl.secure_average([masked[sid] for sid in ids], float(sum(counts.values())))
    plain_avg = fl.fedavg([(deltas[sid], counts[sid]) for sid in ids])
    for k in names:
        np.testing.assert_allclose(avg[k], plain_avg[k], rtol=1e-5, atol=2.0**-fl.SCALE_BITS)

    # A missing site leaves the masks uncancelled: the partial sum is garbage, not a partial plaintext.
    partial = fl.dequantize(fl.unmask_sum([masked[sid] for sid in ids[1:]]))
    partial_plain = {k: sum_plain[k] - deltas[ids[0]][k].astype(np.float64) * counts[ids[0]] for k in names}
    assert all(np.abs(partial[k] - partial_plain[k]).min() > 1.0 for k in names)


def test_masked_update_helper_and_round_binding() -> None:
    ids, keys, deltas, counts = _sites(3, 70)
    publics = {sid: keys[sid].public_b64() for sid in ids}
    me = ids[1]
    via_helper = fl.masked_update(deltas[me], counts[me], me, keys[me], publics, "run", 1)
    peers = {p: keys[me].shared(publics[p]) for p in ids if p != me}
    weighted = {k: v.astype(np.float64) * counts[me] for k, v in deltas[me].items()}
    manual = fl.mask(fl.quantize(weighted), me, peers, "run", 1)
    assert all(np.array_equal(via_helper[k], manual[k]) for k in manual)
    # Masks are bound to run and round.
    other_round = fl.mask(fl.quantize(weighted), me, peers, "run", 2)
    other_run = fl.mask(fl.quantize(weighted), me, peers, "run2", 1)
    k0 = next(iter(manual))
    assert np.all(manual[k0] != other_round[k0]) and np.all(manual[k0] != other_run[k0])
    # Key order of the dict does not change the masks (streams are drawn in sorted key order).
    reordered = fl.mask(dict(reversed(list(fl.quantize(weighted).items()))), me, peers, "run", 1)
    assert all(np.array_equal(reordered[k], manual[k]) for k in manual)
    with pytest.raises(ValueError, match="own peer"):
        fl.mask(fl.quantize(weighted), me, {me: b"x" * 32}, "run", 1)
    with pytest.raises(ValueError, match="uint64"):
        fl.mask(weighted, me, peers, "run", 1)
    with pytest.raises(ValueError):
        fl.unmask_sum([])


def test_site_keys() -> None:
    a, b = fl.SiteKeys.generate(), fl.SiteKeys.generate()
    assert a.shared(b.public_b64()) == b.shared(a.public_b64())
    assert a.shared(b.public_b64()) != a.shared(fl.SiteKeys.generate().public_b64())
    loaded = fl.SiteKeys.from_pem(a.to_pem())
    assert loaded.public_b64() == a.public_b64()
    assert loaded.shared(b.public_b64()) == a.shared(b.public_b64())
    seeds = {fl.pair_seed(a.shared(b.public_b64()), "r", n) for n in range(5)}
    assert len(seeds) == 5 and all(len(s) == 32 for s in seeds)
    ed = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for bad_pem in (b"", b"-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----\n", ed):
        with pytest.raises(ValueError):
            fl.SiteKeys.from_pem(bad_pem)
    for bad_pub in ("not base64!", "AAAA", ""):
        with pytest.raises(ValueError):
            a.shared(bad_pub)
    with pytest.raises(ValueError):  # low-order point: all-zero shared secret
        a.shared("A" * 43 + "=")
