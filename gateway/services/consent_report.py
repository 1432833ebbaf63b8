"""What a site's consents permit, for its data stewards (issue 28, the console's consent view; docs/ui.md).

* :meth:`ConsentReport.matrix`: research purposes × effective consent profiles → the number of patients
  whose profile permits the purpose (the gate's own evaluator, for a requester with no attested attributes);
* :meth:`ConsentReport.withdrawals`: withdrawn Consents by day;
* :meth:`ConsentReport.decision`: for one patient and one purpose, the evaluator's decision with its reasons.

Every number is computed over the patients the steward's own scope lets them see (``AccessLayer.open``:
the gate decides, the store applies it) and every call is audited.  Stewards are the ``admin`` and ``site``
roles."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.auth import parse_purpose
from gateway.context import Requester
from gateway.errors import BadRequest, Forbidden, NotFound
from gateway.services.audit_codes import Action, Interaction, Outcome
from gateway.store import consent_reads
from gateway.store.access import AccessLayer

STEWARD_ROLES = ("admin", "site")

#: The purposes the matrix shows by default: (label, purpose text as a token's purpose claim takes it).
DEFAULT_PURPOSES: tuple[tuple[str, str], ...] = (
    ("General research (GRU)", "DUO:0000042"),
    ("Health/medical/biomedical (HMB)", "DUO:0000006"),
    ("Disease-specific: cardiovascular", "DUO:0000007 MONDO:0004995"),
    ("Population origins/ancestry (POA)", "DUO:0000011"),
    ("Methods development", "DUO:0000031"),
)

#: DUO shorthand of the permission and modifier codes (DUO.md class hierarchy), for labels only.
SHORTHAND = {
    "DUO:0000004": "NRES", "DUO:0000042": "GRU", "DUO:0000006": "HMB", "DUO:0000007": "DS", "DUO:0000011": "POA",
    "DUO:0000012": "RS", "DUO:0000015": "NMDS", "DUO:0000016": "GSO", "DUO:0000018": "NPUNCU", "DUO:0000019": "PUB",
    "DUO:0000020": "COL", "DUO:0000021": "IRB", "DUO:0000022": "GS", "DUO:0000024": "MOR", "DUO:0000025": "TS",
    "DUO:0000026": "US", "DUO:0000027": "PS", "DUO:0000028": "IS", "DUO:0000029": "RTN", "DUO:0000043": "CC",
    "DUO:0000044": "NPOA", "DUO:0000045": "NPU", "DUO:0000046": "NCU",
}


def profile_label(entries) -> str:
    """"GRU", "DS (MONDO:0004995) + IRB", ... — one line per effective profile (entries joined by " | ")."""
    parts = []
    for e in entries:
        p = e.profile
        text = SHORTHAND.get(p.permission, p.permission)
        if p.diseases:
            text += f" ({', '.join(sorted(p.diseases))})"
        if p.modifiers:
            text += " + " + " + ".join(SHORTHAND.get(m, m) for m in sorted(p.modifiers))
        if e.start or e.end:
            text += f" [{e.start or '…'} to {e.end or '…'}]"
        parts.append(text)
    return " | ".join(parts) or "(empty)"


@dataclass(frozen=True)
class ConsentReport:
    access: AccessLayer
    gate: Any  # ConsentGate: effective_profiles(), explain()

    @staticmethod
    def _check(requester: Requester) -> None:
        if not requester.has_role(*STEWARD_ROLES):
            raise Forbidden("the consent view is for data stewards (role admin or site)")

    async def matrix(self, requester: Requester, purposes: list[tuple[str, str]] | None = None) -> dict:
        """{"purposes": [{label, text}], "profiles": [{key, label, patients, permits: [bool per purpose]}],
        "totals": [patients permitted per purpose], "patients": visible patients, "no_profile": patients
        without an effective profile (nothing permits them)}."""
        acc = await self.access.open(requester)
        self._check(requester)
        wanted = []
        for label, text in purposes or DEFAULT_PURPOSES:
            p = parse_purpose(text)
            if p is None or p.is_treatment:
                raise BadRequest(f"purpose {text!r}: a research purpose (DUO codes and diseases)", expression=["purpose"])
            wanted.append((label, text, p))
        async with acc.read() as conn:
            counts = await consent_reads.patients_per_profile(conn, acc.scope)
        profiles = await self.gate.effective_profiles()
        rows = []
        for key, n in sorted(counts.items(), key=lambda kv: (kv[0] is None, -kv[1])):
            if key is None:
                continue
            entries = profiles.get(key)
            if entries is None:  # a combined or colliding key: never permitted on its own
                permits = [False] * len(wanted)
                label, sources = "(combined or unknown profile)", ""
            else:
                permits = []
                for _, _, p in wanted:
                    decided = self.gate.explain(entries, p.codes, p.diseases, {})
                    permits.append(any(d is not None and d.permitted for _, d in decided))
                label = profile_label(entries)
                sources = ", ".join(sorted({e.source.split(":")[0] or "?" for e in entries}))
            rows.append({"key": key, "label": label, "sources": sources, "patients": n, "permits": permits})
        totals = [sum(r["patients"] for r in rows if r["permits"][i]) for i in range(len(wanted))]
        await acc.record(Action.EXECUTE, Interaction.CONSENT_REPORT, Outcome.SUCCESS, detail=f"matrix {len(rows)} profiles")
        return {"purposes": [{"label": label, "text": text} for label, text, _ in wanted], "profiles": rows,
                "totals": totals, "patients": sum(counts.values()), "no_profile": counts.get(None, 0)}

    async def withdrawals(self, requester: Requester) -> list[dict]:
        """[{"day": "YYYY-MM-DD", "withdrawn": n}] of the Consents of visible patients."""
        acc = await self.access.open(requester)
        self._check(requester)
        async with acc.read() as conn:
            days = await consent_reads.withdrawals_by_day(conn, acc.scope)
        await acc.record(Action.EXECUTE, Interaction.CONSENT_REPORT, Outcome.SUCCESS, detail="withdrawals")
        return [{"day": d, "withdrawn": n} for d, n in days]

    async def decision(self, requester: Requester, patient_id: str | None, purpose_text: str | None) -> dict:
        """The evaluator's decision for one visible patient and one research purpose, entry by entry."""
        acc = await self.access.open(requester)
        self._check(requester)
        if not patient_id or len(patient_id) > 64:
            raise BadRequest("patient: a patient id (1 to 64 characters)", expression=["patient"])
        purpose = parse_purpose(purpose_text)
        if purpose is None or purpose.is_treatment:
            raise BadRequest("purpose: a research purpose, DUO codes and disease CURIEs (e.g. DUO:0000006)",
                             expression=["purpose"])
        async with acc.read() as conn:
            visible, key, consents = await consent_reads.patient_profile(conn, acc.scope, patient_id)
        if not visible:
            await acc.record(Action.READ, Interaction.CONSENT_DECISION, Outcome.MINOR_FAILURE, detail="no such patient")
            raise NotFound(f"patient {patient_id}: not found among the patients you may see")
        entries = (await self.gate.effective_profiles()).get(key, []) if key else []
        explained = self.gate.explain(entries, purpose.codes, purpose.diseases, {}) if entries else []
        items = []
        for e, d in explained:
            items.append({"source": e.source, "start": e.start, "end": e.end, "label": profile_label([e]),
                          "decision": d.decision if d is not None else "not in force",
                          "reasons": list(d.reasons) if d is not None else [f"valid {e.start or '…'} to {e.end or '…'}, not today"]})
        permitted = any(d is not None and d.permitted for _, d in explained)
        if permitted:
            reasons = ["an entry in force permits this purpose (the gate permits when any does)"]
        elif not key:
            reasons = ["no consent in force permits anything for this patient (none given, withdrawn, or opted out)"]
        else:
            reasons = ["no entry in force permits this purpose: the patient is hidden from it (fail closed)"]
        await acc.record(Action.READ, Interaction.CONSENT_DECISION, Outcome.SUCCESS, patients=(patient_id,),
                         detail=f"purpose {purpose.describe()}")
        return {"patient": patient_id, "purpose": purpose.describe(), "decision": "permit" if permitted else "deny",
                "reasons": reasons, "entries": items, "consents": [{"source": s, "status": st} for s, st in consents]}


__all__ = ["DEFAULT_PURPOSES", "STEWARD_ROLES", "ConsentReport", "profile_label"]
