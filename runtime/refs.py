"""Resolve what a user names as an adapter: a file path, or a registered name / name@version / alias."""

from __future__ import annotations

import os
from pathlib import Path

from .adapter import Adapter, BaseSpec, load_adapter
from .errors import AdapterNotFoundError

DATA_DIR_ENV = "MEDLEGO_DATA_DIR"
DEFAULT_DATA_DIR = "~/.medlego"


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def load_adapter_ref(ref: str, *, data_dir: str | os.PathLike | None = None,
                     expected_base: BaseSpec | None = None, max_rank: int | None = None) -> tuple[Adapter, dict]:
    """(adapter, source) where source records what was loaded: {"ref", "path", "sha256", ...}."""
    from .adapter import sha256_hex

    p = Path(ref).expanduser()
    if p.suffix == ".safetensors" or p.is_file():
        if not p.is_file():
            raise AdapterNotFoundError(f"adapter file not found: {p}")
        data = p.read_bytes()
        from .adapter import parse_adapter

        adapter = parse_adapter(data, expected_base=expected_base, max_rank=max_rank)
        return adapter, {"ref": ref, "path": str(p), "sha256": sha256_hex(data)}
    root = default_data_dir(data_dir)
    from .registry import Registry  # the registry is optional for file-only users

    if not (root / "registry.db").exists():
        raise AdapterNotFoundError(f"'{ref}' is not a file and there is no registry at {root} (set --data-dir or {DATA_DIR_ENV})")
    entry = Registry(root).resolve(ref)
    adapter = load_adapter(entry.path, expected_base=expected_base, max_rank=max_rank)
    return adapter, {"ref": ref, "name": entry.name, "version": entry.version, "sha256": entry.sha256,
                     "path": str(entry.path)}
