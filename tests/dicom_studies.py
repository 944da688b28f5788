"""DICOM studies and STOW-RS bodies for the DICOM door tests (issue 28), built here with pydicom:
a chest radiograph with patient attributes (which must never reach a log or an audit row), an
encapsulated PDF, multipart/related bodies (optionally sent chunked), and readers of an SR's content."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

PATIENT_NAME, PATIENT_ID, BIRTH_DATE = "Doe^Jane", "PID-31415926", "19610704"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
MULTIFRAME_STORAGE = "1.2.840.10008.5.1.4.1.1.7.2"  # Multi-frame Grayscale Byte Secondary Capture


def _dataset(sop_class: str, modality: str, study_uid: str | None = None,
             syntax: str = ExplicitVRLittleEndian) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(syntax)
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = PATIENT_NAME, PATIENT_ID, BIRTH_DATE, "F"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "101010", "ACC1", "1"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, 1
    return ds


def _save(ds) -> bytes:
    fp = io.BytesIO()
    pydicom.dcmwrite(fp, ds, enforce_file_format=True)
    return fp.getvalue()


def chest_cr(modality: str = "CR", rows: int = 48, cols: int = 40, seed: int = 0, study_uid: str | None = None,
             frames: int = 1, syntax: str = ExplicitVRLittleEndian) -> tuple[bytes, FileDataset]:
    """A chest radiograph (8-bit grey; `frames` of them: a multi-frame image), as a Part 10 file and its
    data set; `syntax`: its transfer syntax (native ones: pixels are written as they are)."""
    ds = _dataset(CR_STORAGE if frames == 1 else MULTIFRAME_STORAGE, modality, study_uid, syntax)
    ds.BodyPartExamined, ds.SeriesDescription = "CHEST", "PA"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 256, (frames, rows, cols), dtype=np.uint8).tobytes()
    if frames > 1:
        ds.NumberOfFrames = frames
    return _save(ds), ds


def pdf(study_uid: str | None = None) -> tuple[bytes, FileDataset]:
    """An Encapsulated PDF instance: not an image."""
    ds = _dataset(PDF_STORAGE, "DOC", study_uid)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    ds.BurnedInAnnotation, ds.DocumentTitle = "NO", "report"
    return _save(ds), ds


def multipart(files: list[bytes], chunk: int | None = None):
    """A STOW-RS body and its content type; with `chunk`, an iterator of pieces (sent chunked, no length)."""
    boundary = uuid.uuid4().hex
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f + b"\r\n"
                    for f in files) + b"--" + boundary.encode() + b"--\r\n"
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
    if chunk is None:
        return body, ctype
    return (body[i:i + chunk] for i in range(0, len(body), chunk)), ctype


def parse_multipart(body: bytes, ctype: str) -> list[tuple[str, bytes]]:
    """(content type, bytes) of each part of a multipart answer."""
    boundary = ctype.split("boundary=")[1].split(";")[0].strip('"').encode()
    out = []
    for raw in body.split(b"--" + boundary)[1:]:
        if raw.startswith(b"--"):
            break
        head, _, data = raw[2:].partition(b"\r\n\r\n")
        ctype_line = [h for h in head.split(b"\r\n") if h.lower().startswith(b"content-type:")][0]
        out.append((ctype_line.split(b":", 1)[1].strip().decode(), data[:-2]))
    return out


def walk(sequence):
    """Every content item of an SR content tree, depth first."""
    for item in sequence:
        yield item
        if "ContentSequence" in item:
            yield from walk(item.ContentSequence)


def measurements(items) -> dict[tuple[str, str], float]:
    """(code value, scheme) of each NUM item's concept -> its exact (FD) value."""
    out = {}
    for i in items:
        if i.ValueType == "NUM":
            name = i.ConceptNameCodeSequence[0]
            out[(name.CodeValue, name.CodingSchemeDesignator)] = float(i.MeasuredValueSequence[0].FloatingPointValue)
    return out


def start_audited_server(base_file, data_dir, adapters: list[str]):
    """An embedded server with an audit log and one random adapter per name (seeds 7, 8, …)."""
    from medlego.jobs.synthetic import random_adapter
    from medlego.runtime.base import load_base
    from medlego.runtime.config import AuditConfig, BatchingConfig, EngineConfig
    from medlego.runtime.engine import Engine
    from medlego.runtime.registry import Registry
    from medlego.runtime.registry import audit
    from medlego.serving.server import EmbeddedServer
    from medlego.serving.service import DiagnosisService

    base = load_base("vit_tiny_patch16_224", base_file)
    reg = Registry(data_dir, base=base.spec, max_rank=16, input_size=base.input_size)
    for n, name in enumerate(adapters):
        reg.register(name, random_adapter(base.spec, base.preprocess, rank=4, seed=7 + n).to_bytes())
    log = audit.AuditLog(reg.index, AuditConfig(flush_interval_s=0.05))
    service = DiagnosisService(Engine(base, reg, EngineConfig(slots=4)), audit=log,
                               batching=BatchingConfig(max_batch=8, max_wait_ms=2))
    return EmbeddedServer(service, host="127.0.0.1", port=0, grpc_port=None).start()
