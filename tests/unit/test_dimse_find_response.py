"""C-FIND response identifiers written straight from QIDO-RS rows (mappings/dicom/find_response.py) are the
bytes pynetdicom writes for the listener's pydicom answer (``DimseListener._answer``) of the same row, in both
little-endian transfer syntaxes; rows holding what the layout does not write are left to pydicom (``None``)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode

from gateway.handlers.dimse import DimseListener
from mappings.dicom.find_response import ResponseLayout

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # (pydicom on generated values)

AE_TITLE = "FEDGATE"


class _Settings:
    dimse_ae_title = AE_TITLE


def _listener() -> DimseListener:
    listener = DimseListener.__new__(DimseListener)
    listener.settings = _Settings()
    return listener


def _request(level: str, keys: dict[str, object]) -> Dataset:
    ident = Dataset()
    ident.QueryRetrieveLevel = level
    ident.SpecificCharacterSet = "ISO_IR 100"  # (the request's own: never copied to the answer)
    for kw, value in keys.items():
        setattr(ident, kw, value)
    return ident


def _layout(ident: Dataset, level: str, implicit: bool) -> ResponseLayout:
    keys = [(int(e.tag), e.VR) for e in ident if e.keyword != "SpecificCharacterSet"]
    return ResponseLayout(keys, {0x00080052: ("CS", level), 0x00080054: ("AE", AE_TITLE),
                                 0x00080056: ("CS", "ONLINE")}, implicit=implicit)


def _pydicom(ident: Dataset, item: dict, level: str, implicit: bool) -> bytes:
    return encode(_listener()._answer(ident, item, level), implicit, True)


STUDY_KEYS = {"StudyInstanceUID": "", "PatientID": "", "PatientName": "", "StudyDate": "", "AccessionNumber": "",
              "NumberOfStudyRelatedInstances": "", "ModalitiesInStudy": "", "StudyDescription": "",
              "RetrieveAETitle": "", "InstanceAvailability": "", "ReferringPhysicianName": "", "StudyTime": ""}

ROW = {
    "00080020": {"vr": "DA", "Value": ["20240115"]},
    "00080030": {"vr": "TM", "Value": ["101010.5"]},
    "00080050": {"vr": "SH", "Value": ["ACC1"]},
    "00080061": {"vr": "CS", "Value": ["CT", "MR"]},
    "00080090": {"vr": "PN"},
    "00081030": {"vr": "LO", "Value": ["Thorax ünd Bauch"]},
    "00081190": {"vr": "UR", "Value": ["/studies/1.2.3"]},
    "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jürgen", "Ideographic": "ミュラー"}]},
    "00100020": {"vr": "LO", "Value": ["P1"]},
    "0020000D": {"vr": "UI", "Value": ["1.2.826.0.1.3680043.8.498.1"]},
    "00201208": {"vr": "IS", "Value": [12]},
}


@pytest.mark.parametrize("implicit", [True, False])
def test_study_row_same_bytes_as_pydicom(implicit):
    ident = _request("STUDY", STUDY_KEYS)
    got = _layout(ident, "STUDY", implicit).encode(ROW)
    assert got is not None
    assert got == _pydicom(ident, ROW, "STUDY", implicit)
    back = decode(__import__("io").BytesIO(got), implicit, True)
    assert str(back.PatientName) == "Müller^Jürgen=ミュラー" and back.SpecificCharacterSet == "ISO_IR 192"
    assert back.RetrieveAETitle == AE_TITLE and back.NumberOfStudyRelatedInstances == 12
    assert back.StudyDescription == "Thorax ünd Bauch" and list(back.ModalitiesInStudy) == ["CT", "MR"]


@pytest.mark.parametrize("implicit", [True, False])
def test_keys_not_in_the_row_are_empty_with_the_request_vr(implicit):
    ident = _request("SERIES", {"SeriesInstanceUID": "", "Modality": "", "SeriesNumber": "", "Rows": None,
                                "NumberOfSeriesRelatedInstances": "", "OperatorsName": ""})
    item = {"0020000E": {"vr": "UI", "Value": ["1.2.3.44"]}, "00200011": {"vr": "IS", "Value": [3]},
            "00280010": {"vr": "US", "Value": [512]}, "00080060": {"vr": "CS", "Value": []},
            "00201209": {"vr": "IS", "BulkDataURI": "http://x/y"}}
    got = _layout(ident, "SERIES", implicit).encode(item)
    assert got == _pydicom(ident, item, "SERIES", implicit)


@pytest.mark.parametrize("item", [
    {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "A"}]}, "00101030": {"vr": "DS", "Value": [70.5]}},
    {"00100010": {"vr": "PN", "InlineBinary": "AAAA"}},
    {"00100010": {"vr": "PN", "Value": ["not a name object"]}},
    {"00100020": {"vr": "LO", "Value": [None]}},
    {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "A=B"}]}},
    {"00201208": {"vr": "IS", "Value": ["12"]}},
    {"00080061": {"vr": "CS", "Value": ["ÜS"]}},
])
def test_rows_the_layout_does_not_write_are_left_to_pydicom(item):
    ident = _request("STUDY", {"PatientName": "", "PatientID": "", "NumberOfStudyRelatedInstances": "",
                               "ModalitiesInStudy": "", "PatientWeight": ""})
    assert _layout(ident, "STUDY", True).encode(item) is None


def test_sequence_key_is_left_to_pydicom():
    ident = _request("STUDY", {"PatientID": ""})
    ident.ReferencedStudySequence = []
    assert _layout(ident, "STUDY", False).encode({"00100020": {"vr": "LO", "Value": ["P1"]}}) is None


def test_long_explicit_value_is_left_to_pydicom():
    ident = _request("STUDY", {"StudyDescription": ""})
    item = {"00081030": {"vr": "LO", "Value": ["x" * 70000]}}
    assert _layout(ident, "STUDY", False).encode(item) is None
    assert struct.unpack("<I", _layout(ident, "STUDY", True).encode(item)[-70004:-70000])[0] == 70000


_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\\\x00"), max_size=20)
_ascii = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\"),
                 max_size=16)


@settings(max_examples=150, deadline=None)
@given(name=st.dictionaries(st.sampled_from(["Alphabetic", "Ideographic", "Phonetic"]),
                            _text.filter(lambda s: "=" not in s), max_size=3),
       pid=st.lists(_text, min_size=0, max_size=3), mods=st.lists(_ascii, max_size=3),
       count=st.integers(0, 2**31 - 1), rows=st.integers(0, 65535), uid=st.from_regex(r"[0-9.]{1,30}", fullmatch=True),
       implicit=st.booleans(), level=st.sampled_from(["STUDY", "SERIES", "IMAGE", "PATIENT"]))
def test_any_plain_row_same_bytes_as_pydicom(name, pid, mods, count, rows, uid, implicit, level):
    ident = _request(level, {"PatientName": "", "PatientID": "", "ModalitiesInStudy": "", "Rows": None,
                             "NumberOfStudyRelatedInstances": "", "StudyInstanceUID": "", "QueryRetrieveLevel": ""})
    item = {"00100010": {"vr": "PN", "Value": [name]} if name else {"vr": "PN"},
            "00100020": {"vr": "LO", "Value": pid}, "00080061": {"vr": "CS", "Value": mods},
            "00201208": {"vr": "IS", "Value": [count]}, "00280010": {"vr": "US", "Value": [rows]},
            "0020000D": {"vr": "UI", "Value": [uid]}}
    got = _layout(ident, level, implicit).encode(item)
    assert got is not None
    assert got == _pydicom(ident, item, level, implicit)


def test_messages_are_cut_into_fragments_within_the_peers_maximum_pdu():
    from gateway.handlers.dimse import _FindResponses

    sent = []

    class _Dul:
        def send_pdu(self, pdata):
            sent.append(pdata.presentation_data_value_list)

    out = _FindResponses.__new__(_FindResponses)
    out.assoc = type("A", (), {"dul": _Dul()})()
    out.context_id, out.fragment = 3, 16 - 6  # a peer receiving P-DATA of at most 16 bytes
    out._put(0x02, bytes(range(25)))
    out._put(0x03, b"ab")
    assert sent == [[(3, b"\x00" + bytes(range(10)))], [(3, b"\x00" + bytes(range(10, 20)))],
                    [(3, b"\x02" + bytes(range(20, 25)))], [(3, b"\x03ab")]]
    sent.clear()
    out.fragment = -6  # (maximum 0: no limit)
    out._put(0x02, bytes(100))
    assert sent == [[(3, b"\x02" + bytes(100))]]


def test_command_and_data_set_share_a_pdu_when_both_fit():
    from gateway.handlers.dimse import _FindResponses

    sent = []

    class _Dul:
        def send_pdu(self, pdata):
            sent.append(pdata.presentation_data_value_list)

    class _Acse:
        def is_aborted(self):
            return False

        def is_release_requested(self):
            return False

    class _Layout:
        def encode(self, item):
            return item["data"]

    out = _FindResponses.__new__(_FindResponses)
    out.assoc = type("A", (), {"dul": _Dul(), "acse": _Acse()})()
    out.context_id, out.command, out.layout = 1, b"C" * 10, _Layout()
    out.fragment = 28 - 6  # 12 bytes of PDV headers + 10 + 6 fit in 28
    assert out.send({"data": b"D" * 6}, lambda: None)
    assert sent == [[(1, b"\x03" + b"C" * 10), (1, b"\x02" + b"D" * 6)]]
    sent.clear()
    assert out.send({"data": b"D" * 8}, lambda: None)  # (2 bytes too many: one P-DATA each)
    assert sent == [[(1, b"\x03" + b"C" * 10)], [(1, b"\x02" + b"D" * 8)]]
