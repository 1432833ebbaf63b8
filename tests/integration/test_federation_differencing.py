"""Issue #19, leak 5: the federation differencing attack on a withdrawn patient.

An analyst compares what a site releases for cohort A with what it releases for "A or X", where the two
cohorts differ only by one withdrawn patient (X = a condition only that patient has).  If any released
value were computed over patients whose consent does not permit the purpose (as ``consent.matching``
was: a count of every patient matching the criteria), the differences over many pairs would average about
1 for the patient's real condition and exactly 0 for a control code.  Here 400 pairs are asked of an
in-process site (seeded population, the engine under test) and the mean difference is 0 for both.
"""

from __future__ import annotations

from gateway.context import Purpose, Requester
from gateway.services.federation import CohortRequest, FederationConfig, SiteService
from gateway.services.federation_synth import DEMO_SITES, generate
from gateway.store.db import Database
from tests.conftest import make_settings
from tests.integration.federation_fixtures import ListAudit, ProfileGate, populate

X = "http://snomed.info/sct|900000001"  # only the withdrawn patient has it
CONTROL = "http://snomed.info/sct|900000002"  # nobody has it
SEXES = ("female", "male", "other", "unknown")


def _released(res: dict) -> list[int]:
    """Every number a site answer releases (suppressed cells as 0)."""
    values = [res["count"], *res["consent"].values()]
    for cells in res["breakdowns"].values():
        values += list(cells.values())
    return [v or 0 for v in values]


async def test_differencing_a_withdrawn_patient_reveals_nothing(tmp_path, db_url):
    rows = generate(DEMO_SITES[0], 150, seed=19)
    victim = rows["cm_patient"][0]
    victim["consent_profile"] = None  # withdrawn: no effective consent profile
    rows["cm_condition"].append({"src_type": "synthetic", "src_id": "Condition/victim-x",
                                 "patient_id": victim["patient_id"], "system": X.split("|")[0],
                                 "code": X.split("|")[1], "display": "rare", "onset": "2020-01-01",
                                 "clinical_status": "active"})
    await populate(db_url, rows)
    settings = make_settings(tmp_path / "site", db_url, site_id="site-a")
    db = Database(db_url)
    try:
        site = SiteService(settings, FederationConfig(), db)  # (no "descendants" in these cohorts)
        analyst = Requester("ana", frozenset({"analyst"}), None, {"irb_approved": True},
                            Purpose("research", ("DUO:0000006",)))
        gate, audit = ProfileGate(), ListAudit()

        async def ask(doc: dict) -> list[int]:
            req = CohortRequest.from_json({"cohort": doc, "age_at": "2025-01-01", "breakdowns": ["sex", "age_band"]})
            return _released(await site.answer(analyst, req, gate=gate, audit=audit))

        diffs: dict[str, list[int]] = {X: [], CONTROL: []}
        for i in range(400):  # 400 distinct cohorts A: age ≥ 0..99 × sex
            code = X if i % 2 == 0 else CONTROL
            leaf = {"condition": {"code": code}}
            a = {"all": [{"age": {"min": i // 4, "at": "2025-01-01"}}, {"sex": SEXES[i % 4]}, {"not": leaf}]}
            with_x = {"any": [a, leaf]}
            base, other = await ask(a), await ask(with_x)
            diffs[code].append(sum(other) - sum(base))
        mean = {code: sum(d) / len(d) for code, d in diffs.items()}
        # released values are computed only over permitted patients: A and "A or X" hold the same ones
        assert mean[X] == 0 and mean[CONTROL] == 0, mean
        assert all(d == 0 for d in diffs[X]), [d for d in diffs[X] if d][:10]
    finally:
        await db.dispose()
