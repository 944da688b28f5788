"""Shared fixtures: a tiny real timm ViT written to a file (random weights from a seed) and
seeded random adapters. Everything is built here; nothing is downloaded."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The variable is read
# when a kernel is decorated, so it is set before any test imports a kernel module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The installed `medlego` command and tools (lint-imports, basedpyright) sit beside this interpreter: put them
# first on PATH, so that the suite runs the same from an activated venv, an unactivated one or the base Python.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

pytest_plugins = ["backends"]  # real PostgreSQL and S3 servers for the registry tests (tests/backends.py)

TINY_MODEL = "vit_tiny_patch16_224"  # 12 blocks, d = 192; built at 32 px -> 4 patches + cls
TINY_IMG = 32

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_base_file(tmp_path_factory) -> Path:
    from medlego.runtime.base import init_weights_file

    return init_weights_file(TINY_MODEL, 0, tmp_path_factory.mktemp("base") / "tiny.safetensors", img_size=TINY_IMG)


@pytest.fixture(scope="session")
def tiny_base(tiny_base_file):
    from medlego.runtime.base import load_base

    return load_base(TINY_MODEL, tiny_base_file)


@pytest.fixture(scope="session")
def other_base_file(tmp_path_factory) -> Path:
    """Same architecture, different seed: a different fingerprint."""
    from medlego.runtime.base import init_weights_file

    return init_weights_file(TINY_MODEL, 1, tmp_path_factory.mktemp("base1") / "tiny1.safetensors", img_size=TINY_IMG)


@pytest.fixture
def make_adapter(tiny_base):
    """make_adapter(seed=0, rank=4 | [2*depth ranks], tasks=None, scale=0.05) -> Adapter on tiny_base."""
    from medlego.jobs.synthetic import random_adapter

    def make(seed: int = 0, rank=4, tasks=None, scale: float = 0.05):
        return random_adapter(tiny_base.spec, tiny_base.preprocess, rank=rank, tasks=tasks, seed=seed, scale=scale)

    return make


@pytest.fixture(scope="module")
def client(server):
    """An HTTP client of the module's own `server` fixture (an EmbeddedServer)."""
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
