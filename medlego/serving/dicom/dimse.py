"""The DIMSE door: a C-STORE SCP (pynetdicom) with C-ECHO, on its own port and AE title.

Associations are accepted only from the calling AE titles of the allow-list (``[dimse] allow``;
an empty list accepts any, which the start-up line says) and only for storage SOP classes and
Verification. Each received instance is handed to the server's event loop, where
:class:`~.door.DicomDoor` routes, diagnoses and stores its SR exactly as for STOW-RS; the C-STORE
status is 0x0000 when it was diagnosed, else its failure reason (the same codes as STOW-RS).
pynetdicom runs each association in a thread of its own, so a slow diagnosis never blocks the loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from .door import DicomDoor

log = logging.getLogger("medlego.dicom")
RECEIVE_TIMEOUT_S = 300.0  # one instance's routing, diagnosis and SR storage


class DimseDoor:
    def __init__(self, door: DicomDoor, loop: Callable[[], asyncio.AbstractEventLoop | None], *,
                 host: str = "127.0.0.1", port: int = 11112, ae_title: str = "MEDLEGO", allow: list[str] | None = None):
        """`loop`: the server's event loop when it runs (None before: instances then wait for it)."""
        self.door, self.loop = door, loop
        self.host, self.port, self.ae_title = host, port, ae_title
        self.allow = list(allow or [])
        self._server = None

    def start(self) -> "DimseDoor":
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.ae_title)
        for cx in AllStoragePresentationContexts:  # any transfer syntax: the decoder decides what it reads
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        if self.allow:
            ae.require_calling_aet = self.allow
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: 0x0000)]
        server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        assert server is not None  # (None only with block=True)
        self._server = server
        self.port = server.server_address[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event) -> int:
        """One C-STORE: the instance as a Part 10 file through the door; its status back."""
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            data = bytes(event.encoded_dataset(include_meta=True))
        except Exception:  # pynetdicom could not re-encode what it received
            return 0xC000
        loop = self._wait_loop()
        if loop is None:
            return 0xA700  # the server is not running (yet): out of resources, the sender retries
        future = asyncio.run_coroutine_threadsafe(
            self.door.receive(data, door="dimse", calling_ae=calling), loop)
        try:
            outcome = future.result(RECEIVE_TIMEOUT_S)
        except Exception:
            future.cancel()
            log.exception("C-STORE from %s failed", calling)
            return 0x0110
        return 0x0000 if outcome.failure is None else outcome.failure

    def _wait_loop(self, timeout: float = 60.0):
        import time

        deadline = time.monotonic() + timeout
        while (loop := self.loop()) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        return loop
