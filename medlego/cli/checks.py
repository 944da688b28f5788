"""Checks a command runs before any work (loading a base, reading data, training, building a demo),
so that a mistake costs a second and one line instead of a run that fails half-way."""

from __future__ import annotations

import os
from collections.abc import Iterable

from medlego.runtime.errors import BadInputError


def check_device(device: str | None, flag: str = "--device") -> None:
    """A device torch can use here: 'cpu', 'cuda' or 'cuda:N' with that GPU present."""
    if not device or device == "cpu":
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise BadInputError(f"{flag} {device}: not a device (use cpu, cuda or cuda:N)") from None
    if dev.type != "cuda":
        raise BadInputError(f"{flag} {device}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise BadInputError(f"{flag} {device}: CUDA is not available on this machine ({why}); use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BadInputError(f"{flag} {device}: this machine has {torch.cuda.device_count()} GPU(s), "
                            f"cuda:0..cuda:{torch.cuda.device_count() - 1}")


def check_readable(paths: Iterable[str | os.PathLike]) -> None:
    """Each path opens for reading (the CLI turns the OSError, which names the file, into one line)."""
    for p in paths:
        with open(p, "rb"):
            pass


def check_port_free(host: str, port: int | None, flag: str) -> None:
    """Nothing listens on host:port yet. Probed without SO_REUSEPORT, so a gRPC server that would
    share the port (gRPC sets it) is found too."""
    if not port:
        return
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as e:
            raise BadInputError(f"cannot listen on {host}:{port}: {e.strerror or e} "
                                f"(another server running?); choose another {flag}") from None
