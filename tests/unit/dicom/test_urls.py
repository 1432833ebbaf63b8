"""The one DICOMweb URL builder (mappings/dicom/urls.py): every WADO URL the gateway hands out."""

from mappings.dicom import attributes as attrs
from mappings.dicom.qido import QidoQuery
from mappings.dicom.urls import DicomwebUrls

ROW = {"study_uid": "1.2", "series_uid": "1.2.3", "sop_uid": "1.2.3.4"}


def test_resource_urls():
    u = DicomwebUrls("https://gw.example/prefix/dicomweb/")
    assert u.base == "https://gw.example/prefix/dicomweb"
    assert u.study("1.2") == "https://gw.example/prefix/dicomweb/studies/1.2"
    assert u.of("series", ROW) == "https://gw.example/prefix/dicomweb/studies/1.2/series/1.2.3"
    assert u.of("instances", ROW) == u.instance("1.2", "1.2.3", "1.2.3.4")
    assert u.bulkdata("1.2", "1.2.3", "1.2.3.4", "7FE00010").endswith("/instances/1.2.3.4/bulkdata/7FE00010")
    assert DicomwebUrls("").study("1.2") == "/studies/1.2"


def test_bulk_data_uris_and_qido_retrieve_urls_come_from_it():
    u = DicomwebUrls("http://h:1/dicomweb")
    meta = {"7FE00010": {"vr": "OW", "BulkDataURI": attrs.BULK_PREFIX + "7FE00010"},
            "00400275": {"vr": "SQ", "Value": [{"00091001": {"vr": "OB", "BulkDataURI": attrs.BULK_PREFIX + "00091001"}}]}}
    attrs.resolve_bulk(meta, u.bulk_of(ROW))
    assert meta["7FE00010"]["BulkDataURI"] == u.bulkdata("1.2", "1.2.3", "1.2.3.4", "7FE00010")
    assert meta["00400275"]["Value"][0]["00091001"]["BulkDataURI"] == u.bulkdata("1.2", "1.2.3", "1.2.3.4", "00091001")
    q = QidoQuery.parse("instances", [], base=u.base)
    assert q.render("instances", dict(ROW, transfer_syntax="1.2.840.10008.1.2.1"))["00081190"]["Value"] == [
        u.instance("1.2", "1.2.3", "1.2.3.4")]
