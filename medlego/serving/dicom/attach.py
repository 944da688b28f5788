"""Wiring the DICOM doors onto an embedded server (``medlego serve --dicom-rules FILE``, the tests)."""

from __future__ import annotations

import logging

from . import require
from .dimse import DimseDoor
from .door import DicomDoor
from .rules import check_adapters, load_rules

log = logging.getLogger("medlego.dicom")
DEFAULT_AE_TITLE = "MEDLEGO"


def quiet_libraries() -> None:
    """pynetdicom's and highdicom's own logs at WARNING at most, whatever the server's level: at DEBUG
    pynetdicom dumps received data sets (patient attributes among them), and highdicom logs a line per
    module it copies into each SR."""
    for name in ("pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).getEffectiveLevel()))


def attach(server, rules_path: str, *, ae_title: str | None = None, port: int | None = None,
           host: str | None = None) -> DimseDoor | None:
    """Load and check the rules (every adapter they name must resolve: a one-line error otherwise),
    open the STOW-RS door on `server`'s app and, when a DIMSE port is given (here or in ``[dimse]``),
    start the C-STORE SCP; returns it (stop it with the server), or None."""
    require()
    quiet_libraries()
    rules = load_rules(rules_path)
    check_adapters(rules, server.service.registry.resolve)
    title = ae_title or rules.dimse.get("ae_title") or DEFAULT_AE_TITLE
    door = DicomDoor(server.service, rules, title)
    server.app.state.dicom_door = door
    port = port if port is not None else rules.dimse.get("port")
    if port is None:
        return None
    allow = rules.dimse.get("allow", [])
    if not allow:
        log.warning("DIMSE door %s accepts associations from any calling AE title ([dimse] allow is empty)", title)
    # the server's loop exists once it runs; a C-STORE that comes earlier waits for it
    return DimseDoor(door, lambda: getattr(server, "_loop", None), host=host or server.host, port=port,
                     ae_title=title, allow=allow).start()
