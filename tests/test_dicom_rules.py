"""Issue 28 without a PACS: the routing rules file (checked at load, matched in order), the streaming
multipart/related reader (any split of the body, parts over the limit dropped, broken framing a 400),
`medlego serve --dicom-rules` refusing an unknown adapter in one line (exit 2), the missing extra's
one-line hint, and the new flags' --help defaults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medlego.runtime.errors import BadInputError
from medlego.serving.dicom import INSTALL_HINT, require
from medlego.runtime.errors import MultipartError
from medlego.serving.dicom.multipart import MultipartReader, boundary_of
from medlego.serving.dicom.rules import LOCAL_SCHEME, load_rules

GOOD = """
[[rule]]
name = "chest"
modality = ["CR", "dx"]
body_part = "CHEST"
series_description = "(?i)^pa"
adapters = ["chest@1", "lung"]
task = "finding"

[[rule]]
calling_ae = "MODALITY1"
adapter = "fallback"

[codes."chest"]
pneumonia = { value = "233604007", scheme = "SCT", meaning = "Pneumonia" }
effusion = "EFF"

[dicomweb]
destination = "pacs"

[dimse]
ae_title = "MEDLEGO"
port = 11112
allow = ["ORTHANC"]
destination = "pacs"

[destination.pacs]
dicomweb = "http://pacs:8042/dicom-web/"
"""


def _rules(tmp_path, text: str):
    p = tmp_path / "rules.toml"
    p.write_text(text)
    return load_rules(str(p))


def test_rules_load_and_match_in_order(tmp_path):
    rules = _rules(tmp_path, GOOD)
    chest = {"modality": "DX", "body_part": "chest ", "sop_class": "1.2", "series_description": "PA view",
             "calling_ae": "X"}
    first = rules.match(chest)
    assert first is not None and [t.adapter for t in first.targets] == ["chest@1", "lung"]
    assert first.targets[0].task == "finding"
    second = rules.match({**chest, "series_description": "lateral", "calling_ae": "MODALITY1"})
    assert second is not None and second.name == "rule 2"
    assert rules.match({**chest, "modality": "MR"}) is None
    assert rules.code("chest", "pneumonia") == ("233604007", "SCT", "Pneumonia")
    assert rules.code("chest", "effusion") == ("EFF", LOCAL_SCHEME, "EFF")
    assert rules.code("other", "a label longer than sixteen")[1] == LOCAL_SCHEME
    assert len(rules.code("other", "a label longer than sixteen")[0]) == 16
    web = rules.destination("dicomweb")
    assert web is not None and web.dicomweb == "http://pacs:8042/dicom-web"
    assert rules.adapters() == ["chest@1", "fallback", "lung"]
    assert rules.to_json()["rules"][0]["when"]["modality"] == ["CR", "DX"]


@pytest.mark.parametrize("text, words", [
    ("[[rule]]\nmodality = 'CR'\n", "needs 'adapters'"),
    ("[[rule]]\nadapters = ['a']\nmodaliti = 'CR'\n", "unknown key(s) modaliti"),
    ("[[rule]]\nadapters = ['a']\nseries_description = '('\n", "not a regular expression"),
    ("[rules]\n", "unknown table(s) rules"),
    ("[dicomweb]\ndestination = 'nowhere'\n", "'nowhere' is not a [destination.NAME] table"),
    ("[destination.x]\nae_title = 'A'\n", "needs either 'dicomweb'"),
    ("[dimse]\nallow = ['A_TITLE_LONGER_THAN_16']\n", "1-16 ASCII characters"),
    ("[[rule]\n", "not valid TOML"),
])
def test_rules_mistakes_are_one_line(tmp_path, text, words):
    with pytest.raises(BadInputError) as e:
        _rules(tmp_path, text)
    assert words in str(e.value) and "\n" not in str(e.value)


BODY = (b"preamble\r\n--b0\r\nContent-Type: application/dicom\r\n\r\n" + b"A" * 300 + b"\r\n--b0  \r\n"
        b"Content-Type: application/dicom\r\n\r\n" + b"\r\n--b" * 40 + b"\r\n--b0--\r\nepilogue")


@pytest.mark.parametrize("step", [1, 2, 5, 13, 64, 4096])
def test_multipart_reader_any_split(step):
    reader = MultipartReader(b"b0", 10_000, 10)
    for i in range(0, len(BODY), step):
        reader.feed(BODY[i:i + step])
    parts = reader.close()
    assert [p.data for p in parts] == [b"A" * 300, b"\r\n--b" * 40]
    assert parts[0].content_type == "application/dicom"


def test_multipart_reader_drops_a_part_above_the_limit_and_refuses_broken_framing():
    reader = MultipartReader(b"b0", 200, 10)
    reader.feed(BODY)
    parts = reader.close()
    assert parts[0].data is None and parts[0].size == 300 and parts[1].data == b"\r\n--b" * 40
    with pytest.raises(MultipartError, match="closing delimiter"):
        r = MultipartReader(b"b0", 1000, 10)
        r.feed(BODY[:100])
        r.close()
    with pytest.raises(MultipartError, match="more than 1"):
        MultipartReader(b"b0", 1000, 1).feed(BODY)
    with pytest.raises(MultipartError, match="no multipart boundary"):
        MultipartReader(b"b0", 1000, 1).feed(b"x" * 20_000)
    with pytest.raises(BadInputError, match="multipart/related"):
        boundary_of("multipart/form-data; boundary=x")
    assert boundary_of('multipart/related; type="application/dicom"; boundary="a b"') == b"a b"


def test_missing_extra_names_the_install_command():
    with pytest.raises(BadInputError) as e:
        require("medlego_no_such_module")
    assert INSTALL_HINT in str(e.value) and 'pip install "medlego[dicom]"' in str(e.value)


def test_serve_refuses_rules_naming_an_unknown_adapter(tmp_path, tiny_base_file):
    from servers import seeded_registry

    from medlego.runtime.base import load_base

    data = seeded_registry(tmp_path / "data", load_base("vit_tiny_patch16_224", tiny_base_file), ["chest"], 1)
    rules = tmp_path / "rules.toml"
    rules.write_text("[[rule]]\nmodality = 'CR'\nadapters = ['chest', 'ghost@3']\n")
    out = subprocess.run([sys.executable, "-m", "medlego", "serve", "--model", "vit_tiny_patch16_224",
                          "--weights", str(tiny_base_file), "--data-dir", str(data), "--port", "0", "--no-grpc",
                          "--dicom-rules", str(rules)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("medlego serve: error: DICOM rules: adapter 'ghost@3' cannot be used"), out.stderr
    assert "Traceback" not in out.stderr


def test_dicom_flags_state_their_defaults(capsys):
    from medlego.cli import main

    for argv in (["serve"], ["dicom", "run"]):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        if argv == ["serve"]:
            assert "(default: no DICOM door)" in text and "(default: [dimse] port" in text
            assert "else MEDLEGO)" in text
        else:
            assert "(default: http://127.0.0.1:8000)" in text and "(default: 300.0)" in text
            assert "(default: the server's rules)" in text
