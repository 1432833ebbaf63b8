"""An independent, plain-Python evaluator of cohort definitions over generated rows (test oracle).

It shares no code with ``gateway.store.cohort``: it walks the JSON document itself and the row
dicts produced by :func:`gateway.services.federation_synth.generate`.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
from collections import defaultdict


def _days(iso: str) -> int:
    return dt.date.fromisoformat(iso[:10]).toordinal()


def _da(da: str) -> int:
    return dt.date(int(da[:4]), int(da[4:6]), int(da[6:8])).toordinal()


def _match(value, pattern: str) -> bool:
    return value is not None and fnmatch.fnmatchcase(str(value).lower(), pattern.lower())


def age_on(birth: str, at: dt.date) -> int:
    b = dt.date.fromisoformat(birth[:10])
    return at.year - b.year - ((at.month, at.day) < (b.month, b.day))


class Oracle:
    def __init__(self, rows: dict[str, list[dict]], expand=None, today: dt.date | None = None) -> None:
        self.rows = rows
        self.expand = expand
        self.today = today or dt.date.today()
        self.patients = {p["patient_id"]: p for p in rows["cm_patient"]}
        self.by_pid: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
        for table in ("cm_condition", "cm_observation", "cm_procedure", "dcm_study", "dcm_series",
                      "dcm_seg_segment", "dcm_sr_item"):
            for r in rows[table]:
                self.by_pid[r["patient_id"]][table].append(r)
        self.study = {s["study_uid"]: s for s in rows["dcm_study"]}
        self.ids: dict[str, dict] = {}

    def cohort(self, doc: dict, allowed_profiles: set[str] | None = None) -> set[str]:
        self.ids = {}
        self._collect_ids(doc)
        out = set()
        for pid, p in self.patients.items():
            if allowed_profiles is not None and p["consent_profile"] not in allowed_profiles:
                continue
            if self.holds(doc, pid):
                out.add(pid)
        return out

    def _collect_ids(self, doc):
        if isinstance(doc, dict):
            if "id" in doc:
                self.ids[doc["id"]] = doc
            for k, v in doc.items():
                if k in ("all", "any"):
                    for c in v:
                        self._collect_ids(c)
                elif k == "not":
                    self._collect_ids(v)

    def holds(self, doc: dict, pid: str) -> bool:
        kind = next(k for k in doc if k != "id")
        body = doc[kind]
        p = self.patients[pid]
        if kind == "all":
            return all(self.holds(c, pid) for c in body)
        if kind == "any":
            return any(self.holds(c, pid) for c in body)
        if kind == "not":
            return not self.holds(body, pid)
        if kind == "sex":
            return p["sex"] in ([body] if isinstance(body, str) else body)
        if kind == "birth_year":
            y = p["birth_year"]
            return (body.get("min") is None or y >= body["min"]) and (body.get("max") is None or y <= body["max"])
        if kind == "age" and body.get("at") != "study":
            a = age_on(p["birth_date"], dt.date.fromisoformat(body["at"]) if body.get("at") else self.today)
            return (body.get("min") is None or a >= body["min"]) and (body.get("max") is None or a <= body["max"])
        return bool(self.events(kind, body, pid))

    def events(self, kind: str, body: dict, pid: str) -> list[int | None]:
        """Day numbers of the matching events of a leaf for one patient (None where undated)."""
        rows = self.by_pid.get(pid, {})
        days: list[int | None] = []
        if kind in ("condition", "procedure", "observation"):
            table, datecol = {"condition": ("cm_condition", "onset"), "procedure": ("cm_procedure", "performed"),
                              "observation": ("cm_observation", "effective")}[kind]
            codes = body.get("code")
            codes = [codes] if isinstance(codes, str) else codes
            wanted = set()
            for c in codes or ():
                system, _, code = c.rpartition("|")
                wanted.add((system or None, code))
                if body.get("descendants") and self.expand:
                    wanted |= {(system or None, d) for d in self.expand(system or None, code)}
            for r in rows.get(table, ()):
                if codes and not any(code == r["code"] and (system is None or system == r["system"])
                                     for system, code in wanted):
                    continue
                v = body.get("value")
                if v and (r.get("value_num") is None or (v.get("min") is not None and r["value_num"] < v["min"])
                          or (v.get("max") is not None and r["value_num"] > v["max"])):
                    continue
                if body.get("unit") and r.get("unit") != body["unit"]:
                    continue
                d = body.get("date")
                if d and ((d.get("from") and r[datecol][:10] < d["from"]) or (d.get("to") and r[datecol][:10] > d["to"])):
                    continue
                days.append(_days(r[datecol]))
        elif kind == "imaging":
            for se in rows.get("dcm_series", ()):
                st = self.study[se["study_uid"]]
                mods = body.get("modality")
                if mods and se["modality"].upper() not in [m.upper() for m in ([mods] if isinstance(mods, str) else mods)]:
                    continue
                bps = body.get("body_part")
                if bps and (se["body_part"] or "").upper() not in [b.upper() for b in ([bps] if isinstance(bps, str) else bps)]:
                    continue
                if any(body.get(k) and not _match(se[c], body[k]) for k, c in (
                        ("manufacturer", "manufacturer"), ("model", "model_name"), ("protocol", "protocol_name"),
                        ("series_description", "series_description"))):
                    continue
                if body.get("study_description") and not _match(st["study_description"], body["study_description"]):
                    continue
                t = body.get("slice_thickness")
                if t and ((t.get("min") is not None and se["slice_thickness"] < t["min"])
                          or (t.get("max") is not None and se["slice_thickness"] > t["max"])):
                    continue
                d = body.get("study_date")
                if d and ((d.get("from") and st["study_date"] < d["from"].replace("-", ""))
                          or (d.get("to") and st["study_date"] > d["to"].replace("-", ""))):
                    continue
                days.append(_da(st["study_date"]))
        elif kind == "age":  # at study
            p = self.patients[pid]
            for st in rows.get("dcm_study", ()):
                a = (_da(st["study_date"]) - _days(p["birth_date"])) / 365.25
                if (body.get("min") is None or a >= body["min"]) and (body.get("max") is None or a < body["max"] + 1):
                    days.append(_da(st["study_date"]))
        elif kind == "seg":
            by_sop: dict[str, list[dict]] = defaultdict(list)
            for s in rows.get("dcm_seg_segment", ()):
                by_sop[s["sop_uid"]].append(s)
            for sop, segs in by_sop.items():
                if all(any(self._seg_ok(s, want) for s in segs) for want in body["segments"]):
                    days.append(_da(self.study[segs[0]["study_uid"]]["study_date"]))
        elif kind == "sr":
            groups: dict[tuple, list[dict]] = defaultdict(list)
            same = body.get("same", "instance")
            for it in rows.get("dcm_sr_item", ()):
                key = (it["sop_uid"], it["group_item_id"]) if same == "group" else (it["sop_uid"],)
                groups[key].append(it)
            for items in groups.values():
                if all(any(self._item_ok(i, want) for i in items) for want in body["items"]):
                    days.append(None)
        w = body.get("within")
        if w is None or not days:
            return days
        anchors = ([_da(s["study_date"]) for s in rows.get("dcm_study", ())] if w["of"] == "imaging" else
                   self._anchor_days(self.ids[w["of"]], pid))
        keep = []
        for d in days:
            if d is None:
                continue
            if any(a is not None and (w.get("min_days") is None or d - a >= w["min_days"])
                   and (w.get("max_days") is None or d - a <= w["max_days"]) for a in anchors):
                keep.append(d)
        return keep

    def _anchor_days(self, doc: dict, pid: str) -> list[int | None]:
        kind = next(k for k in doc if k != "id")
        return self.events(kind, doc[kind], pid)

    @staticmethod
    def _seg_ok(s: dict, want: dict) -> bool:
        if want.get("label") and not _match(s["label"], want["label"]):
            return False
        if want.get("type"):
            scheme, _, code = want["type"].rpartition("|")
            if s["type_code"] != code or (scheme and s["type_scheme"] != scheme):
                return False
        return True

    @staticmethod
    def _item_ok(i: dict, want: dict) -> bool:
        if want.get("concept"):
            scheme, _, code = want["concept"].rpartition(":")
            if i["concept_code"] != code or (scheme and i["concept_scheme"] != scheme):
                return False
        if want.get("path") and not _match(i["concept_path"], want["path"]):
            return False
        v = want.get("value")
        if v and (i.get("num_value") is None or (v.get("min") is not None and i["num_value"] < v["min"])
                  or (v.get("max") is not None and i["num_value"] > v["max"])):
            return False
        if want.get("unit") and i.get("unit_code") != want["unit"]:
            return False
        if want.get("code"):
            scheme, _, code = want["code"].rpartition("|")
            if i.get("code_value") != code or (scheme and i.get("code_scheme") != scheme):
                return False
        return True


#: Cohorts exercising every part of the language (used by compiler and federation tests).
COHORTS = {
    "women_40_70": {"all": [{"sex": "female"}, {"age": {"min": 40, "max": 70, "at": "2024-06-30"}}]},
    "born_50s": {"birth_year": {"min": 1950, "max": 1959}},
    "diabetes_desc": {"condition": {"code": "http://snomed.info/sct|73211009", "descendants": True}},
    "diabetes_exact": {"condition": {"code": "http://snomed.info/sct|73211009"}},
    "hba1c_high": {"observation": {"code": "http://loinc.org|4548-4", "value": {"min": 7.0}, "unit": "%"}},
    "cardiac_mr_siemens": {"imaging": {"modality": "MR", "body_part": "HEART", "manufacturer": "siemens*"}},
    "thin_ct": {"imaging": {"modality": ["CT"], "slice_thickness": {"max": 1.25},
                            "study_date": {"from": "2015-01-01", "to": "2022-12-31"}}},
    "seg_lv_rv": {"seg": {"segments": [{"label": "left ventricle"}, {"type": "SCT|53085002"}]}},
    "sr_lv_low_ef": {"sr": {"same": "group", "items": [
        {"concept": "DCM:121071", "code": "SCT|87878005"}, {"concept": "LN:10230-1", "value": {"max": 45}}]}},
    "sr_any_low_ef_path": {"sr": {"items": [{"path": "*/LN:10230-1", "value": {"max": 45}, "unit": "%"}]}},
    "hf_before_imaging": {"condition": {"code": "http://snomed.info/sct|84114007",
                                        "within": {"of": "imaging", "min_days": -3650, "max_days": 0}}},
    "a1c_after_dm": {"all": [
        {"id": "dm", "condition": {"code": "http://snomed.info/sct|44054006"}},
        {"observation": {"code": "http://loinc.org|4548-4", "within": {"of": "dm", "min_days": 0, "max_days": 3650}}}]},
    "age_at_study": {"age": {"min": 60, "at": "study"}},
    "any_not": {"any": [{"not": {"imaging": {"modality": "CT"}}}, {"sex": "other"}]},
    "joined": {"all": [
        {"condition": {"code": "http://snomed.info/sct|38341003"}},
        {"imaging": {"modality": "MR", "protocol": "CMR*"}},
        {"sr": {"items": [{"concept": "LN:10230-1", "value": {"max": 60}}]}}]},
}
