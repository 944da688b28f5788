"""Property-based fuzzing of a real server (Hypothesis): whatever the body, the reference or the
DICOM header, the answer is never a 5xx, and the server stays healthy and keeps diagnosing."""

from __future__ import annotations

import base64
import io
import json
import urllib.parse

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medlego.jobs.synthetic import encode_dicom, encode_png, random_image
from medlego.serving.auth import Auth
from servers import seeded_registry, start_server

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every odd value we set

EXAMPLES = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PNG = encode_png(random_image(2, 24))
PNG_B64 = base64.b64encode(PNG).decode()


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_base, tiny_base_file):
    data = seeded_registry(tmp_path_factory.mktemp("fuzz"), tiny_base, ["f0", "f1"], 90)
    srv = start_server(tiny_base_file, data, auth=Auth(admin_token="fuzz-admin"))
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c
        # after everything: alive and still answering correctly
        assert c.get("/healthz").status_code == 200
        r = c.post("/v1/diagnose", files={"file": ("a.png", PNG)}, data={"adapter": "f0"})
        assert r.status_code == 200 and r.json()["adapter"] == "f0"
    srv.stop()


def _no_server_error(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        detail = r.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10 ** 30, max_value=10 ** 30),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                      st.sampled_from(["f0", "f1", "f0@1", "f1@0", "task90", PNG_B64, "", "@", "f0@²"]))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=12)
fields = st.fixed_dictionaries({}, optional={"image": json_value, "adapter": json_value, "task": json_value,
                                             "top_k": json_value, "items": json_value})


@EXAMPLES
@given(body=fields, batch=st.booleans())
def test_json_bodies_never_5xx(client, body, batch):
    raw = json.dumps(body, allow_nan=True).encode()  # NaN / Infinity tokens included
    r = client.post("/v1/diagnose/batch" if batch else "/v1/diagnose", content=raw,
                    headers={"Content-Type": "application/json"})
    _no_server_error(r)


@EXAMPLES
@given(raw=st.binary(max_size=300), ctype=st.sampled_from(["application/json", "multipart/form-data; boundary=x",
                                                          "text/plain", ""]))
def test_raw_bodies_never_5xx(client, raw, ctype):
    _no_server_error(client.post("/v1/diagnose", content=raw, headers={"Content-Type": ctype} if ctype else {}))


@EXAMPLES
@given(adapter=st.text(max_size=40), task=st.one_of(st.none(), st.text(max_size=20)),
       top_k=st.one_of(st.none(), st.text(max_size=12)),
       image=st.one_of(st.just(PNG), st.binary(max_size=200), st.binary(max_size=64).map(lambda b: PNG[:40] + b)))
def test_multipart_bodies_never_5xx(client, adapter, task, top_k, image):
    data = {"adapter": adapter, **({"task": task} if task is not None else {}),
            **({"top_k": top_k} if top_k is not None else {})}
    _no_server_error(client.post("/v1/diagnose", files={"file": ("x", image)}, data=data))


@EXAMPLES
@given(ref=st.text(min_size=1, max_size=60))
def test_adapter_references_never_5xx(client, ref):
    quoted = urllib.parse.quote(ref, safe="")
    _no_server_error(client.get(f"/v1/adapters/{quoted}"))
    _no_server_error(client.post("/v1/diagnose", files={"file": ("a.png", PNG)}, data={"adapter": ref}))
    _no_server_error(client.delete(f"/v1/adapters/{quoted}", headers={"Authorization": "Bearer fuzz-admin"}))


_DICOM_VALUE = st.one_of(st.integers(min_value=-2 ** 31, max_value=2 ** 31), st.floats(allow_nan=True),
                         st.text(alphabet="0123456789.-\\eE+ x", max_size=12),
                         st.lists(st.integers(min_value=-5000, max_value=5000), max_size=3))


@EXAMPLES
@given(overrides=st.dictionaries(
    st.sampled_from(["Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "SamplesPerPixel",
                     "PixelRepresentation", "NumberOfFrames", "WindowCenter", "WindowWidth", "RescaleSlope",
                     "RescaleIntercept", "PhotometricInterpretation", "PlanarConfiguration"]),
    _DICOM_VALUE, max_size=4))
def test_dicom_header_fields_never_5xx(client, overrides):
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(encode_dicom(random_image(5, 16, rgb=False).astype(np.float32) / 255.0)))
    for key, value in overrides.items():
        try:
            setattr(ds, key, value)
        except Exception:  # pydicom refuses some values outright: a client could still send them raw
            continue
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=False)
    except Exception:
        return  # not even writable: nothing to send
    _no_server_error(client.post("/v1/diagnose", files={"file": ("x.dcm", buf.getvalue())}, data={"adapter": "f0"}))


# -- admin JSON bodies and partial bodies (issue 24: these routes read their body after the token check) ----
ADMIN_HEADERS = {"Authorization": "Bearer fuzz-admin"}
merge_fields = st.fixed_dictionaries({}, optional={k: json_value for k in (
    "name", "sources", "method", "params", "aliases", "task_names", "move_alias", "target")})


@EXAMPLES
@given(body=st.one_of(merge_fields, json_value), route=st.sampled_from(["merge", "alias"]))
def test_admin_json_bodies_never_5xx(client, body, route):
    raw = json.dumps(body, allow_nan=True).encode()  # NaN / Infinity tokens included (httpx's json= refuses them)
    headers = {**ADMIN_HEADERS, "Content-Type": "application/json"}
    if route == "merge":
        r = client.post("/v1/merge", headers=headers, content=raw)
    else:
        r = client.put("/v1/aliases/fuzzed", headers=headers, content=raw)
    _no_server_error(r)
    if r.status_code < 400 and route == "alias":
        client.delete("/v1/aliases/fuzzed", headers=ADMIN_HEADERS)


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(path=st.sampled_from(["/v1/merge", "/v1/diagnose", "/v2/models/f0/infer", "/v1/aliases/a"]),
       cut=st.integers(min_value=0, max_value=60), extra=st.integers(min_value=0, max_value=10 ** 6),
       token=st.booleans())
def test_partial_bodies_never_hurt_the_server(client, path, cut, extra, token):
    """A body shorter than its Content-Length, cut at any point, and the connection closed: the server
    answers what it can (never 5xx) or nothing, and keeps serving others at once."""
    import socket

    body = json.dumps({"name": "m", "sources": ["f0", "f1"], "target": "f0@1", "image": PNG_B64[:40],
                       "adapter": "f0", "inputs": []}).encode()[:cut]
    host, port = client.base_url.host, client.base_url.port
    method = "PUT" if path.startswith("/v1/aliases") else "POST"
    auth = b"Authorization: Bearer fuzz-admin\r\n" if token else b""
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {cut + extra}\r\n".encode() + auth + b"\r\n" + body)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        try:
            head = s.recv(64)
        except OSError:
            head = b""
    assert not head.startswith(b"HTTP/1.1 5"), head
    assert client.get("/healthz", timeout=2).status_code == 200


# DICOM of every transfer syntax the server decodes (issue 24): native, deflated, RLE, JPEG Baseline,
# JPEG 2000, written here by pydicom and Pillow; then the header's geometry changed and bytes flipped
_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.5",
             "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90"]


def _encoded_dicom(syntax: str, rows: int, cols: int, rgb: bool) -> object:
    import hostile_dicom as hostile
    from pydicom.uid import UID

    samples = 3 if rgb else 1
    pixels = hostile.ramp(rows, cols, samples)
    photometric = "MONOCHROME2" if not rgb else ("YBR_FULL_422" if syntax.endswith(".4.50") else "RGB")
    ds = hostile.dicom(rows, cols, syntax=UID(syntax), samples=samples, photometric=photometric)
    if syntax.endswith(".4.50"):
        ds.PixelData = hostile.encapsulate([hostile.jpeg_bytes(pixels)])
    elif syntax.endswith(".4.90"):
        ds.PixelData = hostile.encapsulate([hostile.j2k_bytes(pixels)])
    elif syntax.endswith(".1.2.5"):
        ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
        ds.PixelData = pixels.tobytes()
        ds.compress(UID(syntax), encoding_plugin="pydicom")
    else:
        ds.PixelData = pixels.tobytes()
        return ds
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    return ds


@EXAMPLES
@given(syntax=st.sampled_from(_SYNTAXES), rows=st.integers(1, 40), cols=st.integers(1, 40), rgb=st.booleans(),
       overrides=st.dictionaries(st.sampled_from(["Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel",
                                                  "NumberOfFrames", "PlanarConfiguration"]),
                                 st.integers(min_value=-1, max_value=70000), max_size=2),
       flips=st.lists(st.tuples(st.floats(min_value=0, max_value=1), st.integers(0, 255)), max_size=4))
def test_dicom_transfer_syntaxes_never_5xx(client, syntax, rows, cols, rgb, overrides, flips):
    ds = _encoded_dicom(syntax, rows, cols, rgb)
    for key, value in overrides.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)
    except Exception:
        return  # not writable (an override pydicom refuses): nothing to send
    data = bytearray(buf.getvalue())
    for where, byte in flips:  # anywhere after the preamble and 'DICM'
        data[132 + int(where * (len(data) - 133))] = byte
    r = client.post("/v1/diagnose", files={"file": ("x.dcm", bytes(data))}, data={"adapter": "f0"})
    _no_server_error(r)
    if not overrides and not flips:  # untouched: every one of these syntaxes is decoded
        assert r.status_code == 200, (syntax, rows, cols, rgb, r.text)


@pytest.mark.parametrize("syntax", _SYNTAXES)
@pytest.mark.parametrize("rgb", [False, True])
def test_every_fuzzed_transfer_syntax_is_diagnosed_when_untouched(client, syntax, rgb):
    buf = io.BytesIO()
    _encoded_dicom(syntax, 37, 29, rgb).save_as(buf, enforce_file_format=True)
    r = client.post("/v1/diagnose", files={"file": ("x.dcm", buf.getvalue())}, data={"adapter": "f0"})
    assert r.status_code == 200, (syntax, rgb, r.text)
