"""Adapter files parsed straight into the pool's packed form, once their table of factors is known.

Every adapter made for one base at one rank has the same safetensors entries for its block factors
(names, dtype, shapes and offsets); only the metadata, the heads and the numbers differ. The first
file with such a table is parsed and validated in full by
:func:`~medlego.runtime.adapter.parse_adapter`, whose checks and one-line refusals stay the only
ones; what that validation proved about the block factors' entries is then remembered as a
*layout*: where each matrix's factors lie in the data section. A later file whose entries for the
block factors are that same text is packed with one row gather, instead of ~74 views, shape checks
and stacks: most of a host load on a node that serves thousands of adapters (scale_bench.md).

What depends on a file's own bytes is still checked on every file: the header's framing, the
metadata (the base, tasks and preprocessing texts parsed once per distinct text), the base's
fingerprint and shape, the rank against the caller's maximum, the heads' entries against the
file's tasks (names, shapes, dtype, and that they tile the rest of the data), and that every number
is finite. Anything the layout does not cover (another header form or key order, several dtypes,
mixed ranks, a non-finite value) takes the full parse, which then refuses the file with its usual
message or serves it."""

from __future__ import annotations

import json
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .adapter import (_MAX_HEADER_BYTES, _VIEW_DTYPES, TARGETS, Adapter, BaseSpec, Head, Preprocess, TaskSpec,
                      _parse_metadata, _tensor_spec, check_compatible, parse_adapter)
from .errors import AdapterFormatError
from .lora import pack_adapter

# medlego's writer (and safetensors' own) put the metadata first: its end is where the table's text starts
_PREFIX = '{"__metadata__":'
_DECODER = json.JSONDecoder()
_JSON_SPACE = " \t\n\r"
MAX_LAYOUTS = 32  # distinct tables remembered per process: a node serves a few bases and ranks


@dataclass(frozen=True)
class PackedFile:
    """A validated adapter file in the pool's layout: A [L, 2, r, D], E [L, 2, r], B [L, 2, D, r] in memory of
    their own, never the file's (index 0 = Q, 1 = V), and the heads as read-only views of the file's bytes."""

    base: BaseSpec
    tasks: tuple[TaskSpec, ...]
    preprocess: Preprocess
    a: torch.Tensor
    e: torch.Tensor
    b: torch.Tensor
    heads: dict[str, Head]

    @property
    def rank(self) -> int:
        return int(self.e.shape[-1])


@dataclass(frozen=True)
class _Layout:
    """What one validated table of block factors says about every file that has it. The writers order
    entries by name, so each matrix's A, B, E lie together, in that order: the block factors are 2L rows of
    [A (r·D) | B (D·r) | E (r)], in the names' order (blocks.0, blocks.1, blocks.10, …), and the heads follow."""

    dtype: torch.dtype
    shape: tuple[int, int]  # (embed_dim, depth) the table was validated with
    rank: int
    rows: torch.Tensor  # [2L]: the row of (block i, Q or V) is rows[2i + (0 Q, 1 V)]
    blocks_bytes: int  # the rows tile the data section's first bytes; the heads tile the rest

    def pack(self, whole: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A [L, 2, r, D], E [L, 2, r], B [L, 2, D, r]: views of one copy of the rows, in block order."""
        (d, depth), r = self.shape, self.rank
        rd = r * d
        g = whole[:2 * depth * (2 * rd + r)].view(2 * depth, 2 * rd + r).index_select(0, self.rows).to(dtype)
        return g[:, :rd].view(depth, 2, r, d), g[:, 2 * rd:].view(depth, 2, r), g[:, rd:2 * rd].view(depth, 2, d, r)


# the block factors' table text (everything before the first head) -> layout, LRU. The heads are not in
# the key: adapters for different tasks (names, classes) share one layout; each file's heads are checked
_layouts: OrderedDict[str, _Layout] = OrderedDict()
_lock = threading.Lock()
_HEADS = ',"heads.'  # where the heads' entries begin in the sorted table of medlego's writer


def parse_packed(data: bytes | bytearray, *, expected_base: BaseSpec | None = None, max_rank: int | None = None,
                 dtype: torch.dtype = torch.float32) -> PackedFile:
    """Validate an adapter file (as :func:`parse_adapter` does, with its refusals) and pack its factors in
    ``dtype``. The heads are views of ``data``: the caller copies them and never writes to them."""
    split = _split_header(data)
    if split is not None:
        packed = _from_layout(data, split, expected_base, max_rank, dtype)
        if packed is not None:
            return packed
    adapter = parse_adapter(data, expected_base=expected_base, max_rank=max_rank, borrow=True)
    if split is not None:
        _learn(split, adapter)
    a, e, b = pack_adapter(adapter, None, dtype, "cpu")
    return PackedFile(adapter.base, adapter.tasks, adapter.preprocess, a, e, b, dict(adapter.heads))


def known_layouts() -> int:
    """How many tables of block factors this process remembers."""
    with _lock:
        return len(_layouts)


def _split_header(data: bytes | bytearray) -> tuple[dict, str, int] | None:
    """(metadata, the tensor table's text, where the data section starts) when the header is framed
    soundly and begins with the metadata object; None otherwise (the full parse reads it, or refuses it)."""
    if len(data) < 8:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(_MAX_HEADER_BYTES, len(data) - 8):
        return None
    try:
        text = bytes(data[8:8 + n]).decode("utf-8")
        if not text.startswith(_PREFIX):
            return None
        metadata, end = _DECODER.raw_decode(text, len(_PREFIX))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    # the writers pad the header with spaces to align the data, so the padding differs with the metadata's
    # length: it is not part of the table (only JSON's own whitespace is: a text ending otherwise is no header)
    return (metadata, text[end:].rstrip(_JSON_SPACE), 8 + n) if isinstance(metadata, dict) else None


def _from_layout(data: bytes | bytearray, split: tuple[dict, str, int], expected_base: BaseSpec | None,
                 max_rank: int | None, dtype: torch.dtype) -> PackedFile | None:
    """The file packed by its known layout, after the checks of its own bytes; None where the full parse must decide."""
    metadata, table, start = split
    cut = table.find(_HEADS)
    with _lock:
        layout = _layouts.get(table[:cut]) if cut > 0 else None
        if layout is not None:
            _layouts.move_to_end(table[:cut])
    if layout is None:
        return None
    meta = _parse_metadata(metadata)  # the same refusals, in the same order, as the full parse
    base, tasks = meta["base"], meta["tasks"]
    if expected_base is not None:
        check_compatible(base, expected_base)
    size = layout.dtype.itemsize
    if (base.embed_dim, base.depth) != layout.shape or (max_rank is not None and layout.rank > max_rank) \
            or start % size:
        return None
    heads = _heads(table[cut:], tasks, layout, len(data) - start)
    if heads is None:
        return None
    whole = torch.frombuffer(data, dtype=layout.dtype, count=(len(data) - start) // size, offset=start)
    # a sum propagates NaN and Inf; one that overflows from finite values also goes to the full parse,
    # which checks each tensor and names the bad one
    if not bool(torch.isfinite(whole.sum(dtype=torch.float64 if layout.dtype == torch.float64 else torch.float32))):
        return None
    a, e, b = layout.pack(whole, dtype)
    d = base.embed_dim
    views = {name: Head(whole[w:w + c * d].view(c, d), whole[bias:bias + c]) for name, (w, c, bias) in heads.items()}
    return PackedFile(base, tasks, meta["preprocess"], a, e, b, views)


def _heads(text: str, tasks: tuple[TaskSpec, ...], layout: _Layout, data_bytes: int) -> dict | None:
    """{task: (weight's first element, classes, bias's first element)} when the table's heads are exactly
    what the full parse accepts for these tasks, in the layout's dtype, tiling the data after the block
    factors; None otherwise (the full parse then refuses the file, or serves it)."""
    try:
        entries = json.loads("{" + text[1:])
    except (ValueError, RecursionError):
        return None
    d, size = layout.shape[0], layout.dtype.itemsize
    wanted = {f"heads.{t.name}.{k}": (t.name, k, [t.num_classes, d] if k == "weight" else [t.num_classes])
              for t in tasks for k in ("weight", "bias")}
    if set(entries) != set(wanted):
        return None
    spans, out = [], {}
    for name, (task, kind, shape) in wanted.items():
        try:  # the full parse's own check of an entry (JSON integers, a known dtype, sizes that match)
            begin, end, _, dtype, got = _tensor_spec(name, entries[name])
        except AdapterFormatError:
            return None
        if dtype != layout.dtype or list(got) != shape or begin % size:
            return None
        spans.append((begin, end))
        out.setdefault(task, [0, shape[0], 0])[0 if kind == "weight" else 2] = begin // size
    spans.sort()
    if [b for b, _ in spans] != [layout.blocks_bytes] + [e for _, e in spans[:-1]] or spans[-1][1] != data_bytes:
        return None
    return {task: tuple(v) for task, v in out.items()}


def _learn(split: tuple[dict, str, int], adapter: Adapter) -> None:
    """Remember the block factors' table of a file the full parse has just accepted, when a row gather can pack
    it: the blocks' entries first and tiling the data's first bytes, one dtype, one rank for every matrix."""
    _, table, _ = split
    cut = table.find(_HEADS)
    ranks = {m.rank for _, _, m in adapter.matrices()}
    if cut <= 0 or not table.startswith(",") or len(ranks) != 1:
        return
    entries = json.loads("{" + table[1:cut] + "}")  # valid: whole members of the header just accepted
    names = {f"blocks.{i}.{t}.{k}" for i in range(adapter.depth) for t in TARGETS for k in "AEB"}
    if set(entries) != names or len({spec["dtype"] for spec in entries.values()}) != 1:
        return
    spans = sorted(tuple(spec["data_offsets"]) for spec in entries.values())
    if [b for b, _ in spans] != [0] + [e for _, e in spans[:-1]]:
        return
    dtype = _VIEW_DTYPES[next(iter(entries.values()))["dtype"]]
    layout = _rows(entries, adapter, dtype, ranks.pop(), spans[-1][1])
    if layout is None:
        return
    with _lock:
        _layouts[table[:cut]] = layout
        _layouts.move_to_end(table[:cut])
        while len(_layouts) > MAX_LAYOUTS:
            _layouts.popitem(last=False)


def _rows(entries: dict, adapter: Adapter, dtype: torch.dtype, r: int, blocks_bytes: int) -> _Layout | None:
    """The layout when each matrix's A, B, E are one row [A | B | E] of the block factors (the order both
    medlego's writer and safetensors' give them); None for any other arrangement."""
    depth, d, size = adapter.depth, adapter.base.embed_dim, dtype.itemsize
    row_bytes = (2 * r * d + r) * size
    rows = []
    for i in range(depth):
        for t in TARGETS:
            a, b, e = (entries[f"blocks.{i}.{t}.{k}"]["data_offsets"][0] for k in "ABE")
            if a % row_bytes or b != a + r * d * size or e != b + d * r * size:
                return None
            rows.append(a // row_bytes)
    return _Layout(dtype, (d, depth), r, torch.tensor(rows), blocks_bytes)
