"""The adapter: an immutable value (tensors + metadata) and its safetensors file format.

File format ``medlego.svd-lora/1`` (documented in the README for other tools):

tensors
    ``blocks.{i}.q.A`` [r, d], ``blocks.{i}.q.E`` [r], ``blocks.{i}.q.B`` [d, r] and the same
    with ``v``, for every block i (r may differ per matrix); ``heads.{task}.weight`` [classes, d]
    and ``heads.{task}.bias`` [classes] for every task.
header metadata (each value a string; JSON where structured), exactly these keys
    ``format``, ``base``, ``tasks``, ``preprocess``, ``provenance``, ``created``.

Loading validates everything once and raises :class:`AdapterFormatError` (or
:class:`IncompatibleAdapterError` for a different base) with one line naming the problem.
Nothing is ever unpickled: the header is parsed as JSON here and the tensors by safetensors.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import math
import os
import re
import struct
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Generic, Iterator, Mapping, TypeVar

import torch

from .errors import AdapterFormatError, IncompatibleAdapterError

FORMAT = "medlego.svd-lora/1"
METADATA_KEYS = ("format", "base", "tasks", "preprocess", "provenance", "created")
TARGETS = ("q", "v")  # the adapted rows of the fused qkv output: Q = [0, d), V = [2d, 3d)
_TASK_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")  # no dots: the name is part of a tensor name
_HEX = re.compile(r"^[0-9a-f]+$")
_MAX_HEADER_BYTES = 64 * 1024 * 1024
# a borrowed parse views the immutable file bytes (parse_adapter's `borrow`), which torch warns about
# once: those views are never written, by contract
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning,
                        module=r"medlego\.runtime\.adapter")


@dataclass(frozen=True)
class LowRank:
    """One adapted matrix: ΔW = B · diag(E) · A."""

    A: torch.Tensor  # [r, d_in]
    E: torch.Tensor  # [r]
    B: torch.Tensor  # [d_out, r]

    @property
    def rank(self) -> int:
        return int(self.E.shape[0])

    def delta(self) -> torch.Tensor:
        """The dense ΔW [d_out, d_in] (for tests, folding and export; never on the request path)."""
        return (self.B * self.E) @ self.A

    @property
    def num_params(self) -> int:
        return self.A.numel() + self.E.numel() + self.B.numel()


@dataclass(frozen=True)
class TaskSpec:
    name: str
    labels: tuple[str, ...]
    multilabel: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_json(self) -> dict:
        return {"name": self.name, "labels": list(self.labels), "multilabel": self.multilabel}


@dataclass(frozen=True)
class BaseSpec:
    """What an adapter records about the base it was made for."""

    model: str  # timm name
    fingerprint: str  # hex sha256 of the frozen weights
    embed_dim: int
    depth: int

    def to_json(self) -> dict:
        return {"model": self.model, "fingerprint": self.fingerprint,
                "embed_dim": self.embed_dim, "depth": self.depth}


@dataclass(frozen=True)
class Preprocess:
    """decode → RGB (grey replicated) → resize to input_size² (bilinear, no crop) → [0,1] → (x-mean)/std."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels: int = 3

    def to_json(self) -> dict:
        return {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
                "channels": self.channels}


@dataclass(frozen=True)
class Head:
    weight: torch.Tensor  # [classes, d]
    bias: torch.Tensor  # [classes]


def find_task(tasks: tuple[TaskSpec, ...], name: str | None) -> TaskSpec:
    """The named task of an adapter's `tasks`, or the only one when name is None."""
    from .errors import TaskNotFoundError

    names = ", ".join(t.name for t in tasks)
    if name is None:
        if len(tasks) == 1:
            return tasks[0]
        raise TaskNotFoundError(f"adapter has {len(tasks)} tasks, name one of: {names}")
    for t in tasks:
        if t.name == name:
            return t
    raise TaskNotFoundError(f"unknown task '{name}'; this adapter has: {names}")


@dataclass(frozen=True, eq=False)
class Adapter:
    """An SVD-LoRA adapter: per block a Q and a V low-rank update, plus one head per task."""

    base: BaseSpec
    tasks: tuple[TaskSpec, ...]
    preprocess: Preprocess
    q: tuple[LowRank, ...]  # one per block
    v: tuple[LowRank, ...]  # one per block
    heads: Mapping[str, Head]
    provenance: Mapping = field(default_factory=dict)
    created: str = ""

    # -- accessors ---------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.q)

    def matrices(self) -> Iterator[tuple[int, str, LowRank]]:
        """Every adapted matrix as (block, 'q' | 'v', factors), in file order."""
        for i in range(self.depth):
            yield i, "q", self.q[i]
            yield i, "v", self.v[i]

    def matrix(self, block: int, target: str) -> LowRank:
        return (self.q if target == "q" else self.v)[block]

    @property
    def max_rank(self) -> int:
        return max(m.rank for _, _, m in self.matrices())

    def ranks(self) -> dict[str, int]:
        return {f"blocks.{i}.{t}": m.rank for i, t, m in self.matrices()}

    def task(self, name: str | None) -> TaskSpec:
        """The named task, or the only one when name is None."""
        return find_task(self.tasks, name)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def lora_params(self) -> int:
        return sum(m.num_params for _, _, m in self.matrices())

    @property
    def head_params(self) -> int:
        return sum(h.weight.numel() + h.bias.numel() for h in self.heads.values())

    def with_provenance(self, provenance: Mapping) -> "Adapter":
        return replace(self, provenance=dict(provenance))

    # -- file format ---------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, t, m in self.matrices():
            out[f"blocks.{i}.{t}.A"] = m.A.contiguous()
            out[f"blocks.{i}.{t}.E"] = m.E.contiguous()
            out[f"blocks.{i}.{t}.B"] = m.B.contiguous()
        for task in self.tasks:
            out[f"heads.{task.name}.weight"] = self.heads[task.name].weight.contiguous()
            out[f"heads.{task.name}.bias"] = self.heads[task.name].bias.contiguous()
        return out

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "base": json.dumps(self.base.to_json()),
            "tasks": json.dumps([t.to_json() for t in self.tasks]),
            "preprocess": json.dumps(self.preprocess.to_json()),
            "provenance": json.dumps(dict(self.provenance), sort_keys=True, default=str),
            "created": self.created or utc_now(),
        }

    def to_bytes(self) -> bytes:
        return serialize_safetensors(self.tensors(), self.metadata())


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def serialize_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """safetensors bytes with a deterministic header (sorted keys), so equal adapters hash equal.

    (The reference writer orders metadata by hash map, which changes the bytes from run to run.)
    """
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data section to 8 bytes
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_adapter(adapter: Adapter, path: str | os.PathLike) -> str:
    """Write atomically (temp file in the same folder, fsync, rename). Returns the sha256 of the file."""
    data = adapter.to_bytes()
    atomic_write(Path(path), data)
    return sha256_hex(data)


def current_umask() -> int:
    """The process's umask: read from /proc where there is one (setting it to read it, the only portable
    way, would change it for a moment under every other thread of the process)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes, tmp_prefix: str | None = None, mode: int = 0o666, *,
                 durable: bool = True) -> None:
    """Temp file in the same folder, fsync, rename: readers see the old file or the new one, never half.
    The file gets ``mode`` less the user's umask, as ``open(path, "w")`` would make it (mkstemp's own
    temp files are 0600 whatever the umask; pass ``mode=0o600`` for a secret). ``durable=False`` skips
    the fsync, for a cache whose every file is verified by its next reader anyway (a torn one is refetched)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=tmp_prefix or f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def top_directions(m: LowRank, rank: int) -> tuple[LowRank, float, float]:
    """The matrix's ``rank`` largest singular directions: (factors, dropped |E| mass, total |E| mass).

    SVD-LoRA's E is ordered (largest first) when A's rows and B's columns are orthonormal, as medlego's
    merge and conversion write them; E is sorted here by magnitude anyway (A's rows and B's columns
    permuted with it, which leaves ΔW unchanged), so the kept part is the best rank-``rank`` part of ΔW
    for such factors, and exactly what a merge capped at ``max_rank = rank`` keeps."""
    mass = m.E.abs().double()
    total = float(mass.sum())
    if m.rank <= rank:
        return m, 0.0, total
    order = torch.argsort(mass, descending=True, stable=True)
    keep, drop = order[:rank], order[rank:]
    return LowRank(m.A[keep].contiguous(), m.E[keep].contiguous(), m.B[:, keep].contiguous()), \
        float(mass[drop].sum()), total


def truncate_rank(adapter: Adapter, max_rank: int) -> tuple[Adapter, dict | None]:
    """The adapter served at rank ≤ ``max_rank``: every matrix above it keeps its top ``max_rank``
    singular directions (:func:`top_directions`). Returns (adapter, None) when nothing is above, else
    (truncated, report) with the share of singular-value mass dropped over all matrices (Σ dropped |E| /
    Σ |E|), the largest share dropped in one matrix, the adapter's rank and the served rank."""
    if adapter.max_rank <= max_rank:
        return adapter, None
    dropped = total = worst = 0.0
    qs, vs, above = [], [], 0
    for _, t, m in adapter.matrices():
        kept, d, tot = top_directions(m, max_rank)
        above += kept is not m
        dropped, total = dropped + d, total + tot
        worst = max(worst, d / tot if tot else 0.0)
        (qs if t == "q" else vs).append(kept)
    report = {"rank": adapter.max_rank, "served_rank": max_rank, "matrices_truncated": above,
              "dropped_mass": round(dropped / total, 6) if total else 0.0, "max_matrix_dropped_mass": round(worst, 6)}
    return replace(adapter, q=tuple(qs), v=tuple(vs)), report


def load_adapter(path: str | os.PathLike, *, expected_base: BaseSpec | None = None,
                 max_rank: int | None = None) -> Adapter:
    """Read and validate an adapter file (see :func:`parse_adapter`)."""
    p = Path(path)
    if not p.is_file():
        raise AdapterFormatError(f"adapter file not found: {p}")
    return parse_adapter(p.read_bytes(), expected_base=expected_base, max_rank=max_rank)


def read_header(data: bytes | bytearray) -> dict:
    """The safetensors JSON header, parsed without touching tensor data (and without pickle)."""
    if len(data) < 8:
        raise AdapterFormatError("not a safetensors file: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise AdapterFormatError("not a safetensors file: header length exceeds the file size")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"not a safetensors file: header is not JSON ({e.msg if isinstance(e, json.JSONDecodeError) else e})")
    except (RecursionError, ValueError):  # nested beyond the parser's depth, or an integer of thousands of digits
        raise AdapterFormatError("not a safetensors file: header JSON is nested too deeply or holds oversized numbers") from None
    if not isinstance(header, dict):
        raise AdapterFormatError("not a safetensors file: header is not a JSON object")
    return header


def parse_adapter(data: bytes | bytearray, *, expected_base: BaseSpec | None = None,
                  max_rank: int | None = None, borrow: bool = False) -> Adapter:
    """Validate the bytes of an adapter file and build the :class:`Adapter` value.

    ``expected_base``: the resident base; a different fingerprint (or shape) is refused.
    ``max_rank``: the largest rank the caller can serve; a larger matrix is refused.
    ``borrow``: the tensors are read-only views of `data` itself, no copy (the adapter pool packs
    them at once: one 600 KB copy less per cold load, cold_load.md); the caller must never write to
    them. Without it, the tensors own one fresh copy of the file.
    """
    header = read_header(data)
    metadata = header.get("__metadata__") or {}
    meta = _parse_metadata(metadata)
    tensors, whole = _views(header, data, borrow)
    return _build(meta, tensors, expected_base=expected_base, max_rank=max_rank, whole=whole)


# every dtype safetensors names: a non-float one is refused by _build with its name, not as corrupt
_VIEW_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


def _views(header: dict, data: bytes | bytearray,
           borrow: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The tensors as views of ONE buffer (safetensors' load copies tensor by tensor and cost most of a
    cold load), checked as strictly as safetensors checks them: known dtype, sizes that match the
    shape, and offsets that tile the data section exactly (no gap, no overlap). The buffer is `data`
    itself when `borrow`ing (read-only: see :func:`parse_adapter`), else a writable copy of it.
    Also returns the whole data section as one flat view when every tensor has one dtype, else None."""
    start = 8 + struct.unpack("<Q", data[:8])[0]
    buf = data if borrow else bytearray(data)
    # by (begin, end), then name: names are unique, so the dtypes after them are never compared
    specs = sorted([_tensor_spec(name, spec) for name, spec in header.items() if name != "__metadata__"])
    if [s[0] for s in specs] != [0] + [s[1] for s in specs[:-1]] or (specs[-1][1] if specs else 0) != len(data) - start:
        raise AdapterFormatError("corrupt safetensors payload: the tensors' offsets do not cover the data exactly")
    flat: dict[torch.dtype, torch.Tensor] = {}  # one view of the whole buffer per dtype: as_strided is the cheap op
    out, apart = {}, 0  # apart: tensors that are not views of their dtype's flat buffer
    for begin, _, name, dtype, shape in specs:
        offset, size = start + begin, dtype.itemsize
        if 0 in shape:
            out[name], apart = torch.empty(shape, dtype=dtype), apart + 1
        elif offset % size:  # not aligned to its element (another writer's padding): a view of its own
            out[name] = torch.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=offset).view(shape)
            apart += 1
        else:
            if dtype not in flat:
                flat[dtype] = torch.frombuffer(buf, dtype=dtype, count=len(buf) // size)
            out[name] = torch.as_strided(flat[dtype], shape, _contiguous_strides(shape), offset // size)
    whole = None
    if len(flat) == 1 and not apart:  # one dtype, and the tensors tile the data section: it is their data
        ((dtype, view),) = flat.items()
        whole = view[start // dtype.itemsize:]  # start is aligned: the first tensor's view is
    return out, whole


def _tensor_spec(name: str, spec) -> tuple[int, int, str, torch.dtype, tuple[int, ...]]:
    """One header entry as (begin, end, name, dtype, shape), or the one-line refusal. Sizes and offsets
    must be JSON integers, as safetensors requires (type checks here, not int() conversions: a third
    of the cost, 74 times per vit_base adapter)."""
    try:
        dtype = _VIEW_DTYPES[spec["dtype"]]
        shape = tuple(spec["shape"])
        begin, end = spec["data_offsets"]
        elements = 1
        for n in shape:
            if type(n) is not int or n < 0:
                raise TypeError
            elements *= n
        if type(begin) is not int or type(end) is not int:
            raise TypeError
    except (KeyError, TypeError, ValueError):
        raise AdapterFormatError(f"corrupt safetensors payload: bad header entry for tensor {name[:80]!r}") from None
    if not 0 <= begin <= end or end - begin != elements * dtype.itemsize:
        raise AdapterFormatError(f"corrupt safetensors payload: tensor {name[:80]!r} has offsets that do not "
                                 "match its shape and dtype")
    return begin, end, name, dtype, shape


@functools.lru_cache(maxsize=256)
def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


# -- validation ------------------------------------------------------------------------------

def _json_field(text, key: str):
    """One metadata value (a string of JSON, by the format) parsed, or the one-line refusal naming `key`."""
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):  # JSONDecodeError is a ValueError; so are 5000-digit numbers
        raise AdapterFormatError(f"metadata '{key}' is not valid JSON (or is nested too deeply)") from None


_Parsed = TypeVar("_Parsed")
_REMEMBERED_TEXT_CHARS = 4096  # a longer value (a task with thousands of labels) is parsed each time: bounded memory


class _ByText(Generic[_Parsed]):
    """`parse` of one metadata value, remembered per distinct text: the base, tasks and preprocessing of the
    adapters a node serves are a few short texts repeated in every file, and their values are immutable.
    A refusal is not remembered (lru_cache keeps no exception): a bad text is refused again each time. At
    most 256 texts of at most _REMEMBERED_TEXT_CHARS each, however large the headers that reach it."""

    def __init__(self, parse: Callable[[object], _Parsed]) -> None:
        self._parse = parse
        self._remembered = functools.lru_cache(maxsize=256)(parse)
        self.cache_info = self._remembered.cache_info

    def __call__(self, text: object) -> _Parsed:
        if isinstance(text, str) and len(text) <= _REMEMBERED_TEXT_CHARS:
            return self._remembered(text)
        return self._parse(text)  # a non-string (refused) or a long text, uncached


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _all_finite(tensors: list[torch.Tensor], whole: torch.Tensor | None) -> bool:
    """True when no tensor holds a NaN or an Inf; False when one may (the caller then checks each
    tensor, to name it). A sum propagates both, in one op over the data section where there is one
    (a per-tensor pass cost a cold load 0.12 ms); finite values that overflow the sum only cost the
    caller its per-tensor pass."""
    if whole is not None and whole.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return bool(torch.isfinite(whole.sum(dtype=torch.float32)))
    norms = torch._foreach_norm([t.float() for t in tensors])
    return bool(torch.isfinite(torch.stack(norms)).all())


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise AdapterFormatError(message)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _parse_metadata(metadata: Mapping[str, str]) -> dict:
    _need(isinstance(metadata, dict), "metadata is not a JSON object")
    fmt = metadata.get("format")
    _need(fmt is not None, f"missing metadata 'format' (expected '{FORMAT}'): not a medlego adapter")
    _need(fmt == FORMAT, f"unsupported adapter format '{fmt}' (expected '{FORMAT}')")
    for key in METADATA_KEYS:
        _need(key in metadata, f"missing metadata '{key}'")
    extra = sorted(set(metadata) - set(METADATA_KEYS))
    _need(not extra, f"unexpected metadata key(s): {', '.join(extra)} (allowed: {', '.join(METADATA_KEYS)})")
    base_spec = _parse_base(metadata["base"])
    tasks, preprocess = _parse_tasks(metadata["tasks"]), _parse_preprocess(metadata["preprocess"])
    provenance = _json_field(metadata["provenance"], "provenance")
    _need(isinstance(provenance, dict), "metadata 'provenance' must be a JSON object")
    created = metadata["created"]
    try:
        _dt.datetime.fromisoformat(created.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        raise AdapterFormatError(f"metadata 'created' is not an ISO 8601 time: {created!r}") from None
    return {"base": base_spec, "tasks": tasks, "preprocess": preprocess,
            "provenance": provenance, "created": created}


@_ByText
def _parse_base(text) -> BaseSpec:
    base = _json_field(text, "base")
    _need(isinstance(base, dict), "metadata 'base' must be a JSON object")
    for k in ("model", "fingerprint", "embed_dim", "depth"):
        _need(k in base, f"metadata 'base' lacks '{k}'")
    _need(isinstance(base["model"], str) and base["model"], "base.model must be a non-empty string")
    _need(isinstance(base["fingerprint"], str) and bool(_HEX.match(base["fingerprint"])),
          "base.fingerprint must be a lower-case hex string")
    _need(_is_int(base["embed_dim"]) and base["embed_dim"] > 0, "base.embed_dim must be a positive integer")
    _need(_is_int(base["depth"]) and base["depth"] > 0, "base.depth must be a positive integer")
    return BaseSpec(base["model"], base["fingerprint"], base["embed_dim"], base["depth"])


@_ByText
def _parse_tasks(text) -> tuple[TaskSpec, ...]:
    tasks_json = _json_field(text, "tasks")
    _need(isinstance(tasks_json, list) and bool(tasks_json), "metadata 'tasks' must be a non-empty JSON list")
    tasks: list[TaskSpec] = []
    for t in tasks_json:
        _need(isinstance(t, dict) and {"name", "labels", "multilabel"} <= set(t),
              "each task needs 'name', 'labels' and 'multilabel'")
        name, labels, ml = t["name"], t["labels"], t["multilabel"]
        _need(isinstance(name, str) and bool(_TASK_NAME.match(name)),
              f"task name {name!r} must be letters, digits, '_' or '-'")
        _need(isinstance(labels, list) and len(labels) >= 1 and all(isinstance(x, str) for x in labels),
              f"task '{name}': labels must be a non-empty list of strings")
        _need(len(set(labels)) == len(labels), f"task '{name}': labels are not unique")
        _need(isinstance(ml, bool), f"task '{name}': multilabel must be true or false")
        _need(ml or len(labels) >= 2, f"task '{name}': a single-label task needs at least 2 labels")
        tasks.append(TaskSpec(name, tuple(labels), ml))
    names = [t.name for t in tasks]
    _need(len(set(names)) == len(names), "task names are not unique")
    return tuple(tasks)


@_ByText
def _parse_preprocess(text) -> Preprocess:
    pp = _json_field(text, "preprocess")
    _need(isinstance(pp, dict), "metadata 'preprocess' must be a JSON object")
    for k in ("input_size", "mean", "std", "channels"):
        _need(k in pp, f"metadata 'preprocess' lacks '{k}'")
    _need(_is_int(pp["input_size"]) and pp["input_size"] > 0, "preprocess.input_size must be a positive integer")
    for k in ("mean", "std"):
        _need(isinstance(pp[k], list) and len(pp[k]) == 3 and all(_is_num(x) for x in pp[k]),
              f"preprocess.{k} must be a list of 3 numbers")
    _need(all(x > 0 for x in pp["std"]), "preprocess.std must be positive")
    _need(pp["channels"] == 3, f"preprocess.channels must be 3 (RGB; grey is replicated), got {pp['channels']!r}")
    mean, std = pp["mean"], pp["std"]  # three numbers each, checked above
    return Preprocess(pp["input_size"], (float(mean[0]), float(mean[1]), float(mean[2])),
                      (float(std[0]), float(std[1]), float(std[2])), 3)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_compatible(adapter_base: BaseSpec, resident: BaseSpec) -> None:
    """Refuse an adapter made for another base (one line naming both)."""
    if adapter_base.fingerprint != resident.fingerprint:
        raise IncompatibleAdapterError(
            f"adapter was made for base {adapter_base.model} (fingerprint {adapter_base.fingerprint[:16]}…), "
            f"but the resident base is {resident.model} (fingerprint {resident.fingerprint[:16]}…)")
    if (adapter_base.embed_dim, adapter_base.depth) != (resident.embed_dim, resident.depth):
        raise IncompatibleAdapterError(
            f"adapter base shape (embed_dim={adapter_base.embed_dim}, depth={adapter_base.depth}) differs from "
            f"the resident base (embed_dim={resident.embed_dim}, depth={resident.depth})")


@functools.lru_cache(maxsize=64)
def _tensor_names(depth: int, tasks: tuple[str, ...]) -> tuple[str, ...]:
    """The tensors an adapter of `depth` blocks and these tasks holds (cached: the same few shapes recur)."""
    names = [f"blocks.{i}.{t}.{k}" for i in range(depth) for t in TARGETS for k in "AEB"]
    return tuple(names + [f"heads.{task}.{k}" for task in tasks for k in ("weight", "bias")])


def _build(meta: dict, tensors: Mapping[str, torch.Tensor], *, expected_base: BaseSpec | None,
           max_rank: int | None, whole: torch.Tensor | None = None) -> Adapter:
    """The Adapter from parsed metadata and tensors, validated. `whole`: one flat view of exactly these
    tensors' data (the file's data section), when there is one: finiteness is then one pass over it."""
    base: BaseSpec = meta["base"]
    if expected_base is not None:
        check_compatible(base, expected_base)
    d, depth = base.embed_dim, base.depth
    expected = _tensor_names(depth, tuple(task.name for task in meta["tasks"]))
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise AdapterFormatError(f"missing tensor '{missing[0]}'{more}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise AdapterFormatError(f"unexpected tensor '{extra[0]}'{more}")

    for name in expected:
        if tensors[name].dtype not in _FLOAT_DTYPES:  # messages are formatted only on failure: cold-load cost
            raise AdapterFormatError(f"tensor '{name}' has dtype {tensors[name].dtype}, expected a floating-point dtype")
    if not _all_finite([tensors[n] for n in expected], whole):  # then per tensor, to name one
        for name in expected:
            _need(bool(torch.isfinite(tensors[name]).all()), f"tensor '{name}' has non-finite values (NaN or Inf)")

    def factors(i: int, t: str) -> LowRank:
        a, e, b = (tensors[f"blocks.{i}.{t}.{k}"] for k in "AEB")
        if a.dim() != 2 or a.shape[1] != d or a.shape[0] < 1:
            raise AdapterFormatError(f"tensor 'blocks.{i}.{t}.A' has shape {_shape(a)}, expected [r, {d}] with r >= 1")
        r = a.shape[0]
        if tuple(e.shape) != (r,):
            raise AdapterFormatError(f"tensor 'blocks.{i}.{t}.E' has shape {_shape(e)}, expected [{r}] "
                                     f"(rank from blocks.{i}.{t}.A)")
        if tuple(b.shape) != (d, r):
            raise AdapterFormatError(f"tensor 'blocks.{i}.{t}.B' has shape {_shape(b)}, expected [{d}, {r}] "
                                     f"(rank from blocks.{i}.{t}.A)")
        if max_rank is not None and r > max_rank:
            raise AdapterFormatError(f"matrix 'blocks.{i}.{t}' has rank {r}, above the configured maximum {max_rank}")
        return LowRank(a, e, b)

    q = tuple(factors(i, "q") for i in range(depth))
    v = tuple(factors(i, "v") for i in range(depth))
    heads: dict[str, Head] = {}
    for task in meta["tasks"]:
        w, bias = tensors[f"heads.{task.name}.weight"], tensors[f"heads.{task.name}.bias"]
        c = task.num_classes
        _need(w.dim() == 2 and w.shape[1] == d,
              f"tensor 'heads.{task.name}.weight' has shape {_shape(w)}, expected [{c}, {d}]")
        _need(w.shape[0] == c, f"head '{task.name}' has {w.shape[0]} classes but task '{task.name}' has {c} labels")
        _need(tuple(bias.shape) == (c,), f"tensor 'heads.{task.name}.bias' has shape {_shape(bias)}, expected [{c}]")
        heads[task.name] = Head(w, bias)
    return Adapter(base=base, tasks=meta["tasks"], preprocess=meta["preprocess"], q=q, v=v, heads=heads,
                   provenance=meta["provenance"], created=meta["created"])
