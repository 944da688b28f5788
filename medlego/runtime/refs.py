"""Resolve what a user names as an adapter: a file path, or a registered name / name@version / alias."""

from __future__ import annotations

import os
from pathlib import Path

from .adapter import Adapter, BaseSpec, parse_adapter, sha256_hex
from .config import DATA_DIR_ENV, default_data_dir
from .errors import AdapterNotFoundError


def load_adapter_ref(ref: str, *, data_dir: str | os.PathLike | None = None, registry=None,
                     expected_base: BaseSpec | None = None, max_rank: int | None = None) -> tuple[Adapter, dict]:
    """(adapter, source) where source records what was loaded: {"ref", "path", "sha256", ...}.

    A registered reference is looked up in `registry` (a Registry) when given, else in the
    embedded registry under `data_dir`; its "path" is a local file with the verified bytes."""
    p = Path(ref).expanduser()
    if p.suffix == ".safetensors" or p.is_file():
        if not p.is_file():
            raise AdapterNotFoundError(f"adapter file not found: {p}")
        data = p.read_bytes()
        adapter = parse_adapter(data, expected_base=expected_base, max_rank=max_rank)
        return adapter, {"ref": ref, "path": str(p), "sha256": sha256_hex(data)}
    if registry is None:
        root = default_data_dir(data_dir)
        if not (root / "registry.db").exists():
            raise AdapterNotFoundError(
                f"'{ref}' is not a file and there is no registry at {root} (set --data-dir or {DATA_DIR_ENV})")
        from .registry import Registry  # the registry is optional for file-only users

        registry = Registry(root)
    entry = registry.resolve(ref)
    adapter = parse_adapter(registry.read_bytes(entry), expected_base=expected_base, max_rank=max_rank)
    return adapter, {"ref": ref, "name": entry.name, "version": entry.version, "sha256": entry.sha256,
                     "path": str(registry.local_path(entry))}
