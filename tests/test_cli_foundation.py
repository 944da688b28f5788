"""The `medlego` command end to end: base init/fingerprint, inspect, predict on PNG and DICOM."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from medlego.cli import main
from medlego.runtime.adapter import save_adapter
from medlego.runtime.imaging import decode_image, preprocess
from medlego.runtime.model import AdaptedViT, adapter_logits


def _run(*args):
    return subprocess.run([sys.executable, "-m", "medlego", *args], capture_output=True, text=True, timeout=300)


def test_base_init_and_fingerprint_are_reproducible(tmp_path, tiny_base):
    out = tmp_path / "b.safetensors"
    r = _run("base", "init", "--model", "vit_tiny_patch16_224", "--seed", "0", "--img-size", "32", "-o", str(out))
    assert r.returncode == 0, r.stderr
    fp = _run("base", "fingerprint", "--model", "vit_tiny_patch16_224", "--weights", str(out))
    assert fp.stdout.strip() == tiny_base.fingerprint  # same name + seed -> same weights -> same hash
    assert len(fp.stdout.strip()) == 64
    bad = _run("base", "fingerprint", "--model", "resnet50", "--weights", str(out))
    assert bad.returncode == 2 and "is not a plain ViT" in bad.stderr and "Traceback" not in bad.stderr


def test_inspect_reports_size_and_ranks(tmp_path, make_adapter, capsys):
    path = tmp_path / "a.safetensors"
    ad = make_adapter(seed=2, rank=4)
    save_adapter(ad, path)
    assert main(["inspect", str(path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["lora_params"] == 12 * 2 * (4 * 192 * 2 + 4)
    assert s["ranks"]["histogram"] == {"4": 24} and s["file_bytes"] == path.stat().st_size
    assert s["base"]["fingerprint"] == ad.base.fingerprint and s["provenance"]["seed"] == 2


def _dicom_bytes(tmp_path, pixels: np.ndarray, photometric: str, slope: float, intercept: float):
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path = tmp_path / f"{photometric}.dcm"
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_dicom_decoding_monochrome1_inverted(tmp_path):
    ramp = np.tile(np.arange(0, 4000, 125, dtype=np.uint16), (8, 1))  # 8 x 32, increasing left to right
    m2 = decode_image(_dicom_bytes(tmp_path, ramp, "MONOCHROME2", 2.0, -100.0).read_bytes())
    m1 = decode_image(_dicom_bytes(tmp_path, ramp, "MONOCHROME1", 2.0, -100.0).read_bytes())
    assert m2.shape == (8, 32) and m2[0, 0] == 0.0 and m2[0, -1] == 1.0
    assert np.allclose(m1, 1.0 - m2)  # MONOCHROME1: high values are dark


def test_predict_json_on_png_and_dicom(tmp_path, tiny_base, tiny_base_file, make_adapter):
    ad = make_adapter(seed=4, rank=3)
    apath = tmp_path / "a.safetensors"
    save_adapter(ad, apath)
    rng = np.random.default_rng(0)
    png = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8)).save(png)  # grey, not square, resized
    dcm = _dicom_bytes(tmp_path, rng.integers(0, 4000, (32, 32)), "MONOCHROME2", 1.0, 0.0)
    r = _run("predict", "--model", "vit_tiny_patch16_224", "--weights", str(tiny_base_file), "--adapter", str(apath),
             "--json", str(png), str(dcm))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert [x["image"] for x in lines] == [str(png), str(dcm)]
    model = AdaptedViT(tiny_base)
    for line, path in zip(lines, [png, dcm]):
        assert line["task"] == "task4" and set(line["probabilities"]) == {"class0", "class1", "class2"}
        pixels = preprocess(decode_image(path.read_bytes()), ad.preprocess).unsqueeze(0)
        expected = torch.softmax(adapter_logits(model, ad, pixels), -1)[0]
        got = torch.tensor([line["probabilities"][f"class{i}"] for i in range(3)])
        assert (got - expected).abs().max() < 1e-5


def test_predict_refuses_adapter_of_another_base(tmp_path, other_base_file, make_adapter):
    apath = tmp_path / "a.safetensors"
    save_adapter(make_adapter(), apath)
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(png)
    r = _run("predict", "--model", "vit_tiny_patch16_224", "--weights", str(other_base_file), "--adapter", str(apath), str(png))
    assert r.returncode == 2 and "resident base" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_inspect_count_for_vit_base_r4(tmp_path, capsys):
    """The issue's check: vit_base_patch16_224, r=4 on Q and V -> 147,456 + 96 LoRA parameters, ~0.17 %."""
    from medlego.runtime.adapter import BaseSpec, Preprocess
    from medlego.jobs.synthetic import random_adapter

    spec = BaseSpec("vit_base_patch16_224", "ab" * 32, 768, 12)  # no vit_base weights needed
    ad = random_adapter(spec, Preprocess(224, (0.5,) * 3, (0.5,) * 3), rank=4, seed=0)
    path = tmp_path / "base_r4.safetensors"
    save_adapter(ad, path)
    assert main(["inspect", str(path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["lora_params"] - s["lora_params_E"] == 147_456 and s["lora_params_E"] == 96
    assert s["base_params"] == 85_798_656  # timm vit_base_patch16_224 without its classifier
    assert round(100 * s["lora_share_of_base"], 2) == 0.17
    assert main(["inspect", str(path)]) == 0
    assert "0.172% of the base's 85,798,656 parameters" in capsys.readouterr().out
