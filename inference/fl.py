"""Federated-learning numerics (pure): model states, FedAvg, DP-FedAvg clipping/noise/accounting and
secure aggregation by pairwise masking.

Nothing here does I/O besides turning states into bytes and back; the hub/site services call these
functions (off the event loop: they are CPU-bound on large states).

* A *state* (:data:`State`) is a model's ``state_dict`` as numpy arrays in the module's key order.
* **FedAvg** (McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep
  Networks from Decentralized Data", AISTATS 2017, Algorithm 1): the new global model is the average of
  the sites' models (or updates) weighted by their number of training examples, ``Σ n_k w_k / Σ n_k``.
* **DP-FedAvg** (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
  Models", ICLR 2018, Algorithm 1): each site's update Δ_k is clipped to L2 norm ≤ S
  (:func:`clip`, ``π(Δ, S) = Δ · min(1, S / ‖Δ‖)``), the aggregate gets Gaussian noise N(0, (z·S)²·I)
  (:func:`gaussian_noise`) and the privacy loss is tracked with the moments/RDP accountant.
* **Accounting** (:func:`dp_epsilon`): Rényi differential privacy (Mironov, "Rényi Differential
  Privacy", CSF 2017): the Gaussian mechanism with L2 sensitivity 1 and noise multiplier z is
  (α, α/(2z²))-RDP (Prop. 7), RDP composes additively over rounds (Prop. 1) and (α, ε)-RDP implies
  (ε + log(1/δ)/(α−1), δ)-DP (Prop. 3); the reported ε is the minimum over a grid of orders α.  With
  client sampling (rate q < 1) the sampled Gaussian mechanism's RDP at integer orders is computed exactly
  (Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019, §3.3).
* **Secure aggregation** (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
  Learning", CCS 2017, §4 "pairwise masking"): every pair of sites (u, v) agrees on a secret
  (X25519, :class:`SiteKeys`), expands it into a pseudorandom vector p_uv over Z_{2^64}; u adds p_uv
  if u < v and subtracts it otherwise.  Summed over all sites the masks cancel exactly, so the hub learns
  only Σ x_u.  Values are fixed point (:func:`quantize`, ``SCALE_BITS`` fractional bits, two's complement
  in uint64), which makes the cancellation exact.  Limitation (documented, not handled here): without the
  protocol's secret sharing of the pairwise seeds a site that drops out after masking makes the round's
  sum unrecoverable; the round must then be restarted with the remaining sites.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

State = dict[str, np.ndarray]
"""A model's state_dict as numpy arrays (float32/float64; uint64 for quantized/masked states), ordered."""

# --------------------------------------------------------------------------------------------------
# Module <-> state
# --------------------------------------------------------------------------------------------------


def state_from_module(module: torch.nn.Module) -> State:
    """The module's ``state_dict`` as float32 numpy copies, in the module's key order.

    Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are converted to float32 too (exact up to
    2^24); :func:`load_state` casts every value back to the module's own dtype.
    """
    return {
        name: tensor.detach().cpu().to(torch.float32).numpy().copy() for name, tensor in module.state_dict().items()
    }


def load_state(module: torch.nn.Module, state: State) -> None:
    """Load ``state`` into ``module`` (strict): same key set and shapes, or :class:`ValueError` naming the
    offending keys.  Each value is cast to the dtype the module already has for that key."""
    current = module.state_dict()
    missing = [k for k in current if k not in state]
    unexpected = [k for k in state if k not in current]
    if missing or unexpected:
        raise ValueError(f"state does not match the module: missing keys {missing}, unexpected keys {unexpected}")
    for name, tensor in current.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"state[{name!r}] has shape {tuple(state[name].shape)}, the module expects {tuple(tensor.shape)}"
            )
    converted = {
        name: torch.from_numpy(np.array(state[name], order="C", copy=True)).to(dtype=tensor.dtype, device=tensor.device)
        for name, tensor in current.items()
    }
    module.load_state_dict(converted, strict=True)


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------

MAGIC = b"FGST\x01"
"""Encoding: MAGIC, uint32-LE header length, UTF-8 JSON header ``[[name, dtype, shape], ...]``, then the
arrays' raw little-endian C-order bytes concatenated in header order.  No pickle, no timestamps, so the
same state always encodes to the same bytes."""

ALLOWED_DTYPES: frozenset[str] = frozenset(
    {"<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "|b1"}
)
MAX_TENSORS = 100_000


def _canonical(array: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise ValueError(f"state[{name!r}] is {type(array).__name__}, expected a numpy array")
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if dtype.str not in ALLOWED_DTYPES:
        raise ValueError(f"state[{name!r}] has unsupported dtype {array.dtype}")
    return np.asarray(array, dtype=dtype, order="C")  # keeps 0-d arrays 0-d


def encode_state(state: Mapping[str, np.ndarray]) -> bytes:
    """Compact, self-describing, deterministic bytes for a state (float or uint64 arrays); see :data:`MAGIC`."""
    arrays: list[np.ndarray] = []
    header: list[list[object]] = []
    for name, array in state.items():
        if not isinstance(name, str):
            raise ValueError(f"state key {name!r} is not a string")
        canon = _canonical(array, name)
        arrays.append(canon)
        header.append([name, canon.dtype.str, list(canon.shape)])
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    parts: list[bytes | memoryview] = [MAGIC, struct.pack("<I", len(head)), head]
    parts.extend(memoryview(a).cast("B") if a.size else b"" for a in arrays)  # type: ignore[arg-type]
    return b"".join(parts)


def decode_state(data: bytes) -> State:
    """Inverse of :func:`encode_state`; :class:`ValueError` with a clear message on anything malformed
    (wrong magic, truncated, bad header, unknown dtype, duplicate names, trailing bytes)."""
    view = memoryview(data)
    if len(view) < len(MAGIC) + 4 or bytes(view[: len(MAGIC)]) != MAGIC:
        raise ValueError("not a fedgate model state (bad magic)")
    (head_len,) = struct.unpack_from("<I", view, len(MAGIC))
    start = len(MAGIC) + 4
    if head_len > len(view) - start:
        raise ValueError("model state truncated: header longer than the data")
    try:
        header = json.loads(bytes(view[start : start + head_len]).decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"model state header is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(header, list) or len(header) > MAX_TENSORS:
        raise ValueError("model state header must be a list of [name, dtype, shape] entries")
    offset = start + head_len
    out: State = {}
    for i, entry in enumerate(header):
        if not (isinstance(entry, list) and len(entry) == 3):
            raise ValueError(f"model state header entry {i} must be [name, dtype, shape]")
        name, dtype_str, shape = entry
        if not isinstance(name, str):
            raise ValueError(f"model state header entry {i}: name must be a string")
        if name in out:
            raise ValueError(f"model state has the tensor {name!r} twice")
        if dtype_str not in ALLOWED_DTYPES:
            raise ValueError(f"model state tensor {name!r}: unsupported dtype {dtype_str!r}")
        if not (
            isinstance(shape, list)
            and len(shape) <= 32
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)
        ):
            raise ValueError(f"model state tensor {name!r}: shape must be a list of at most 32 integers in [0, 2^40)")
        dtype = np.dtype(dtype_str)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > len(view) - offset:
            raise ValueError(f"model state truncated in tensor {name!r}")
        array = np.frombuffer(view[offset : offset + nbytes], dtype=dtype).reshape(tuple(shape)).copy()
        out[name] = array
        offset += nbytes
    if offset != len(view):
        raise ValueError(f"model state has {len(view) - offset} trailing bytes")
    return out


def state_hash(state: Mapping[str, np.ndarray]) -> str:
    """SHA-256 hex over every tensor's name, dtype, shape and raw little-endian bytes, in sorted key
    order (so the hash does not depend on dict insertion order)."""
    h = hashlib.sha256(b"fedgate-state-v1\x00")
    for name in sorted(state):
        canon = _canonical(state[name], name)
        head = json.dumps([name, canon.dtype.str, list(canon.shape)], separators=(",", ":"), ensure_ascii=True)
        h.update(struct.pack("<I", len(head)))
        h.update(head.encode("ascii"))
        h.update(memoryview(canon).cast("B") if canon.size else b"")  # type: ignore[arg-type]
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------------


def check_compatible(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], what: str = "states") -> None:
    """:class:`ValueError` unless ``a`` and ``b`` have the same keys and shapes (order may differ)."""
    if a.keys() != b.keys():
        missing = sorted(set(a) - set(b))
        extra = sorted(set(b) - set(a))
        raise ValueError(f"{what} have different tensors: only in the first {missing}, only in the second {extra}")
    for name in a:
        if a[name].shape != b[name].shape:
            raise ValueError(f"{what}: tensor {name!r} has shapes {a[name].shape} and {b[name].shape}")


def check_finite(state: Mapping[str, np.ndarray], what: str = "state") -> None:
    """:class:`ValueError` naming the first tensor that holds NaN or ±inf."""
    for name, array in state.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ValueError(f"{what}: tensor {name!r} holds NaN or infinite values")


def sub(a: State, b: State) -> State:
    """``a − b`` per tensor (e.g. a site's update Δ = local − global)."""
    check_compatible(a, b)
    return {k: np.subtract(a[k], b[k]) for k in a}


def add(a: State, b: State) -> State:
    """``a + b`` per tensor (e.g. global + averaged update)."""
    check_compatible(a, b)
    return {k: np.add(a[k], b[k]) for k in a}


def scale(a: State, k: float) -> State:
    """``k · a`` per tensor; the tensors keep their dtype."""
    return {name: (array * array.dtype.type(k)) if array.dtype.kind == "f" else array * k for name, array in a.items()}


def l2_norm(s: State) -> float:
    """The L2 norm of the state flattened into one vector (accumulated in float64)."""
    total = 0.0
    for array in s.values():
        flat = array.ravel().astype(np.float64, copy=False)
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


# --------------------------------------------------------------------------------------------------
# FedAvg
# --------------------------------------------------------------------------------------------------


def fedavg(updates: Sequence[tuple[State, float]]) -> State:
    """FedAvg (McMahan et al. 2017, Algorithm 1): ``Σ w_i s_i / Σ w_i`` per tensor, accumulated in
    float64 and returned as float32, keys in the first state's order.

    ``w_i`` is usually the site's number of training examples.  :class:`ValueError` if ``updates`` is
    empty, the states' keys/shapes differ, a weight is negative or not finite, or ``Σ w_i <= 0``.
    """
    if not updates:
        raise ValueError("fedavg needs at least one update")
    first = updates[0][0]
    weights: list[float] = []
    for i, (state, weight) in enumerate(updates):
        w = float(weight)
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"update {i}: weight must be a finite number >= 0, got {weight!r}")
        check_compatible(first, state, what=f"update 0 and update {i}")
        weights.append(w)
    total = math.fsum(weights)
    if total <= 0:
        raise ValueError(f"fedavg: the weights sum to {total}, must be > 0")
    out: State = {}
    for name, ref in first.items():
        acc = np.zeros(ref.shape, dtype=np.float64)
        tmp = np.empty(ref.shape, dtype=np.float64)
        for (state, _), w in zip(updates, weights):
            if w == 0:
                continue
            np.multiply(state[name], w, out=tmp, dtype=np.float64)
            acc += tmp
        acc /= total
        out[name] = acc.astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------------
# DP-FedAvg
# --------------------------------------------------------------------------------------------------


def clip(update: State, max_norm: float) -> tuple[State, float]:
    """Clip to L2 norm ``<= max_norm`` (McMahan et al. 2018, π(Δ, S) = Δ · min(1, S/‖Δ‖)); returns
    ``(clipped, original_norm)``.  Below the bound the values are returned unchanged (copies).  The result
    is guaranteed ``l2_norm(clipped) <= max_norm`` despite float32 rounding."""
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    norm = l2_norm(update)
    if not math.isfinite(norm):
        raise ValueError("update holds NaN or infinite values; cannot clip")
    if norm <= max_norm:
        return {k: v.copy() for k, v in update.items()}, norm
    factor = max_norm / norm
    for _ in range(64):
        clipped = scale(update, factor)
        if l2_norm(clipped) <= max_norm:
            return clipped, norm
        factor *= 1.0 - 2.0**-20
    raise ValueError("could not clip the update below max_norm")  # pragma: no cover - float pathology


def gaussian_noise(shape_like: State, std: float, rng: np.random.Generator) -> State:
    """Independent N(0, std²) noise with the keys and shapes of ``shape_like`` (float64 where the
    template is float64, float32 otherwise).  DP-FedAvg adds it with ``std = z · S`` to the sum of clipped
    updates (or ``z · S / Σw`` to the average)."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise std must be a finite number >= 0, got {std!r}")
    out: State = {}
    for name, array in shape_like.items():
        dtype = np.float64 if array.dtype == np.float64 else np.float32
        noise = rng.standard_normal(size=array.shape, dtype=dtype)
        noise *= dtype(std)
        out[name] = noise
    return out


DEFAULT_ALPHAS: tuple[float, ...] = tuple(
    [1.0 + x / 10.0 for x in range(1, 100)]
    + [float(a) for a in range(11, 64)]
    + [float(a) for a in (64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1024, 2048, 4096, 8192)]
)
"""Rényi orders searched by :func:`dp_epsilon` (1.1 … 10.9 by 0.1, then integers, then a sparse tail)."""


def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


def rdp_sampled_gaussian(noise_multiplier: float, sampling_rate: float, alpha: int) -> float:
    """RDP ε(α) of one step of the sampled Gaussian mechanism at integer order α ≥ 2 (Mironov, Talwar,
    Zhang 2019, §3.3): ``log Σ_{k=0}^{α} C(α,k) (1−q)^{α−k} q^k exp((k²−k)/(2z²)) / (α−1)``.
    With q = 1 this is ``α / (2 z²)``."""
    if alpha < 2 or int(alpha) != alpha:
        raise ValueError(f"alpha must be an integer >= 2, got {alpha!r}")
    q, z = sampling_rate, noise_multiplier
    if q == 1.0:
        return alpha / (2 * z * z)
    log_a = -math.inf
    for k in range(alpha + 1):
        term = (
            math.lgamma(alpha + 1)
            - math.lgamma(k + 1)
            - math.lgamma(alpha - k + 1)
            + (alpha - k) * math.log1p(-q)
            + (k * math.log(q) if k else 0.0)
            + (k * k - k) / (2 * z * z)
        )
        log_a = _log_add(log_a, term)
    return max(log_a, 0.0) / (alpha - 1)


def dp_epsilon(
    noise_multiplier: float,
    rounds: int,
    delta: float,
    sampling_rate: float = 1.0,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
) -> float:
    """(ε, δ)-DP of ``rounds`` compositions of the Gaussian mechanism with noise multiplier z (noise std
    = z × the L2 sensitivity), via RDP (Mironov 2017):

    ``ε = min_α [ rounds · α / (2 z²) + log(1/δ) / (α − 1) ]`` over ``alphas`` (sampling_rate = 1).

    With client sampling (0 < q < 1) the sampled Gaussian mechanism's RDP is used at the integer orders of
    ``alphas`` (:func:`rdp_sampled_gaussian`).  z = 0 → ``math.inf``; rounds = 0 → 0.0.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if int(rounds) != rounds or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not (0 < sampling_rate <= 1):
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    log_inv_delta = math.log(1 / delta)
    best = math.inf
    for alpha in alphas:
        if alpha <= 1:
            continue
        if sampling_rate == 1.0:
            rdp = rounds * alpha / (2 * noise_multiplier**2)
        else:
            if alpha != int(alpha) or alpha < 2:
                continue
            rdp = rounds * rdp_sampled_gaussian(noise_multiplier, sampling_rate, int(alpha))
        best = min(best, rdp + log_inv_delta / (alpha - 1))
    return best


# --------------------------------------------------------------------------------------------------
# Secure aggregation (pairwise masking, Bonawitz et al. 2017)
# --------------------------------------------------------------------------------------------------

SCALE_BITS = 24
_HKDF_INFO = b"fedgate secagg pairwise mask v1"


def quantize(s: State, scale_bits: int = SCALE_BITS) -> dict[str, np.ndarray]:
    """Fixed point: ``round(x · 2^b)`` as int64, stored as its two's complement in uint64.

    :class:`ValueError` on NaN/inf or values that do not fit in int64 at this scale.  The *sum* over the
    sites must fit as well (|Σ x| < 2^(63−b)) for :func:`dequantize` to read it back.
    """
    if not 0 <= scale_bits <= 52:
        raise ValueError(f"scale_bits must be in [0, 52], got {scale_bits}")
    factor = float(2**scale_bits)
    limit = 2.0**63
    out: dict[str, np.ndarray] = {}
    for name, array in s.items():
        scaled = np.rint(np.asarray(array, dtype=np.float64) * factor)
        if scaled.size and not (np.isfinite(scaled).all() and np.abs(scaled).max() < limit):
            raise ValueError(f"tensor {name!r}: values are not finite or too large for {scale_bits}-bit fixed point")
        out[name] = scaled.astype(np.int64).view(np.uint64)
    return out


def dequantize(q: Mapping[str, np.ndarray], scale_bits: int = SCALE_BITS) -> State:
    """uint64 two's complement → signed → float64 ``/ 2^b`` (inverse of :func:`quantize` up to rounding)."""
    factor = float(2**scale_bits)
    out: State = {}
    for name, array in q.items():
        if array.dtype != np.uint64:
            raise ValueError(f"tensor {name!r}: expected uint64, got {array.dtype}")
        out[name] = array.view(np.int64).astype(np.float64) / factor
    return out


def pair_seed(shared_secret: bytes, run_id: str, round_no: int) -> bytes:
    """32-byte seed for one pair's mask in one round: HKDF-SHA256 (RFC 5869) of the X25519 shared secret,
    bound to the run and round so masks are never reused across rounds."""
    if len(shared_secret) < 16:
        raise ValueError("shared secret too short")
    run = run_id.encode("utf-8")
    info = _HKDF_INFO + struct.pack(">I", len(run)) + run + struct.pack(">Q", int(round_no))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared_secret)


def mask_stream(seed: bytes, shapes: Iterable[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """The pseudorandom uint64 tensors for one pair: ``Generator(PCG64(seed))`` drawn with
    ``integers(0, 2**64, dtype=uint64)`` tensor by tensor in the given order."""
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "big")))
    return {name: rng.integers(0, 2**64, size=shape, dtype=np.uint64) for name, shape in shapes}


def mask(
    q: Mapping[str, np.ndarray], me: str, peers: Mapping[str, bytes], run_id: str, round_no: int
) -> dict[str, np.ndarray]:
    """Add the pairwise masks to a quantized state (mod 2^64).

    ``peers``: peer site id → shared secret with that peer (:meth:`SiteKeys.shared`).  For each peer the
    stream (:func:`mask_stream` of :func:`pair_seed`, tensors in *sorted key order* so every site draws
    identically) is added if ``me < peer_id`` and subtracted otherwise; the masks cancel in the sum of all
    sites' masked vectors.
    """
    for name, array in q.items():
        if array.dtype != np.uint64:
            raise ValueError(f"tensor {name!r}: mask expects a quantized (uint64) state, got {array.dtype}")
    if me in peers:
        raise ValueError(f"site {me!r} cannot be its own peer")
    out = {name: np.array(array, dtype=np.uint64, copy=True) for name, array in q.items()}
    shapes = [(name, tuple(q[name].shape)) for name in sorted(q)]
    for peer_id, secret in peers.items():
        stream = mask_stream(pair_seed(secret, run_id, round_no), shapes)
        for name, noise in stream.items():
            if me < peer_id:
                np.add(out[name], noise, out=out[name])
            else:
                np.subtract(out[name], noise, out=out[name])
    return out


def unmask_sum(masked: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Plain sum mod 2^64 of all sites' masked vectors: the pairwise masks cancel, leaving Σ quantize(x)."""
    if not masked:
        raise ValueError("unmask_sum needs at least one masked state")
    first = masked[0]
    for i, m in enumerate(masked):
        check_compatible(first, m, what=f"masked state 0 and masked state {i}")
        for name, array in m.items():
            if array.dtype != np.uint64:
                raise ValueError(f"masked state {i}: tensor {name!r} is {array.dtype}, expected uint64")
    out = {name: np.array(array, dtype=np.uint64, copy=True) for name, array in first.items()}
    for m in masked[1:]:
        for name in out:
            np.add(out[name], m[name], out=out[name])
    return out


def secure_average(
    masked: Sequence[Mapping[str, np.ndarray]], total_weight: float, scale_bits: int = SCALE_BITS
) -> State:
    """Hub side of secure FedAvg: sites sent ``mask(quantize(n_i · Δ_i))``; returns ``Σ n_i Δ_i / Σ n_i``
    as float32."""
    if not (math.isfinite(total_weight) and total_weight > 0):
        raise ValueError(f"total weight must be > 0, got {total_weight!r}")
    total = dequantize(unmask_sum(masked), scale_bits)
    return {k: (v / total_weight).astype(np.float32) for k, v in total.items()}


class SiteKeys:
    """A site's X25519 key pair (RFC 7748) for agreeing pairwise masking secrets with the other sites."""

    def __init__(self, private_key: X25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def generate(cls) -> SiteKeys:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> SiteKeys:
        """Load an unencrypted PKCS#8 PEM X25519 private key; :class:`ValueError` otherwise."""
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, X25519PrivateKey):
            raise ValueError(f"expected an X25519 private key, got {type(key).__name__}")
        return cls(key)

    def to_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def public_b64(self) -> str:
        """The raw 32-byte public key, standard base64."""
        raw = self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode("ascii")

    def shared(self, peer_public_b64: str) -> bytes:
        """X25519 shared secret with a peer (feed it to :func:`pair_seed`); :class:`ValueError` on a
        malformed or low-order public key."""
        try:
            raw = base64.b64decode(peer_public_b64.replace("-", "+").replace("_", "/"), validate=True)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"peer public key is not base64: {exc}") from None
        if len(raw) != 32:
            raise ValueError(f"peer public key must be 32 bytes, got {len(raw)}")
        return self._key.exchange(X25519PublicKey.from_public_bytes(raw))


def masked_update(
    delta: State,
    weight: float,
    me: str,
    keys: SiteKeys,
    peer_publics: Mapping[str, str],
    run_id: str,
    round_no: int,
    scale_bits: int = SCALE_BITS,
) -> dict[str, np.ndarray]:
    """Site side of secure FedAvg: ``mask(quantize(weight · delta))`` with secrets agreed with every
    peer's public key (``peer_publics``: site id → :meth:`SiteKeys.public_b64`; ``me`` is skipped)."""
    if not math.isfinite(weight):
        raise ValueError(f"weight must be finite, got {weight!r}")
    peers = {pid: keys.shared(pub) for pid, pub in peer_publics.items() if pid != me}
    weighted = {k: np.asarray(v, dtype=np.float64) * float(weight) for k, v in delta.items()}
    return mask(quantize(weighted, scale_bits), me, peers, run_id, round_no)
