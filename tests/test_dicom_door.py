"""Issue 28: a hospital plugs medlego in. Against a REAL Orthanc (tests/orthanc.py, one per module):
Orthanc itself sends a study to medlego over DICOMweb (STOW-RS, chunked) and over DIMSE (C-STORE),
and the Structured Report medlego builds comes back into Orthanc's same study, found by QIDO-RS,
read with pydicom/highdicom and dcmdump. Instances medlego cannot diagnose (no rule, a PDF, a broken
file) get their failure reasons and nothing reaches Orthanc. The audit rows carry UIDs and the
calling AE, never patient attributes."""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import time

import httpx
import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")
pytest.importorskip("dicomweb_client")

import pydicom  # noqa: E402

import dicom_studies as studies  # noqa: E402
from orthanc import Orthanc, available, free_port  # noqa: E402

pytestmark = pytest.mark.skipif(available() is not None and not __import__("os").environ.get("CI"),
                                reason=available() or "")
RULES = """
[[rule]]
name = "chest radiographs"
modality = ["CR", "DX"]
body_part = "CHEST"
adapters = ["chest"]

[codes.chest]
class1 = {{ value = "233604007", scheme = "SCT", meaning = "Pneumonia" }}

[dicomweb]
destination = "pacs-web"

[dimse]
allow = ["ORTHANC"]
destination = "pacs-dimse"

[destination.pacs-web]
dicomweb = "{orthanc_web}"

[destination.pacs-dimse]
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {orthanc_port}
"""


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    o = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield o
    o.stop()


@pytest.fixture(scope="module")
def door(tmp_path_factory, tiny_base_file, orthanc):
    """medlego with an audit log, its STOW-RS door and its C-STORE SCP, known to Orthanc."""
    from medlego.serving.dicom.attach import attach

    d = tmp_path_factory.mktemp("dicom-door")
    rules = d / "rules.toml"
    rules.write_text(RULES.format(orthanc_web=orthanc.dicomweb, orthanc_port=orthanc.dicom_port))
    server = studies.start_audited_server(tiny_base_file, d, ["chest", "other"])
    dimse = attach(server, str(rules), ae_title="MEDLEGO", port=free_port())
    assert dimse is not None
    orthanc.add_dicomweb_server("medlego", server.url + "/dicom-web")
    orthanc.add_modality("medlego", "MEDLEGO", dimse.port)
    yield server, dimse
    dimse.stop()
    server.stop()


def _sr_instances(orthanc: Orthanc, study_uid: str) -> list[pydicom.Dataset]:
    """The SRs of a study in Orthanc, found by QIDO-RS and read by WADO-RS (dicomweb-client)."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(orthanc.dicomweb)
    found = client.search_for_instances(study_instance_uid=study_uid, search_filters={"Modality": "SR"})
    return [client.retrieve_instance(study_uid, i["0020000E"]["Value"][0], i["00080018"]["Value"][0]) for i in found]


def _wait_srs(orthanc, study_uid, count=1, timeout=30.0) -> list:
    deadline = time.time() + timeout
    while True:
        srs = _sr_instances(orthanc, study_uid)
        if len(srs) >= count or time.time() > deadline:
            return srs
        time.sleep(0.2)


def _v1_probabilities(server, data: bytes) -> dict:
    r = httpx.post(server.url + "/v1/diagnose", files={"file": ("x.dcm", data, "application/dicom")},
                   data={"adapter": "chest"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _check_sr(sr, source, expected: dict, tol: float = 1e-12) -> None:
    """The SR: same study, a new series, the source referenced, each finding coded with its probability
    (equal to /v1/diagnose's), the adapter's name@version and sha256 and medlego's version."""
    from medlego import __version__

    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.SeriesInstanceUID != source.SeriesInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPInstanceUID == source.SOPInstanceUID
    items = list(studies.walk(sr.ContentSequence))
    images = [i for i in items if i.ValueType == "IMAGE"]
    assert any(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID for i in images)
    texts = {str(i.TextValue) for i in items if i.ValueType == "TEXT"}
    assert f"sha256={expected['sha256']}" in texts and f"medlego={__version__}" in texts
    assert {"chest", str(expected["version"])} <= texts  # algorithm name and version
    measured = studies.measurements(items)
    assert set(measured) == {("233604007", "SCT"), ("class0", "99MEDLEGO"), ("class2", "99MEDLEGO")}
    codes = {"class1": ("233604007", "SCT"), "class0": ("class0", "99MEDLEGO"), "class2": ("class2", "99MEDLEGO")}
    for label, p in expected["probabilities"].items():
        assert measured[codes[label]] == pytest.approx(p, abs=tol, rel=tol), label
    assert "PatientName" in sr and sr.PatientID == source.PatientID  # the SR is the patient's, in the PACS


def test_orthanc_sends_a_study_over_dicomweb_and_gets_the_sr_back(orthanc, door):
    server, _ = door
    orthanc.clear()
    data, ds = studies.chest_cr()
    study = orthanc.upload(data)["ParentStudy"]
    t0 = time.perf_counter()
    r = orthanc.post("/dicom-web/servers/medlego/stow", json={"Resources": [study], "Synchronous": True})
    assert r.status_code == 200, (r.text, orthanc.log()[-3000:])
    srs = _wait_srs(orthanc, ds.StudyInstanceUID)
    print(f"STOW-RS round trip through Orthanc: {time.perf_counter() - t0:.2f} s")
    assert len(srs) == 1
    _check_sr(srs[0], ds, _v1_probabilities(server, data))
    _dcmdump_parses(srs[0])


def test_orthanc_sends_a_study_over_dimse_and_gets_the_sr_back_by_c_store(orthanc, door):
    server, _ = door
    orthanc.clear()
    assert orthanc.post("/modalities/medlego/echo", json={}).status_code == 200  # C-ECHO answered
    data, ds = studies.chest_cr(modality="DX")
    study = orthanc.upload(data)["ParentStudy"]
    r = orthanc.post("/modalities/medlego/store", json={"Resources": [study], "Synchronous": True})
    assert r.status_code == 200, (r.text, orthanc.log()[-3000:])
    srs = _wait_srs(orthanc, ds.StudyInstanceUID)
    assert len(srs) == 1
    _check_sr(srs[0], ds, _v1_probabilities(server, data))


def test_instances_that_cannot_be_diagnosed_get_their_reasons_and_nothing_reaches_orthanc(orthanc, door):
    server, _ = door
    orthanc.clear()
    unmatched, mr = studies.chest_cr(modality="MR")
    pdf, pdf_ds = studies.pdf()
    broken = studies.chest_cr()[0][:900]  # the header cut short
    body, ctype = studies.multipart([unmatched, pdf, broken], chunk=None)
    r = httpx.post(server.url + "/dicom-web/studies", content=body, headers={"Content-Type": ctype}, timeout=60)
    assert r.status_code == 409, r.text
    failed = r.json()["00081198"]["Value"]
    reasons = [f["00081197"]["Value"][0] for f in failed]
    assert reasons == [0xC001, 0x0122, 0xC000], [f.get("0040A160") for f in failed]
    assert failed[0]["00081155"]["Value"] == [mr.SOPInstanceUID]
    assert failed[1]["00081155"]["Value"] == [pdf_ds.SOPInstanceUID]
    assert orthanc.get("/studies").json() == []  # nothing was stored in the PACS


def test_malformed_and_oversized_bodies_are_4xx_never_500(door):
    server, _ = door
    url = server.url + "/dicom-web/studies"
    bad = httpx.post(url, content=b"--b\r\nContent-Type: application/dicom\r\n\r\nabc",
                     headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
    assert bad.status_code == 400 and "closing delimiter" in bad.json()["detail"]
    wrong = httpx.post(url, content=b"{}", headers={"Content-Type": "application/json"})
    assert wrong.status_code == 400
    limits = server.service.limits
    big = b"\0" * (limits.max_image_bytes + 10)
    body, ctype = studies.multipart([big, studies.chest_cr()[0]], chunk=1 << 20)
    r = httpx.post(url, content=body, headers={"Content-Type": ctype}, timeout=60)  # chunked: no Content-Length
    assert r.status_code == 202, r.text
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA700]


def test_header_floods_are_refused_by_the_bounded_walk_before_pydicom(orthanc, door):
    """Issue 24's header floods at the DICOM door: the decoder's own element-counting walk refuses them
    (out of resources, the reason in words) before pydicom would parse millions of elements; the
    instance beside them is still diagnosed."""
    import hostile_dicom as hostile

    server, _ = door
    orthanc.clear()
    floods = [hostile.header_flood(200_000), hostile.header_flood(1_000_000, deflated=True),
              hostile.sequence_flood(200_000)]
    good, ds = studies.chest_cr()
    body, ctype = studies.multipart([*floods, good], chunk=1 << 20)
    t0 = time.perf_counter()
    r = httpx.post(server.url + "/dicom-web/studies", content=body, headers={"Content-Type": ctype}, timeout=60)
    took = time.perf_counter() - t0
    assert r.status_code == 202, r.text
    failed = r.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [0xA700] * 3, failed
    assert all("too costly" in f["0040A160"]["Value"][0] for f in failed), failed
    assert r.json()["00081199"]["Value"][0]["00081155"]["Value"] == [ds.SOPInstanceUID]
    assert took < 30, took  # the walk stops at its element cap; pydicom alone took 11-16 s a flood


def test_explicit_adapter_and_srs_returned_to_the_caller(orthanc, door):
    server, _ = door
    orthanc.clear()
    data, ds = studies.chest_cr(modality="MR")  # no rule matches: the request names the adapter
    body, ctype = studies.multipart([data], chunk=4096)
    r = httpx.post(server.url + "/dicom-web/studies", params={"adapter": "other", "sr": "return"}, content=body,
                   headers={"Content-Type": ctype}, timeout=60)
    assert r.status_code == 200, r.text
    parts = studies.parse_multipart(r.content, r.headers["content-type"])
    assert parts[0][0] == "application/dicom+json"
    assert parts[0][1].startswith(b"{") and ds.SOPInstanceUID.encode() in parts[0][1]
    sr = pydicom.dcmread(io.BytesIO(parts[1][1]))
    assert sr.StudyInstanceUID == ds.StudyInstanceUID and sr.Modality == "SR"
    assert len(_wait_srs(orthanc, ds.StudyInstanceUID)) == 1  # stored at the destination too


def test_rules_route_and_audit_rows_carry_uids_not_patients(orthanc, door, caplog):
    server, _ = door
    caplog.set_level(logging.DEBUG)  # whatever the level, no log line carries a patient attribute
    # its own traffic: a diagnosis over each door, and the three refusals
    orthanc.clear()
    study = orthanc.upload(studies.chest_cr(seed=5)[0])["ParentStudy"]
    assert orthanc.post("/modalities/medlego/store", json={"Resources": [study], "Synchronous": True}).status_code == 200
    files = [studies.chest_cr(seed=6)[0], studies.chest_cr(modality="MR")[0], studies.pdf()[0],
             studies.chest_cr()[0][:900], b"\0" * (server.service.limits.max_image_bytes + 1)]
    body, ctype = studies.multipart(files)
    assert httpx.post(server.url + "/dicom-web/studies", content=body, headers={"Content-Type": ctype},
                      timeout=60).status_code == 202
    rules = httpx.get(server.url + "/v1/dicom/rules").json()
    assert rules["rules"][0]["adapters"] == [{"adapter": "chest", "task": None}]
    assert rules["ae_title"] == "MEDLEGO" and rules["dimse"]["allow"] == ["ORTHANC"]
    server.service.audit.flush()
    rows = server.service.recorder.query(server.service.registry.index)
    dicom_rows = [r for r in rows if r.get("api") in ("dicomweb", "dimse")]
    diagnosed = [r for r in dicom_rows if r["kind"] == "diagnosis"]
    assert {r["api"] for r in diagnosed} == {"dicomweb", "dimse"}
    assert all(r["study_uid"] and r["series_uid"] and r["sop_instance_uid"] for r in diagnosed)
    assert any(r.get("calling_ae") == "ORTHANC" for r in diagnosed if r["api"] == "dimse")
    refused = [r for r in dicom_rows if r["kind"] == "refused"]
    assert {r.get("failure_reason") for r in refused} >= {"0xC001", "0x0122", "0xA700"}
    assert all(r["study_uid"] and r["series_uid"] for r in refused if r.get("failure_reason") in ("0xC001", "0x0122"))
    # the broken instance's header was read: the decoder refused it, in the service's own row with its UIDs
    decoder = [r for r in refused if "pixel data" in r.get("reason", "")]
    assert decoder and decoder[0]["sop_instance_uid"]
    text = repr(rows) + caplog.text
    assert "medlego" in caplog.text or caplog.records  # the logs were captured
    for secret in (studies.PATIENT_NAME, studies.PATIENT_ID, studies.BIRTH_DATE):
        assert secret not in text
    metrics = httpx.get(server.url + "/metrics").text
    assert studies.PATIENT_ID not in metrics and "dicomweb" in metrics


def _dcmdump_parses(sr) -> None:
    dcmdump = shutil.which("dcmdump")
    if dcmdump is None:
        if __import__("os").environ.get("CI"):
            raise AssertionError("dcmdump (dcmtk) is not installed")
        return
    fp = io.BytesIO()
    sr.save_as(fp, enforce_file_format=True)
    out = subprocess.run([dcmdump, "-"], input=fp.getvalue(), capture_output=True, timeout=30)
    if out.returncode != 0:  # older dcmtk reads no stdin: a file then
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
            f.write(fp.getvalue())
            f.flush()
            out = subprocess.run([dcmdump, f.name], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr.decode()
    text = out.stdout.decode()
    assert "ComprehensiveSRStorage" in text and "ContentSequence" in text and "W:" not in out.stderr.decode()


def _medlego(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-m", "medlego", *argv], capture_output=True, text=True, timeout=timeout)


def test_medlego_dicom_run_pulls_a_study_from_orthanc_and_stores_the_srs(orthanc, door):
    server, _ = door
    orthanc.clear()
    first, ds = studies.chest_cr()
    second = studies.chest_cr(seed=3, study_uid=ds.StudyInstanceUID)[0]
    pdf = studies.pdf(study_uid=ds.StudyInstanceUID)[0]
    for data in (first, second, pdf):
        orthanc.upload(data)
    out = _medlego("dicom", "run", "--pacs", orthanc.dicomweb, "--study", ds.StudyInstanceUID,
                   "--server", server.url, "--adapter", "chest")
    assert out.returncode == 1, out.stderr  # the PDF is not diagnosed: said, and the exit status says so
    assert out.stdout.count(": diagnosed") == 2 and "0x0122 SOP class not supported" in out.stdout, out.stdout
    assert "3 instance(s), 2 diagnosed, 2 SR(s) stored" in out.stdout
    srs = _wait_srs(orthanc, ds.StudyInstanceUID, count=2)
    assert len(srs) == 2  # stored once each: by the command, not also by the server's destination
    source = next(s for s in srs if s.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
                  .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID)
    # the two instances shared an engine batch: float sums in another order than a batch of one (~1e-7)
    _check_sr(source, ds, _v1_probabilities(server, first), tol=1e-5)


def test_medlego_dicom_run_mistakes_are_one_line(orthanc, door):
    server, _ = door
    for argv, words in ((["--pacs", orthanc.dicomweb, "--study", "1.2.3.999", "--server", server.url],
                         "cannot retrieve study 1.2.3.999"),
                        (["--pacs", orthanc.dicomweb, "--study", "1.2", "--server", "http://127.0.0.1:1"], "1.2"),
                        (["--pacs", "pacs:8042", "--study", "1.2"], "--pacs must be an http(s) URL"),
                        (["--pacs", orthanc.dicomweb, "--study", "1.2", "--task", "t"], "--task needs --adapter")):
        out = _medlego("dicom", "run", *argv)
        assert out.returncode == 2 and words in out.stderr, (argv, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr


@pytest.mark.filterwarnings("ignore:Expected explicit VR")  # pydicom, reading the unknown syntax's header
def test_multiframe_deflated_and_unknown_transfer_syntax(door):
    """A multi-frame image is diagnosed on frame 0 (its SR names frame 1); a deflated data set is read
    (its header inflated only so far); an unknown transfer syntax gets 0xC122 and no SR."""
    server, _ = door
    multi, multi_ds = studies.chest_cr(frames=3)
    deflated, deflated_ds = studies.chest_cr(syntax="1.2.840.10008.1.2.1.99")
    unknown, unknown_ds = studies.chest_cr(syntax="1.2.826.0.1.3680043.2.1125.99.1")
    body, ctype = studies.multipart([multi, deflated, unknown])
    r = httpx.post(server.url + "/dicom-web/studies", params={"adapter": "chest", "sr": "return-only"},
                   content=body, headers={"Content-Type": ctype}, timeout=60)
    assert r.status_code == 202, r.text
    parts = studies.parse_multipart(r.content, r.headers["content-type"])
    report = __import__("json").loads(parts[0][1])
    done = [i["00081155"]["Value"][0] for i in report["00081199"]["Value"]]
    assert done == [multi_ds.SOPInstanceUID, deflated_ds.SOPInstanceUID]
    failed = report["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [0xC122] and unknown_ds.SOPInstanceUID in parts[0][1].decode()
    srs = [pydicom.dcmread(io.BytesIO(p[1])) for p in parts[1:]]
    assert len(srs) == 2
    frame_refs = [i.ReferencedSOPSequence[0] for i in studies.walk(srs[0].ContentSequence) if i.ValueType == "IMAGE"]
    assert frame_refs and int(frame_refs[0].ReferencedFrameNumber) == 1
    # frame 0 is what /v1/diagnose decodes too: the same probabilities
    expected = httpx.post(server.url + "/v1/diagnose", files={"file": ("m.dcm", multi, "application/dicom")},
                          data={"adapter": "chest"}, timeout=60).json()["probabilities"]
    measured = studies.measurements(list(studies.walk(srs[0].ContentSequence)))
    assert measured[("233604007", "SCT")] == pytest.approx(expected["class1"], abs=1e-5)


def test_dimse_door_refuses_a_calling_ae_outside_the_allow_list(door):
    from pynetdicom import AE

    _, dimse = door
    for title, accepted in (("INTRUDER", False), ("ORTHANC", True)):
        ae = AE(ae_title=title)
        ae.add_requested_context("1.2.840.10008.1.1")  # Verification
        assoc = ae.associate("127.0.0.1", dimse.port, ae_title="MEDLEGO")
        assert assoc.is_established is accepted, title
        if accepted:
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()


def test_a_destination_that_refuses_the_sr_is_a_warning_not_a_failure(door):
    """The diagnosis stands (202, the instance referenced), the Warning header says the SR was not stored."""
    from medlego.serving.dicom.rules import Destination

    server, _ = door
    rules = server.app.state.dicom_door.rules
    saved = rules.destinations["pacs-web"]
    rules.destinations["pacs-web"] = Destination("pacs-web", dicomweb=f"http://127.0.0.1:{free_port()}/dicom-web")
    try:
        data, ds = studies.chest_cr()
        body, ctype = studies.multipart([data])
        r = httpx.post(server.url + "/dicom-web/studies", content=body, headers={"Content-Type": ctype}, timeout=60)
    finally:
        rules.destinations["pacs-web"] = saved
    assert r.status_code == 202, r.text
    assert r.json()["00081199"]["Value"][0]["00081155"]["Value"] == [ds.SOPInstanceUID]
    assert "1 SR(s) not stored" in r.headers["warning"]
