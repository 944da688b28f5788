"""The Open Inference Protocol (KServe v2), transport-free: models, tensors, metadata and inference.

Each registered adapter is a *model* of the protocol: its name (or an alias) is the model name,
its registry version the model version (``/v2/models/blood/versions/2``; no version: the latest,
or the alias's target). The REST routes (``kserve_rest.py``) and the gRPC service
``inference.GRPCInferenceService`` (``kserve_grpc.py``) parse their wire formats into
:class:`Tensor` values and call :func:`infer`, which goes through the serving contract (the same
batcher as ``/v1``, the same limits and metrics, ``api="v2"``).

Tensors:

* inputs: ``image`` (BYTES ``[N]``: each element one encoded PNG, JPEG or DICOM file) or
  ``pixel_values`` (FP32 ``[N, 3, S, S]``, already preprocessed as the model's ``preprocess``
  parameter says); an optional ``task`` (BYTES ``[1]`` or ``[N]``);
* output: ``probabilities`` (FP32 ``[N, C]``, in the task's label order).

``pixel_values`` skips decoding, so it is served where the engine runs (the embedded server,
through its batcher); under Ray the ingress has no engine and answers it with a 400 that says so.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

from medlego.runtime.errors import AdapterNotFoundError, BadInputError, MedlegoError

from . import limits as checks
from .contract import DiagnoseItem, DiagnosisAPI

SERVER_NAME = "medlego"
EXTENSIONS = ("binary_tensor_data",)  # the REST binary tensor extension (Inference-Header-Content-Length)
PLATFORM = "medlego_svd_lora"
INPUT_IMAGE, INPUT_PIXELS, INPUT_TASK, OUTPUT = "image", "pixel_values", "task", "probabilities"
DATATYPES = {"BYTES", "FP32", "FP64", "FP16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32",
             "UINT64", "BOOL", "BF16"}
_MAX_DIMS = 8


def server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medlego")
    except PackageNotFoundError:
        return "0"


@dataclass
class Tensor:
    """One input tensor: BYTES as a list of bytes, FP32 as a float32 array of `shape`."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    value: list[bytes] | np.ndarray


# -- wire helpers shared by REST and gRPC ---------------------------------------------------------
def check_shape(name: str, shape) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or len(shape) > _MAX_DIMS:
        raise BadInputError(f"input '{name}': 'shape' must be a list of at most {_MAX_DIMS} integers")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 1 << 31 for d in shape):
        raise BadInputError(f"input '{name}': 'shape' must hold non-negative integers, got {shape!r:.80}")
    return tuple(shape)


def elements(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def unpack_bytes(name: str, raw: bytes, count: int) -> list[bytes]:
    """The BYTES wire form (each element: 4-byte little-endian length, then its bytes) → `count` elements."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise BadInputError(f"input '{name}': truncated BYTES element length at offset {pos}")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise BadInputError(f"input '{name}': BYTES element of {n} bytes runs past the end of the data")
        out.append(raw[pos:pos + n])
        pos += n
    if len(out) != count:
        raise BadInputError(f"input '{name}': {len(out)} BYTES elements for a shape of {count} elements")
    return out


def fp32_from_raw(name: str, raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    if len(raw) != 4 * elements(shape):
        raise BadInputError(f"input '{name}': {len(raw)} bytes of FP32 data for shape {list(shape)} "
                            f"({4 * elements(shape)} expected)")
    return np.frombuffer(raw, dtype="<f4").reshape(shape)


def fp32_from_values(name: str, values, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise BadInputError(f"input '{name}': FP32 data must be numbers") from None
    if arr.size != elements(shape):
        raise BadInputError(f"input '{name}': {arr.size} values for shape {list(shape)}")
    return arr.reshape(shape)


# -- models ---------------------------------------------------------------------------------------
def model_ref(name: str, version: str | None) -> str:
    """Model name (adapter name or alias) + optional version → a registry reference."""
    name = checks.check_text(name, "model name", required=True) or ""
    if "@" in name:
        raise BadInputError(f"model name '{name}' contains '@': give the version as the model version")
    if not version:
        return name
    if not (version.isascii() and version.isdigit() and len(version) <= 9 and int(version) >= 1):
        raise AdapterNotFoundError(f"model '{name}' has no version '{version:.40}' (versions are 1, 2, ...)")
    return f"{name}@{int(version)}"


def _label_count(tasks: list[dict]) -> int:
    counts = {len(t["labels"]) for t in tasks}
    return counts.pop() if len(counts) == 1 else -1


def metadata(desc: dict, name: str) -> dict:
    """The protocol's model metadata (REST JSON form) of a registry description; parameters are strings."""
    tasks = desc.get("tasks") or []
    pre = desc.get("preprocess") or {}
    s = int(pre.get("input_size") or -1)
    params = {
        "ref": desc["ref"], "sha256": desc["sha256"],
        "labels": json.dumps(tasks[0]["labels"] if len(tasks) == 1 else {t["name"]: t["labels"] for t in tasks}),
        "tasks": json.dumps(tasks), "preprocess": json.dumps(pre), "aliases": json.dumps(desc.get("aliases", [])),
    }
    return {
        "name": name, "versions": [str(v) for v in desc.get("versions", [desc["version"]])], "platform": PLATFORM,
        "inputs": [{"name": INPUT_IMAGE, "datatype": "BYTES", "shape": [-1]},
                   {"name": INPUT_PIXELS, "datatype": "FP32", "shape": [-1, 3, s, s]},
                   {"name": INPUT_TASK, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, _label_count(tasks)]}],
        "parameters": params,
    }


async def model_metadata(api: DiagnosisAPI, name: str, version: str | None) -> dict:
    return metadata(await api.describe(model_ref(name, version)), name)


async def model_ready(api: DiagnosisAPI, name: str, version: str | None) -> bool:
    """True when the model exists and the server is ready; an unknown model raises its 404."""
    await api.describe(model_ref(name, version))
    return bool((await api.health()).get("ready"))


async def server_ready(api: DiagnosisAPI) -> bool:
    return bool((await api.health()).get("ready"))


# -- inference ------------------------------------------------------------------------------------
@dataclass
class InferResult:
    model_name: str
    model_version: str
    probabilities: np.ndarray  # float32 [N, C]
    parameters: dict[str, str]  # the answer's: the adapter that answered, and a rank truncation when there is one


def _texts(t: Tensor) -> list[str | None]:
    if t.datatype != "BYTES" or not isinstance(t.value, list):
        raise BadInputError(f"input '{t.name}' must be BYTES")
    out = []
    for v in t.value:
        try:
            out.append(v.decode("utf-8"))
        except UnicodeDecodeError:
            raise BadInputError(f"input '{t.name}' is not UTF-8 text") from None
    return out


def _tasks(tensors: dict[str, Tensor], n: int) -> list[str | None]:
    t = tensors.get(INPUT_TASK)
    if t is None:
        return [None] * n
    names = _texts(t)
    if len(names) == 1:
        return names * n
    if len(names) != n:
        raise BadInputError(f"input 'task' has {len(names)} elements; give 1 or one per image ({n})")
    return [x or None for x in names]


def _by_name(inputs: list[Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for t in inputs:
        if t.name not in (INPUT_IMAGE, INPUT_PIXELS, INPUT_TASK):
            raise BadInputError(f"unknown input '{t.name:.60}': this model takes '{INPUT_IMAGE}' (BYTES) or "
                                f"'{INPUT_PIXELS}' (FP32), and optionally '{INPUT_TASK}' (BYTES)")
        if t.name in out:
            raise BadInputError(f"input '{t.name}' given twice")
        out[t.name] = t
    if (INPUT_IMAGE in out) == (INPUT_PIXELS in out):
        raise BadInputError(f"give exactly one of the inputs '{INPUT_IMAGE}' (BYTES [N], encoded PNG/JPEG/DICOM) "
                            f"and '{INPUT_PIXELS}' (FP32 [N, 3, S, S])")
    return out


def check_outputs(requested: list[str]) -> None:
    for name in requested:
        if name != OUTPUT:
            raise BadInputError(f"unknown output '{name:.60}': this model has one output, '{OUTPUT}'")


async def infer(api: DiagnosisAPI, name: str, version: str | None, inputs: list[Tensor],
                requested_outputs: list[str]) -> InferResult:
    check_outputs(requested_outputs)
    ref = model_ref(name, version)
    tensors = _by_name(inputs)
    if INPUT_IMAGE in tensors:
        t = tensors[INPUT_IMAGE]
        if t.datatype != "BYTES" or len(t.shape) != 1:
            raise BadInputError(f"input '{INPUT_IMAGE}' must be BYTES of shape [N] (one encoded file per element)")
        images = t.value
        assert isinstance(images, list)
        if not images:
            raise BadInputError(f"input '{INPUT_IMAGE}' has no elements")
        tasks = _tasks(tensors, len(images))
        items = [DiagnoseItem(image=img, adapter=ref, task=task) for img, task in zip(images, tasks)]
    else:
        t = tensors[INPUT_PIXELS]
        if t.datatype != "FP32" or len(t.shape) != 4 or t.shape[1] != 3 or t.shape[2] != t.shape[3]:
            raise BadInputError(f"input '{INPUT_PIXELS}' must be FP32 of shape [N, 3, S, S], got {t.datatype} "
                                f"{list(t.shape)}")
        pixels = t.value
        assert isinstance(pixels, np.ndarray)
        if pixels.shape[0] < 1:
            raise BadInputError(f"input '{INPUT_PIXELS}' has no images")
        if not np.isfinite(pixels).all():
            raise BadInputError(f"input '{INPUT_PIXELS}' contains NaN or infinite values")
        tasks = _tasks(tensors, pixels.shape[0])
        items = [DiagnoseItem(image=b"", adapter=ref, task=task, pixels=pixels[i]) for i, task in enumerate(tasks)]
    # the service's own path for both inputs: admission, the batcher (mixed with /v1), counters as api="v2"
    answers = [await api.diagnose(items[0], api="v2")] if len(items) == 1 else await api.diagnose_many(items, api="v2")
    version_out = str(answers[0]["version"])
    probs = np.asarray([list(a["probabilities"].values()) for a in answers], dtype=np.float32)
    if len({len(a["probabilities"]) for a in answers}) != 1:
        raise BadInputError("the tasks asked for have different label counts; send one request per task")
    return InferResult(name, version_out, probs, answer_parameters(answers[0]))


def answer_parameters(answer: dict) -> dict[str, str]:
    """The response's `parameters` (strings, as the protocol's clients read them): which adapter file
    answered and, when the server serves it above its max_rank, what the truncation dropped."""
    params = {"ref": f"{answer['adapter']}@{answer['version']}", "sha256": answer["sha256"] or ""}
    if answer.get("rank_truncation"):
        params["rank_truncation"] = json.dumps(answer["rank_truncation"], sort_keys=True)
    return params


def error_message(e: BaseException) -> str:
    return str(e) if isinstance(e, MedlegoError) else "internal server error"
