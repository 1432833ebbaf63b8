"""The DIMSE listener's supported presentation contexts (gateway.handlers.dimse.SupportedContext): pynetdicom
deep-copies them for every association; their cheaper copy must be as independent as a deep copy for
everything an association could change. Fails loudly if pynetdicom's PresentationContext starts holding a
mutable value of another kind than a list of UIDs (then the copy would share it)."""

from __future__ import annotations

import copy

from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet, Verification

from gateway.handlers.dimse import SupportedContext


def _contexts() -> list:
    ae = AE()
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts[:5]:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    return ae.supported_contexts


def test_a_context_holds_only_immutable_values_and_lists_of_uids():
    for cx in _contexts():
        for name, value in vars(cx).items():
            if isinstance(value, list):
                assert all(type(v) is UID for v in value), name
            else:
                assert value is None or type(value) in (int, bool, UID), (name, type(value))


def test_copy_equals_a_deep_copy_and_shares_no_list():
    originals = _contexts()
    ours = [SupportedContext.of(cx) for cx in originals]
    for original, mine in zip(originals, ours):
        assert vars(mine) == vars(original) and mine.as_tuple == original.as_tuple
    copies = copy.deepcopy(ours)  # (what pynetdicom does per association)
    for mine, theirs in zip(ours, copies):
        assert type(theirs) is SupportedContext and vars(theirs) == vars(mine)
        for name, value in vars(mine).items():
            if isinstance(value, list):
                assert vars(theirs)[name] is not value
        theirs.transfer_syntax = ["1.2.840.10008.1.2"]
        theirs.context_id = 7
        theirs.scp_role = False
    assert [vars(m) for m in ours] == [vars(o) for o in originals]
