"""SR documents → a flat, queryable content-item tree (rows of ``dcm_sr_item``). Pure.

Every content item of the document (PS3.3 C.17.3) becomes one row: its ordinal path (``item_id``
``"1.3.2"``: the root is ``"1"``), parent, depth, relationship, value type, concept name, the concept
path from the root (``"DCM:126000/DCM:126010/DCM:125007"``), and its value by type — NUM (number + UCUM
unit), CODE, TEXT/UIDREF/DATE/TIME/DATETIME/PNAME (text), IMAGE/COMPOSITE (referenced SOP + frame),
and references to segments (ReferencedSegmentNumber). ``group_item_id`` is the item id of the enclosing
TID 1501 Measurement Group (concept DCM:125007) or, failing that, of the top-level CONTAINER below the
root — so a query can require several conditions of the *same* finding.
"""

from __future__ import annotations

from typing import Any

from pydicom import Dataset

MEASUREMENT_GROUP = ("DCM", "125007")


def _code(item: Dataset, keyword: str) -> tuple[str | None, str | None, str | None]:
    seq = item.get(keyword)
    if not seq:
        return None, None, None
    c = seq[0]
    value = c.get("CodeValue") or c.get("LongCodeValue") or c.get("URNCodeValue")
    return (
        str(c.get("CodingSchemeDesignator")) if c.get("CodingSchemeDesignator") else None,
        str(value) if value else None,
        str(c.get("CodeMeaning")) if c.get("CodeMeaning") else None,
    )


def _value(item: Dataset, row: dict[str, Any]) -> None:
    vt = row["value_type"]
    if vt == "NUM":
        mv = item.get("MeasuredValueSequence")
        if mv:
            try:
                row["num_value"] = float(mv[0].NumericValue)
            except (AttributeError, TypeError, ValueError):
                pass
            _, unit, _ = _code(mv[0], "MeasurementUnitsCodeSequence")
            row["unit_code"] = unit
    elif vt == "CODE":
        row["code_scheme"], row["code_value"], row["code_meaning"] = _code(item, "ConceptCodeSequence")
    elif vt in ("TEXT", "UIDREF", "DATE", "TIME", "DATETIME", "PNAME"):
        kw = {
            "TEXT": "TextValue",
            "UIDREF": "UID",
            "DATE": "Date",
            "TIME": "Time",
            "DATETIME": "DateTime",
            "PNAME": "PersonName",
        }[vt]
        v = item.get(kw)
        row["text_value"] = str(v) if v is not None else None
    if vt in ("IMAGE", "COMPOSITE", "WAVEFORM") or "ReferencedSOPSequence" in item:
        ref = item.get("ReferencedSOPSequence")
        if ref:
            r = ref[0]
            row["ref_sop_uid"] = str(r.get("ReferencedSOPInstanceUID")) if r.get("ReferencedSOPInstanceUID") else None
            frames = r.get("ReferencedFrameNumber")
            if frames:
                try:
                    row["ref_frame"] = int(
                        frames[0] if isinstance(frames, (list, tuple)) or getattr(frames, "is_multi", False) else frames
                    )
                except (TypeError, ValueError):
                    pass
            seg = r.get("ReferencedSegmentNumber")
            if seg:
                try:
                    row["ref_segment_number"] = int(seg[0] if getattr(seg, "is_multi", False) else seg)
                except (TypeError, ValueError):
                    pass
    if vt == "SCOORD" or vt == "SCOORD3D":
        # the referenced image of a spatial coordinate is its child IMAGE item; keep the graphic type
        row["text_value"] = str(item.get("GraphicType") or "")


def sr_items(ds: Dataset) -> list[dict[str, Any]]:
    """All content items of an SR document as rows (document order)."""
    rows: list[dict[str, Any]] = []

    def walk(item: Dataset, item_id: str, parent: str | None, depth: int, path: str, group: str | None) -> None:
        scheme, code, meaning = _code(item, "ConceptNameCodeSequence")
        here = f"{scheme}:{code}" if code else "?"
        cpath = f"{path}/{here}" if path else here
        vt = str(item.get("ValueType") or "")
        if (scheme, code) == MEASUREMENT_GROUP or (group is None and depth == 1 and vt == "CONTAINER"):
            group = item_id
        row: dict[str, Any] = {
            "item_id": item_id,
            "parent_item_id": parent,
            "depth": depth,
            "group_item_id": group,
            "relationship": str(item.get("RelationshipType")) if item.get("RelationshipType") else None,
            "value_type": vt or None,
            "concept_scheme": scheme,
            "concept_code": code,
            "concept_meaning": meaning,
            "concept_path": cpath,
            "num_value": None,
            "unit_code": None,
            "code_scheme": None,
            "code_value": None,
            "code_meaning": None,
            "text_value": None,
            "ref_sop_uid": None,
            "ref_frame": None,
            "ref_segment_number": None,
        }
        _value(item, row)
        rows.append(row)
        for n, child in enumerate(item.get("ContentSequence") or (), start=1):
            walk(child, f"{item_id}.{n}", item_id, depth + 1, cpath, group)

    walk(ds, "1", None, 0, "", None)
    return rows
