"""Pixel-level work for WADO-RS (runs in worker threads): transcoding between uncompressed transfer
syntaxes, frame extraction, rendering to JPEG/PNG with windowing and viewport, bulk data values.

Compressed pixel data (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE) is decoded by
:func:`decompressed` with pydicom's decoders and the pylibjpeg plugins (``pylibjpeg-libjpeg``,
``pylibjpeg-openjpeg``, ``pylibjpeg-rle``); :func:`frames_as` serves frames as stored, decoded, or
re-encoded for the media type a client accepts (PS3.18 §8.7)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import UID

from mappings.dicom.negotiate import DICOM, FRAME_MEDIA, J2K_LOSSLESS, JPEG_BASELINE, OCTET, RLE, Want, frame_media_of
from mappings.dicom.negotiate import EXPLICIT_LE as _ELE
from mappings.dicom.transcode import (  # noqa: F401
    BIG_ENDIAN,
    DEFLATED_LE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    NATIVE,
    TranscodeError,
    native_pixels_le,
    transcode_native,
)

#: the transfer syntaxes WADO-RS transcodes between (every uncompressed one, deflate included)
UNCOMPRESSED = set(NATIVE)


class PixelError(ValueError):
    """kind: 'range' (no such frame/attribute → 404), 'unsupported' (→ 406), 'invalid' (→ 400)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def can_decode(ts: str) -> bool:
    """Whether pixel data stored in ``ts`` can be decoded here (uncompressed, or a decoder plugin is installed)."""
    uid = UID(ts)
    if not uid.is_compressed:
        return True
    from pydicom.pixels.decoders.base import get_decoder

    try:
        return get_decoder(uid).is_available
    except NotImplementedError:
        return False


#: transfer syntaxes :func:`frames_as` and :func:`transcode` can encode pixel data to (besides uncompressed)
ENCODABLE = frozenset({RLE, J2K_LOSSLESS})


def decompressed(ds: Dataset) -> Dataset:
    """``ds`` with compressed pixel data decoded in place to native Explicit VR Little Endian (pydicom's
    ``Dataset.decompress``: colour YBR JPEG frames become RGB); uncompressed data sets are returned as is."""
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is None or not UID(ts).is_compressed or "PixelData" not in ds:
        return ds
    try:
        ds.decompress()
    except (NotImplementedError, RuntimeError, ValueError, AttributeError, KeyError) as exc:
        raise PixelError("unsupported", f"cannot decode pixel data stored as {UID(ts).name}: {exc}") from None
    return ds


def _compressed(ds: Dataset, target: str) -> Dataset:
    """``ds`` (already decoded) re-encoded in ``target`` (RLE Lossless or JPEG 2000 lossless)."""
    try:
        ds.compress(target)
    except (NotImplementedError, RuntimeError, ValueError, AttributeError) as exc:
        raise PixelError("unsupported", f"cannot encode pixel data as {UID(target).name}: {exc}") from None
    return ds


def transcode(path: Path, target: str) -> bytes:
    """The instance re-encoded in another transfer syntax (Part 10 file bytes): between the native syntaxes
    (big endian and deflate included) by :mod:`mappings.dicom.transcode`; to RLE / JPEG 2000 lossless, or from
    a compressed syntax, through pydicom's codecs (compressed pixel data is decoded first)."""
    if target not in ENCODABLE:
        stored = str(dcmread(path, stop_before_pixels=True).file_meta.get("TransferSyntaxUID") or "")
        if not UID(stored).is_compressed:
            try:
                return transcode_native(str(path), target)
            except TranscodeError as exc:
                raise PixelError("unsupported", str(exc)) from None
    ds = dcmread(path)
    if UID(str(ds.file_meta.TransferSyntaxUID)).is_compressed or target in ENCODABLE:
        decompressed(ds)
    if target in ENCODABLE:
        _compressed(ds, target)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()
    buf = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = UID(target)
    ds.save_as(buf, implicit_vr=target == IMPLICIT_LE, little_endian=target != BIG_ENDIAN, enforce_file_format=True)
    return buf.getvalue()


def native_frame_bits(rows: int, cols: int, spp: int, bits: int, photometric: str) -> int:
    """Bits of one natively encoded frame (PS3.5 §8.1.1; YBR_FULL_422 holds 2 values per pixel: two Y
    share one Cb and one Cr — PS3.3 C.7.6.3.1.2)."""
    if photometric.strip().upper() == "YBR_FULL_422" and spp == 3:
        return rows * cols * 2 * bits
    return rows * cols * spp * bits


def _number(ds: Dataset, keyword: str, default: int) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise PixelError("invalid", f"{keyword} {str(value)[:32]!r} is not a number") from None


def _frame_count(ds: Dataset) -> int:
    n = _number(ds, "NumberOfFrames", 1)
    if n < 1:
        raise PixelError("invalid", f"NumberOfFrames {n} is not a positive number")
    return n


def _check_native_length(ds: Dataset, n_frames: int) -> int:
    """The bits of one frame, after checking that the native pixel data holds every frame the header says."""
    rows, cols = _number(ds, "Rows", 0), _number(ds, "Columns", 0)
    spp, bits = _number(ds, "SamplesPerPixel", 1), _number(ds, "BitsAllocated", 8)
    per = native_frame_bits(rows, cols, spp, bits, str(ds.get("PhotometricInterpretation") or ""))
    if per <= 0:
        raise PixelError("invalid", "Rows, Columns, SamplesPerPixel and BitsAllocated describe an empty image")
    need = (per * n_frames + 7) // 8
    have = len(ds.PixelData)
    if have < need:
        raise PixelError(
            "invalid",
            f"the header describes {n_frames} frame(s) of {per // 8 or 1} bytes "
            f"({need} bytes) but the pixel data holds {have} bytes",
        )
    return per


def frames(path: Path, numbers: list[int]) -> list[bytes]:
    ds = dcmread(path)
    n_frames = _check_frames(ds, numbers)
    ts = str(ds.file_meta.TransferSyntaxUID)
    if ts not in UNCOMPRESSED:
        return _stored_frames(ds, n_frames, numbers)
    return _native_frames(ds, numbers)


def _check_frames(ds: Dataset, numbers: list[int]) -> int:
    if "PixelData" not in ds:
        raise PixelError("range", "the instance has no pixel data")
    n_frames = _frame_count(ds)
    bad = [n for n in numbers if n > n_frames]
    if bad:
        raise PixelError("range", f"frame(s) {bad} beyond NumberOfFrames {n_frames}")
    return n_frames


def _stored_frames(ds: Dataset, n_frames: int, numbers: list[int]) -> list[bytes]:
    """The requested frames of encapsulated pixel data, as stored."""
    try:
        encoded = []
        for frame in generate_frames(ds.PixelData, number_of_frames=n_frames):
            encoded.append(frame)
            if len(encoded) >= max(numbers):
                break
    except (ValueError, TypeError, EOFError, KeyError) as exc:
        raise PixelError(
            "unsupported", f"the encapsulated pixel data cannot be split into frames ({type(exc).__name__})"
        ) from None
    if len(encoded) < max(numbers):
        raise PixelError("range", f"the pixel data holds {len(encoded)} frame(s)")
    return [encoded[n - 1] for n in numbers]


def _jpeg_frames(ds: Dataset, numbers: list[int]) -> list[bytes] | None:
    """8-bit frames encoded as JPEG baseline by Pillow (None where baseline cannot hold the pixels)."""
    spp = int(ds.get("SamplesPerPixel") or 1)
    if int(ds.BitsAllocated) != 8 or spp not in (1, 3) or int(ds.get("PixelRepresentation") or 0):
        return None
    decompressed(ds)
    arr = ds.pixel_array
    n_frames = int(ds.get("NumberOfFrames") or 1)
    photometric = str(ds.get("PhotometricInterpretation") or "")
    if spp == 3 and photometric != "RGB":
        return None
    out = []
    for n in numbers:
        frame = arr[n - 1] if n_frames > 1 else arr
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8), "RGB" if spp == 3 else "L").save(
            buf, "JPEG", quality=95
        )
        out.append(buf.getvalue())
    return out


def frames_as(path: Path, numbers: list[int], wants: list[Want]) -> tuple[Want, str, str, list[bytes]]:
    """Frames in the first representation of ``wants`` that can be produced: as stored, decoded to native
    (``application/octet-stream``, Explicit VR Little Endian) or encoded (JPEG baseline from 8-bit pixels,
    RLE, JPEG 2000 lossless).  Returns (the want served, part media type, transfer syntax, frames); raises
    PixelError 'unsupported' (→ 406) when none can be."""
    ds = dcmread(path)
    n_frames = _check_frames(ds, numbers)
    stored = str(ds.file_meta.TransferSyntaxUID)
    compressed = stored not in UNCOMPRESSED
    stored_media = frame_media_of(stored) if compressed else OCTET
    for w in wants:
        if not w.multipart and len(numbers) > 1:
            continue  # a single-part response holds one frame
        media = OCTET if w.media in ("*/*", DICOM, "application/*") else w.media
        if media == "image/*":
            if compressed and stored_media != OCTET and w.ts in (None, "*", stored):
                return w, stored_media, stored, _stored_frames(ds, n_frames, numbers)
            continue
        allowed = FRAME_MEDIA.get(media)
        if allowed is None:
            continue
        ts = w.ts or allowed[0]
        if ts == "*" or ts == stored:
            if media == OCTET and ts == "*" or stored in allowed:
                if not compressed:
                    return w, media, stored, _native_frames(ds, numbers)
                return w, media, stored, _stored_frames(ds, n_frames, numbers)
            continue
        if ts not in allowed:
            continue
        if ts == _ELE:
            if not can_decode(stored):
                continue
            return w, media, ts, _native_frames(decompressed(ds), numbers)
        if ts == JPEG_BASELINE and can_decode(stored):
            jpeg = _jpeg_frames(ds, numbers)
            if jpeg is not None:
                return w, media, ts, jpeg
            continue
        if ts in ENCODABLE and can_decode(stored):
            _compressed(decompressed(ds), ts)
            return w, media, ts, _stored_frames(ds, n_frames, numbers)
    raise PixelError(
        "unsupported",
        f"frames stored as {UID(stored).name} cannot be sent in any accepted "
        "representation (transfer-syntax=* sends them as stored)",
    )


def _native_frames(ds: Dataset, numbers: list[int]) -> list[bytes]:
    """The requested frames of native pixel data, little endian (big-endian words swapped), after checking
    the pixel data holds every frame the header describes."""
    per = _check_native_length(ds, _frame_count(ds))
    data = native_pixels_le(ds)
    if per % 8:  # bit-packed (BitsAllocated 1), frames not on byte boundaries
        bitarr = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
        return [np.packbits(bitarr[(n - 1) * per : n * per], bitorder="little").tobytes() for n in numbers]
    per //= 8
    return [bytes(data[(n - 1) * per : n * per]) for n in numbers]


def _window(arr: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    if function == "sigmoid":
        out = 255.0 / (1 + np.exp(-4 * (arr - center) / width))
    elif function == "linear_exact":
        out = (arr - (center - width / 2)) / width * 255.0
    else:  # PS3.3 C.11.2.1.2.1
        out = ((arr - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(out, 0, 255).astype(np.uint8)


def _first_float(ds: Dataset, keyword: str) -> float | None:
    """The first value of a (possibly multi-valued) numeric attribute; None when absent or not a number."""
    value = ds.get(keyword)
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")


def render(path: Path, frame: int, fmt: str, opts: dict[Any, Any]) -> bytes:
    """A frame rendered to JPEG/PNG. Whatever the instance holds, the answer is an image or a PixelError
    (404/406/400 with a reason): value multiplicities the standard allows (WindowCenter/Width, Rescale)
    are read, a missing SamplesPerPixel defaults from the photometric interpretation, a NumberOfFrames
    that the pixel data does not hold is a 400, a frame that cannot be decoded a 406."""
    try:
        return _render(path, frame, fmt, opts)
    except PixelError:
        raise
    except MemoryError:
        raise PixelError("invalid", "the image is too large to render") from None
    except Exception as exc:  # a stored instance's odd pixel description: 406, never a 500
        raise PixelError("unsupported", f"the image cannot be rendered ({_plain(exc)})") from None


def _plain(exc: BaseException) -> str:
    """A short cause for a render failure, without quoting values."""
    return {
        "NotImplementedError": "no decoder for its transfer syntax",
        "RuntimeError": "its pixel data could not be decoded",
        "AttributeError": "an attribute the pixel description needs is missing",
        "ValueError": "its pixel description does not fit its pixel data",
        "TypeError": "its pixel description does not fit its pixel data",
    }.get(type(exc).__name__, "its pixel data could not be decoded")


def _render(path: Path, frame: int, fmt: str, opts: dict[Any, Any]) -> bytes:
    ds = dcmread(path)
    if "PixelData" not in ds:
        raise PixelError("range", "the instance has no pixel data")
    n_frames = _frame_count(ds)
    if frame > n_frames:
        raise PixelError("range", f"frame {frame} beyond NumberOfFrames {n_frames}")
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    if ds.get("SamplesPerPixel") in (None, ""):  # Type 1, yet missing in the wild: implied by the photometric
        ds.SamplesPerPixel = 3 if photometric in COLOR else 1
    ts = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    if ts in NATIVE:
        _check_native_length(ds, n_frames)
    try:
        ds.pixel_array_options(index=frame - 1 if n_frames > 1 else None)
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError, ValueError) as exc:
        raise PixelError("unsupported", f"cannot decode pixel data: {_plain(exc)}") from None
    if arr.ndim == 3 and arr.shape[-1] != 3 and n_frames > 1:  # (a decoder that gave every frame)
        arr = arr[min(frame - 1, arr.shape[0] - 1)]
    if arr.ndim == 4:
        arr = arr[min(frame - 1, arr.shape[0] - 1)]
    if photometric == "PALETTE COLOR" and arr.ndim == 2:
        try:
            from pydicom.pixels.processing import apply_color_lut

            arr = apply_color_lut(arr, ds)
        except Exception:  # no usable palette: shown as grey levels
            pass
    if arr.ndim == 3 and arr.shape[-1] == 3:
        rgb = arr.astype(np.float64)
        top = float(2 ** int(_first_float(ds, "BitsStored") or 8) - 1) if arr.dtype != np.uint8 else 255.0
        if photometric == "PALETTE COLOR":
            top = 65535.0 if arr.dtype != np.uint8 else 255.0
        img = Image.fromarray(np.clip(rgb / max(top, 1.0) * 255.0, 0, 255).astype(np.uint8), "RGB")
    elif arr.ndim == 2:
        values = arr.astype(np.float64) * (_first_float(ds, "RescaleSlope") or 1.0) + (
            _first_float(ds, "RescaleIntercept") or 0.0
        )
        center = _first_float(ds, "WindowCenter")
        width = _first_float(ds, "WindowWidth")
        if "window" in opts:
            center, width, function = opts["window"]
        elif center is not None and width is not None and width > 0:
            function = "linear"
        else:
            lo, hi = float(values.min()), float(values.max())
            center, width, function = (lo + hi) / 2, max(hi - lo, 1.0), "linear_exact"
        out = _window(values, center, max(width, 1.0), function)
        if photometric == "MONOCHROME1":
            out = 255 - out
        img = Image.fromarray(np.ascontiguousarray(out), "L")
    else:
        raise PixelError("unsupported", f"pixel data of shape {tuple(arr.shape)} cannot be shown as an image")
    if "viewport" in opts:
        vw, vh = opts["viewport"]  # scale to fit, keeping the aspect ratio (PS3.18 §8.3.5.1.3)
        scale = min(vw / img.width, vh / img.height)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BILINEAR
        )
    buf = io.BytesIO()
    if fmt == "image/png":
        img.save(buf, "PNG")
    else:
        img.save(buf, "JPEG", quality=opts.get("quality", 90))
    return buf.getvalue()


def bulk_value(path: Path, tag_text: str) -> bytes:
    try:
        tag = Tag(int(tag_text, 16))
    except ValueError:
        raise PixelError("invalid", f"{tag_text!r} is not an 8-hex-digit tag") from None
    ds = dcmread(path)
    if tag not in ds:
        raise PixelError("range", f"attribute {tag_text} is not in the instance")
    value = ds[tag].value
    if not isinstance(value, (bytes, bytearray)):
        raise PixelError("range", f"attribute {tag_text} is not bulk data")
    return bytes(value)
