"""Model cards as data (JSON): what a model is, which series it takes, how pixels are prepared, what its
outputs mean, how results are written and for which purpose it may run.

:func:`parse_card` validates a card and raises :class:`CardError` naming the offending field
(``"selector.min_slices: expected an integer"``).  Cards are plain dicts on the wire and in the store;
:class:`ModelCard` is the validated, typed view the dispatcher uses.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PURPOSE_TREATMENT = "treatment"
#: DUO research purposes a model may be registered for (the consent gate decides per patient).
DUO_PURPOSES = {"DUO:0000006", "DUO:0000007", "DUO:0000042", "DUO:0000005", "DUO:0000004"}
ENCODINGS = {"sr", "seg", "fhir"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CardError(ValueError):
    """An invalid model card; ``field`` names the offending field (dotted path)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class Code:
    scheme: str
    value: str
    meaning: str


@dataclass(frozen=True)
class Selector:
    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    series_description: str | None = None
    sop_class: tuple[str, ...] = ()
    min_slices: int = 1
    max_slices: int | None = None

    def matches(self, series: dict[str, Any], sop_classes: set[str] | None = None) -> bool:
        """``series``: a dcm_series row (modality, body_part, series_description, num_instances)."""
        if self.modality and (series.get("modality") or "").upper() not in self.modality:
            return False
        if self.body_part and (series.get("body_part") or "").upper() not in self.body_part:
            return False
        if self.series_description and not re.search(
            self.series_description, series.get("series_description") or "", re.IGNORECASE
        ):
            return False
        if self.sop_class and sop_classes is not None and not (sop_classes & set(self.sop_class)):
            return False
        n = int(series.get("num_instances") or 0)
        if n < self.min_slices or (self.max_slices is not None and n > self.max_slices):
            return False
        return True


@dataclass(frozen=True)
class Preprocess:
    hu_rescale: bool = True
    window_center: float | None = None
    window_width: float | None = None
    resize: tuple[int, int] = (64, 64)
    channels: int = 1  # channel stacking: the (windowed) slice repeated/stacked into C channels


@dataclass(frozen=True)
class Output:
    kind: str  # "classification" | "segmentation"
    tensor: str
    classes: tuple[tuple[str, Code], ...] = ()  # classification: (label, finding code) per class index
    regions: tuple[tuple[str, Code, Code], ...] = ()  # segmentation: (label, category, type)
    threshold: float = 0.5


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    triton_model: str
    triton_version: str
    input_tensor: str
    selector: Selector
    preprocess: Preprocess
    outputs: tuple[Output, ...]
    encodings: tuple[str, ...]
    purpose: str
    provenance: dict[str, Any]
    description: str = ""
    auto_trigger: bool = True
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    def to_json(self) -> dict[str, Any]:
        return self.raw


def _get(
    d: dict[Any, Any],
    name: str,
    path: str,
    types: type | tuple[Any, ...],
    *,
    required: bool = True,
    default: Any = None,
) -> Any:
    if name not in d or d[name] is None:
        if required:
            raise CardError(f"{path}{name}", "is required")
        return default
    v = d[name]
    if types is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if isinstance(v, bool) and types is not bool and (types is int or types is float):
        raise CardError(f"{path}{name}", f"expected {getattr(types, '__name__', types)}, got a boolean")
    if not isinstance(v, types):
        tn = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise CardError(f"{path}{name}", f"expected {tn}, got {type(v).__name__}")
    return v


def _str_list(d: dict[Any, Any], name: str, path: str, *, upper: bool = False) -> tuple[str, ...]:
    v = d.get(name, [])
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise CardError(f"{path}{name}", "expected a list of non-empty strings")
    return tuple(x.upper() if upper else x for x in v)


def _code(d: Any, path: str) -> Code:
    if not isinstance(d, dict):
        raise CardError(path, "expected an object {scheme, value, meaning}")
    out = []
    for k in ("scheme", "value", "meaning"):
        v = d.get(k)
        if not isinstance(v, str) or not v:
            raise CardError(f"{path}.{k}", "expected a non-empty string")
        out.append(v)
    if out[0] not in {"SCT", "DCM", "LN", "99FEDGATE"}:
        raise CardError(f"{path}.scheme", f"unknown coding scheme {out[0]!r} (SCT, DCM, LN or 99FEDGATE)")
    return Code(*out)


def parse_card(doc: Any) -> ModelCard:
    """Validate a card document; raises :class:`CardError` naming the field."""
    if not isinstance(doc, dict):
        raise CardError("card", "expected a JSON object")
    name = _get(doc, "name", "", str)
    if not NAME_RE.match(name):
        raise CardError("name", "letters, digits, '_', '.', '-' (at most 64)")
    version = _get(doc, "version", "", str)
    if not NAME_RE.match(version):
        raise CardError("version", "letters, digits, '_', '.', '-' (at most 64)")
    tr = _get(doc, "triton", "", dict)
    triton_model = _get(tr, "model", "triton.", str)
    triton_version = str(_get(tr, "version", "triton.", (str, int), required=False, default="1"))
    input_tensor = _get(tr, "input", "triton.", str, required=False, default="INPUT__0")

    sel = _get(doc, "selector", "", dict)
    desc = _get(sel, "series_description", "selector.", str, required=False)
    if desc is not None:
        try:
            re.compile(desc)
        except re.error as e:
            raise CardError("selector.series_description", f"not a valid regular expression ({e})") from None
    min_s = _get(sel, "min_slices", "selector.", int, required=False, default=1)
    max_s = _get(sel, "max_slices", "selector.", int, required=False)
    if min_s < 1:
        raise CardError("selector.min_slices", "must be ≥ 1")
    if max_s is not None and max_s < min_s:
        raise CardError("selector.max_slices", "must be ≥ min_slices")
    selector = Selector(
        _str_list(sel, "modality", "selector.", upper=True),
        _str_list(sel, "body_part", "selector.", upper=True),
        desc,
        _str_list(sel, "sop_class", "selector."),
        min_s,
        max_s,
    )

    pre = _get(doc, "preprocess", "", dict, required=False, default={})
    wc = _get(pre, "window_center", "preprocess.", float, required=False)
    ww = _get(pre, "window_width", "preprocess.", float, required=False)
    if (wc is None) != (ww is None):
        raise CardError(
            "preprocess.window_width" if ww is None else "preprocess.window_center",
            "window_center and window_width go together",
        )
    if ww is not None and ww <= 0:
        raise CardError("preprocess.window_width", "must be > 0")
    size = _get(pre, "resize", "preprocess.", list, required=False, default=[64, 64])
    if len(size) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 4096 for x in size):
        raise CardError("preprocess.resize", "expected [height, width] with 1..4096")
    ch = _get(pre, "channels", "preprocess.", int, required=False, default=1)
    if ch not in (1, 3):
        raise CardError("preprocess.channels", "1 or 3")
    preprocess = Preprocess(
        bool(_get(pre, "hu_rescale", "preprocess.", bool, required=False, default=True)), wc, ww, (size[0], size[1]), ch
    )

    outs = _get(doc, "outputs", "", list)
    if not outs:
        raise CardError("outputs", "at least one output")
    outputs = []
    for i, o in enumerate(outs):
        p = f"outputs[{i}]."
        if not isinstance(o, dict):
            raise CardError(f"outputs[{i}]", "expected an object")
        kind = _get(o, "kind", p, str)
        if kind not in ("classification", "segmentation"):
            raise CardError(f"{p}kind", "'classification' or 'segmentation'")
        tensor = _get(o, "tensor", p, str)
        thr = _get(o, "threshold", p, float, required=False, default=0.5)
        if not 0.0 <= thr <= 1.0:
            raise CardError(f"{p}threshold", "must be within [0, 1]")
        if kind == "classification":
            cls = _get(o, "classes", p, list)
            if len(cls) < 2:
                raise CardError(f"{p}classes", "at least two classes")
            classes = []
            for j, c in enumerate(cls):
                if not isinstance(c, dict):
                    raise CardError(f"{p}classes[{j}]", "expected an object {label, code}")
                classes.append(
                    (_get(c, "label", f"{p}classes[{j}].", str), _code(c.get("code"), f"{p}classes[{j}].code"))
                )
            outputs.append(Output(kind, tensor, classes=tuple(classes), threshold=thr))
        else:
            regs = _get(o, "regions", p, list)
            if not regs:
                raise CardError(f"{p}regions", "at least one region")
            regions = []
            for j, r in enumerate(regs):
                q = f"{p}regions[{j}]"
                if not isinstance(r, dict):
                    raise CardError(q, "expected an object {label, category, type}")
                regions.append(
                    (
                        _get(r, "label", q + ".", str),
                        _code(r.get("category"), q + ".category"),
                        _code(r.get("type"), q + ".type"),
                    )
                )
            outputs.append(Output(kind, tensor, regions=tuple(regions), threshold=thr))
    enc = _str_list(doc, "encodings", "")
    if not enc:
        raise CardError("encodings", "at least one of sr, seg, fhir")
    for encoding in enc:
        if encoding not in ENCODINGS:
            raise CardError("encodings", f"unknown encoding {encoding!r} (sr, seg, fhir)")
    if "seg" in enc and not any(o.kind == "segmentation" for o in outputs):
        raise CardError("encodings", "'seg' needs a segmentation output")
    purpose = _get(doc, "purpose", "", str)
    if purpose != PURPOSE_TREATMENT and purpose not in DUO_PURPOSES:
        raise CardError("purpose", f"'treatment' or a DUO research purpose ({', '.join(sorted(DUO_PURPOSES))})")
    prov = _get(doc, "provenance", "", dict)
    _get(prov, "training_data", "provenance.", str)
    _get(prov, "lineage_id", "provenance.", str)
    return ModelCard(
        name,
        version,
        triton_model,
        triton_version,
        input_tensor,
        selector,
        preprocess,
        tuple(outputs),
        enc,
        purpose,
        prov,
        _get(doc, "description", "", str, required=False, default=""),
        bool(_get(doc, "auto_trigger", "", bool, required=False, default=True)),
        raw=doc,
    )


def load_card(path: Path) -> ModelCard:
    try:
        doc = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CardError("card", f"not JSON ({e.msg} at line {e.lineno})") from None
    return parse_card(doc)


SHIPPED_CARDS = Path(__file__).with_name("cards")


def shipped_cards() -> list[ModelCard]:
    return [load_card(p) for p in sorted(SHIPPED_CARDS.glob("*.json"))]


__all__ = [
    "CardError",
    "Code",
    "ModelCard",
    "Output",
    "Preprocess",
    "Selector",
    "load_card",
    "parse_card",
    "shipped_cards",
    "asdict",
]
