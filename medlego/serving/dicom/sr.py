"""A diagnosis as a DICOM Comprehensive SR (highdicom), TID 1500 Measurement Report.

One SR per (instance, adapter): same patient and study as the source instance, a series of its own,
the source instance as evidence (Current Requested Procedure Evidence) and as the measurement
group's source image. The group (TID 1501) carries the algorithm (the adapter's name and version,
its sha256, medlego's version and the task as parameters), the top label as its finding type, and one
measurement per label: the label's code (the rules file's, or the label in the local scheme
99MEDLEGO) valued with its probability, unit UCUM "1". The observer is the medlego device.
"""

from __future__ import annotations

from typing import Callable

from medlego import __version__

# procedure reported: SNOMED CT "Imaging (procedure)"; the probability's unit: UCUM "1" (a ratio)
_PROCEDURE = ("363679005", "SCT", "Imaging procedure")
_UNIT = ("1", "UCUM", "no units")
SERIES_NUMBER = 9901  # SR series get a number of their own, past the scanner's usual range
MAX_MEASUREMENTS = 100  # labels in one SR, by probability (a task may have hundreds)
MANUFACTURER = "medlego"


def build_sr(header, answer: dict, code_of: Callable[[str], tuple[str, str, str]], frame: int = 1):
    """The SR (a pydicom Dataset) of one diagnosis `answer` (``/v1/diagnose``'s JSON) of the instance
    whose header is `header`; `code_of(label)` gives (value, scheme, meaning)."""
    from highdicom.sr import (AlgorithmIdentification, CodedConcept, ComprehensiveSR, DeviceObserverIdentifyingAttributes,
                              Measurement, MeasurementReport, MeasurementsAndQualitativeEvaluations, ObservationContext,
                              ObserverContext, SourceImageForMeasurementGroup, TrackingIdentifier)
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    ref = f"{answer['adapter']}@{answer['version']}"
    task = answer.get("task") or ""
    algorithm = AlgorithmIdentification(name=str(answer["adapter"])[:64], version=str(answer["version"]),
                                        parameters=[f"sha256={answer['sha256']}", f"medlego={__version__}",
                                                    f"task={task}"])
    concept = lambda c: CodedConcept(value=c[0], scheme_designator=c[1], meaning=c[2])  # noqa: E731
    probabilities = sorted((answer.get("probabilities") or {}).items(), key=lambda kv: -kv[1])[:MAX_MEASUREMENTS]
    measurements = [Measurement(name=concept(code_of(label)), value=float(p), unit=concept(_UNIT),
                                algorithm_id=algorithm) for label, p in probabilities]
    frames = [frame] if int(getattr(header, "NumberOfFrames", 1) or 1) > 1 else None
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=generate_uid(), identifier=f"medlego {ref} {task}"[:64]),
        finding_type=concept(code_of(probabilities[0][0])) if probabilities else None,
        algorithm_id=algorithm, measurements=measurements,
        source_images=[SourceImageForMeasurementGroup(header.SOPClassUID, header.SOPInstanceUID, frames)])
    device = DeviceObserverIdentifyingAttributes(uid=generate_uid(entropy_srcs=["medlego device"]), name="medlego",
                                                 manufacturer_name=MANUFACTURER, model_name=ref[:64])
    context = ObservationContext(observer_device_context=ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    report = MeasurementReport(observation_context=context, procedure_reported=concept(_PROCEDURE),
                               imaging_measurements=[group])
    sr = ComprehensiveSR(evidence=[header], content=report, series_instance_uid=generate_uid(),
                         series_number=SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=1,
                         manufacturer=MANUFACTURER, is_complete=True, series_description=f"medlego {ref}"[:64])
    sr.SoftwareVersions = __version__
    return sr


def encode(sr) -> bytes:
    """The SR as a DICOM Part 10 file."""
    import io

    fp = io.BytesIO()
    sr.save_as(fp, enforce_file_format=True)
    return fp.getvalue()
