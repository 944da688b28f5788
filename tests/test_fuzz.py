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
