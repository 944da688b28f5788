"""Dataset loaders: MedMNIST .npz (grey/RGB, any size, multi-label), image folders (split or not),
CSV manifests (multi-label, DICOM). Every image must come out exactly as runtime/imaging.preprocess
would make it (before mean/std), with the right label, and the fingerprint must follow the data."""

import numpy as np
import pytest
import torch
from PIL import Image

from medlego.jobs.datasets import load_dataset
from medlego.jobs.synthetic import make_synthetic_medmnist
from medlego.runtime.adapter import Preprocess
from medlego.runtime.errors import BadInputError
from medlego.runtime.imaging import decode_dicom, load_image_file, preprocess

S = 32  # the tiny base's input size


def _expected(image) -> torch.Tensor:
    """What the serving path makes of this image, without the mean/std step."""
    return preprocess(image, Preprocess(S, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))


def _npz(path, rng, shape, n=(6, 4, 5), labels=None, multilabel_cols=0):
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
        if multilabel_cols:
            arrays[f"{split}_labels"] = rng.integers(0, 2, (count, multilabel_cols)).astype(np.uint8)
        else:
            arrays[f"{split}_labels"] = rng.integers(0, labels, (count, 1)).astype(np.int64)
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("shape", [(28, 28), (64, 64, 3), (32, 32), (28, 28, 1)],
                         ids=["grey28-upscaled", "rgb64-shrunk", "grey32-as-is", "grey28-channel-axis"])
def test_npz_grey_and_rgb_any_size_match_serving_preprocess(tmp_path, shape):
    rng = np.random.default_rng(sum(shape))
    arrays = _npz(tmp_path / "d.npz", rng, shape, labels=5)
    data = load_dataset(tmp_path / "d.npz", input_size=S)
    assert data.sizes() == {"train": 6, "val": 4, "test": 5} and not data.multilabel
    for split in ("train", "val", "test"):
        s = data.split(split)
        assert s.images.shape == (len(s), 3, S, S) and s.images.dtype == torch.float32
        assert torch.equal(s.labels, torch.from_numpy(arrays[f"{split}_labels"].reshape(-1)))
        for i in range(len(s)):
            img = arrays[f"{split}_images"][i]
            img = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
            assert torch.allclose(s.images[i], _expected(img), atol=1e-5), (split, i)
    if len(shape) == 2:  # grey is replicated into three equal channels
        assert torch.equal(data.split("train").images[:, 0], data.split("train").images[:, 2])
    # the class count comes from the largest label unless given; the names follow it
    assert data.num_classes == max(int(arrays[f"{s}_labels"].max()) for s in ("train", "val", "test")) + 1
    assert load_dataset(tmp_path / "d.npz", input_size=S, num_classes=7).labels == tuple(f"class{i}" for i in range(7))


def test_npz_multilabel_chestmnist_layout_and_fingerprint(tmp_path):
    rng = np.random.default_rng(3)
    arrays = _npz(tmp_path / "chest.npz", rng, (28, 28), multilabel_cols=14)
    data = load_dataset(tmp_path / "chest.npz", input_size=S, label_names=[f"finding{i}" for i in range(14)])
    assert data.multilabel and data.num_classes == 14 and data.labels[3] == "finding3"
    lab = data.split("val").labels
    assert lab.dtype == torch.float32 and torch.equal(lab, torch.from_numpy(arrays["val_labels"]).float())
    # the fingerprint is of the arrays: the same arrays give the same hash, one changed pixel a different one
    np.savez(tmp_path / "same.npz", **arrays)
    arrays["test_images"][2, 5, 5] ^= 1
    np.savez(tmp_path / "changed.npz", **arrays)
    assert load_dataset(tmp_path / "same.npz", input_size=S).fingerprint == data.fingerprint
    assert load_dataset(tmp_path / "changed.npz", input_size=S).fingerprint != data.fingerprint
    with pytest.raises(BadInputError, match="3 label names given but the data has 14 classes"):
        load_dataset(tmp_path / "chest.npz", input_size=S, label_names=["a", "b", "c"])


def test_npz_bad_shapes_and_counts(tmp_path):
    rng = np.random.default_rng(4)
    arrays = _npz(tmp_path / "ok.npz", rng, (28, 28), labels=3)
    arrays["val_images"] = arrays["val_images"][:3]
    np.savez(tmp_path / "count.npz", **arrays)
    with pytest.raises(BadInputError, match="val has 3 images but 4 labels"):
        load_dataset(tmp_path / "count.npz", input_size=S)
    arrays["val_images"] = rng.integers(0, 256, (4, 28, 28, 2), dtype=np.uint8)
    np.savez(tmp_path / "shape.npz", **arrays)
    with pytest.raises(BadInputError, match=r"val_images has shape \(4, 28, 28, 2\)"):
        load_dataset(tmp_path / "shape.npz", input_size=S)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(BadInputError, match="cannot read .*junk.npz as an .npz file"):
        load_dataset(tmp_path / "junk.npz", input_size=S)
    with pytest.raises(BadInputError, match="dataset not found"):
        load_dataset(tmp_path / "nowhere.npz", input_size=S)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(BadInputError, match="unsupported dataset"):
        load_dataset(tmp_path / "d.txt", input_size=S)


@pytest.mark.parametrize("multilabel,rgb,size", [(False, False, 28), (True, True, 64)])
def test_synthetic_generator_writes_the_medmnist_layout(tmp_path, multilabel, rgb, size):
    path = make_synthetic_medmnist(tmp_path / "syn.npz", classes=3, multilabel=multilabel, size=size, rgb=rgb,
                                   n_train=20, n_val=8, n_test=10, seed=2)
    with np.load(path) as raw:
        assert raw["train_images"].shape == ((20, size, size, 3) if rgb else (20, size, size))
        assert raw["train_images"].dtype == np.uint8 and raw["test_labels"].shape == ((10, 3) if multilabel else (10, 1))
        first = raw["train_images"].copy()
    again = make_synthetic_medmnist(tmp_path / "again.npz", classes=3, multilabel=multilabel, size=size, rgb=rgb,
                                    n_train=20, n_val=8, n_test=10, seed=2)
    with np.load(again) as raw2:
        assert np.array_equal(first, raw2["train_images"])  # reproducible by seed
    data = load_dataset(path, input_size=S)
    assert data.multilabel == multilabel and data.num_classes == 3 and data.sizes() == {"train": 20, "val": 8, "test": 10}
    assert data.split("train").images.std() > 0.02  # non-trivial images


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_folder_with_train_val_test(tmp_path):
    rng = np.random.default_rng(5)
    classes = ["benign", "malignant", "normal"]
    files = {}
    for split, per_class in (("train", 3), ("val", 1), ("test", 2)):
        for c, name in enumerate(classes):
            for i in range(per_class):
                # mixed sizes and modes: grey, RGB, and a JPEG
                shape = [(20, 24), (40, 40, 3), (32, 32)][i % 3]
                arr = rng.integers(0, 256, shape, dtype=np.uint8)
                p = tmp_path / "ds" / split / name / (f"{i}.jpg" if (c, i) == (1, 1) else f"{i}.png")
                _png(p, arr)
                files.setdefault(split, []).append((p, c))
    (tmp_path / "ds" / "train" / "benign" / "notes.txt").write_text("ignored: not an image")
    data = load_dataset(tmp_path / "ds", input_size=S)
    assert data.labels == tuple(classes) and data.name == "ds" and not data.multilabel
    assert data.sizes() == {"train": 9, "val": 3, "test": 6}
    for split, items in files.items():
        s = data.split(split)
        assert s.labels.tolist() == [c for _, c in items]  # class order, files sorted
        for i, (p, _) in enumerate(items):
            assert torch.allclose(s.images[i], _expected(load_image_file(p)), atol=1e-5), p
    # the fingerprint is of the file listing: a new file changes it
    fp = data.fingerprint
    assert load_dataset(tmp_path / "ds", input_size=S).fingerprint == fp
    _png(tmp_path / "ds" / "test" / "normal" / "9.png", np.zeros((8, 8), np.uint8))
    assert load_dataset(tmp_path / "ds", input_size=S).fingerprint != fp


def test_folder_missing_split_or_classes_or_unreadable(tmp_path):
    for split in ("train", "test"):
        for name in ("a", "b"):
            _png(tmp_path / "ds" / split / name / "0.png", np.full((8, 8), 100, np.uint8))
    with pytest.raises(BadInputError, match="has a train/, test/ folder but no val/ folder"):
        load_dataset(tmp_path / "ds", input_size=S)
    for split in ("val", "test"):  # without train/ these are not two classes named "val" and "test"
        for name in ("a", "b"):
            _png(tmp_path / "notrain" / split / name / "0.png", np.full((8, 8), 100, np.uint8))
    with pytest.raises(BadInputError, match="has a val/, test/ folder but no train/ folder"):
        load_dataset(tmp_path / "notrain", input_size=S)
    _png(tmp_path / "one" / "only" / "0.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(BadInputError, match="needs one sub-folder per class \\(found 1\\)"):
        load_dataset(tmp_path / "one", input_size=S)
    _png(tmp_path / "flat" / "a" / "0.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "flat" / "b").mkdir()
    (tmp_path / "flat" / "b" / "0.png").write_bytes(b"truncated")
    with pytest.raises(BadInputError, match="unreadable image .*b/0.png"):
        load_dataset(tmp_path / "flat", input_size=S)


def test_single_folder_is_split_reproducibly_by_seed(tmp_path):
    # 40 images, each a flat grey level that identifies it (k) and whose class is k % 2
    for k in range(40):
        _png(tmp_path / "flat" / ("even" if k % 2 == 0 else "odd") / f"{k:02d}.png", np.full((16, 16), 5 * k + 10, np.uint8))

    def ids(data):
        out = {}
        for split in ("train", "val", "test"):
            s = data.split(split)
            ks = [round((float(img.mean()) * 255 - 10) / 5) for img in s.images]
            assert [k % 2 for k in ks] == s.labels.tolist()  # labels travel with their images
            out[split] = ks
        return out

    a = ids(load_dataset(tmp_path / "flat", input_size=S, seed=1))
    assert {k: len(v) for k, v in a.items()} == {"train": 28, "val": 4, "test": 8}  # 70/10/20
    assert sorted(a["train"] + a["val"] + a["test"]) == list(range(40))  # a partition: nothing lost or shared
    assert ids(load_dataset(tmp_path / "flat", input_size=S, seed=1)) == a  # same seed, same split
    assert ids(load_dataset(tmp_path / "flat", input_size=S, seed=2))["test"] != a["test"]


def test_csv_manifest_multilabel_with_split_column(tmp_path):
    rng = np.random.default_rng(6)
    rows = [("img/p0.png", "Effusion|Nodule", "train"), ("img/p1.png", "No Finding", "train"),
            ("img/p2.png", "Nodule", "train"), ("img/p3.png", "Atelectasis|Effusion|Nodule", "val"),
            ("img/p4.png", "No Finding", "test"), ("img/p5.png", "Atelectasis", "test")]
    arrays = {}
    for path, _, _ in rows:
        arrays[path] = rng.integers(0, 256, (48, 40), dtype=np.uint8)
        _png(tmp_path / path, arrays[path])
    (tmp_path / "nih.csv").write_text("path,label,split\n" + "".join(f"{p},{l},{s}\n" for p, l, s in rows))
    data = load_dataset(tmp_path / "nih.csv", input_size=S)
    assert data.multilabel and data.name == "nih"
    assert data.labels == ("Atelectasis", "Effusion", "No Finding", "Nodule")
    assert data.sizes() == {"train": 3, "val": 1, "test": 2}
    assert data.split("train").labels.tolist() == [[0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert data.split("val").labels.tolist() == [[1, 1, 0, 1]]
    assert torch.allclose(data.split("test").images[1], _expected(arrays["img/p5.png"]), atol=1e-5)
    # unknown split names and missing files are one-line errors
    (tmp_path / "badsplit.csv").write_text("path,label,split\nimg/p0.png,a,train\nimg/p1.png,b,training\n")
    with pytest.raises(BadInputError, match="unknown split name\\(s\\) training"):
        load_dataset(tmp_path / "badsplit.csv", input_size=S)
    (tmp_path / "missing.csv").write_text("path,label,split\nimg/p0.png,a,train\nimg/gone.png,b,train\n")
    with pytest.raises(BadInputError, match="row 3: image not found: img/gone.png"):
        load_dataset(tmp_path / "missing.csv", input_size=S)
    (tmp_path / "noheader.csv").write_text("img/p0.png,a\n")
    with pytest.raises(BadInputError, match="must be a CSV with a header"):
        load_dataset(tmp_path / "noheader.csv", input_size=S)
    # the manifest declared its test split: a dataset without one is refused when it is asked for
    (tmp_path / "notest.csv").write_text("path,label,split\nimg/p0.png,a,train\nimg/p1.png,b,val\n")
    with pytest.raises(BadInputError, match="has no 'test' split"):
        load_dataset(tmp_path / "notest.csv", input_size=S).split("test")


def test_csv_manifest_single_label_split_by_seed(tmp_path):
    for k in range(20):
        _png(tmp_path / f"{k}.png", np.full((8, 8), 10 * k, np.uint8))
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(f"{k}.png,{'cyst' if k % 2 else 'clear'}\n" for k in range(20)))
    data = load_dataset(tmp_path / "m.csv", input_size=S, seed=3)
    assert not data.multilabel and data.labels == ("clear", "cyst")
    assert data.sizes() == {"train": 14, "val": 2, "test": 4}
    for split in ("train", "val", "test"):
        s = data.split(split)
        ks = [round(float(img.mean()) * 255 / 10) for img in s.images]
        assert s.labels.tolist() == [k % 2 for k in ks]
    assert load_dataset(tmp_path / "m.csv", input_size=S, seed=3).fingerprint == data.fingerprint
    (tmp_path / "one.csv").write_text("path,label\n0.png,clear\n1.png,clear\n")
    with pytest.raises(BadInputError, match="single-label task needs at least 2 labels"):
        load_dataset(tmp_path / "one.csv", input_size=S)


def _dicom(path, pixels: np.ndarray, photometric: str, slope: float, intercept: float, window=None):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_csv_manifest_of_dicom_files(tmp_path):
    rng = np.random.default_rng(7)
    specs = [("MONOCHROME2", 1.0, 0.0, None), ("MONOCHROME1", 2.0, -1024.0, None),
             ("MONOCHROME2", 1.0, -1000.0, (500.0, 1500.0)), ("MONOCHROME1", 1.0, 0.0, (2000.0, 1000.0))]
    rows, paths = [], []
    for i, (photo, slope, intercept, window) in enumerate(specs):
        p = _dicom(tmp_path / "dcm" / f"{i}.dcm", rng.integers(0, 4096, (40, 36)), photo, slope, intercept, window)
        paths.append(p)
        rows.append(f"dcm/{i}.dcm,{'pneumonia' if i % 2 else 'normal'},{['train', 'train', 'val', 'test'][i]}\n")
    (tmp_path / "cxr.csv").write_text("path,label,split\n" + "".join(rows))
    data = load_dataset(tmp_path / "cxr.csv", input_size=S)
    assert data.labels == ("normal", "pneumonia") and data.sizes() == {"train": 2, "val": 1, "test": 1}
    loaded = torch.cat([data.split(s).images for s in ("train", "val", "test")])
    for i, p in enumerate(paths):
        assert torch.allclose(loaded[i], _expected(decode_dicom(p.read_bytes())), atol=1e-5), p
    assert data.split("train").labels.tolist() == [0, 1]
    # MONOCHROME1 is inverted: the same stored pixels read as the negative of MONOCHROME2
    px = np.tile(np.arange(0, 4000, 125, dtype=np.uint16), (32, 1))
    _dicom(tmp_path / "inv" / "m1.dcm", px, "MONOCHROME1", 1.0, 0.0)
    _dicom(tmp_path / "inv" / "m2.dcm", px, "MONOCHROME2", 1.0, 0.0)
    (tmp_path / "inv.csv").write_text("path,label,split\ninv/m1.dcm,a,train\ninv/m2.dcm,b,train\ninv/m2.dcm,b,val\ninv/m2.dcm,a,test\n")
    pair = load_dataset(tmp_path / "inv.csv", input_size=S).split("train").images
    assert pair[1, 0, 0, 0] < 0.05 and pair[1, 0, 0, -1] > 0.95
    assert torch.allclose(pair[0], 1.0 - pair[1], atol=1e-5)
    # a broken DICOM named in the manifest is refused before anything trains
    broken = tmp_path / "dcm" / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    (tmp_path / "broken.csv").write_text("path,label\ndcm/broken.dcm,a\ndcm/0.dcm,b\n")
    with pytest.raises(BadInputError, match="unreadable image .*broken.dcm: cannot decode DICOM"):
        load_dataset(tmp_path / "broken.csv", input_size=S)
