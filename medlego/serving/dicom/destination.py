"""Sending SRs to the configured destination: STOW-RS to a DICOMweb service (dicomweb-client) or
C-STORE to an AE (pynetdicom). Blocking: the door calls :func:`store` in a worker thread."""

from __future__ import annotations

import logging

from medlego.runtime.errors import DestinationError

from .rules import Destination

log = logging.getLogger("medlego.dicom")
TIMEOUT_S = 30.0


def store(destination: Destination, datasets: list, calling_ae: str = "MEDLEGO") -> None:
    """Store every data set at `destination`, or raise a one-line DestinationError."""
    if not datasets:
        return
    if destination.dicomweb:
        _stow(destination.dicomweb, datasets)
    else:
        _c_store(destination, datasets, calling_ae)


def _stow(url: str, datasets: list) -> None:
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=url, timeout=TIMEOUT_S)
    # its default retries back off for 30 s; the sender waits for this store, so a PACS that is down costs
    # about a second (three tries), and the SR is reported not stored
    client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=250)
    try:
        client.store_instances(datasets=datasets)
    except Exception as e:  # requests' HTTPError / ConnectionError: one line, never the body
        raise DestinationError(f"STOW-RS to {url} failed: {' '.join(str(e).split())[:300]}") from None


def _c_store(d: Destination, datasets: list, calling_ae: str) -> None:
    from pynetdicom import AE
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    for cls in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(cls, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(d.host or "", d.port or 0, ae_title=d.ae_title or "")
    if not assoc.is_established:
        raise DestinationError(f"C-STORE to {d.ae_title}@{d.host}:{d.port}: association refused or not reachable")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None or code not in (0x0000, 0xB000, 0xB007, 0xB006):
                raise DestinationError(f"C-STORE to {d.ae_title}@{d.host}:{d.port} answered status "
                                 f"{'none' if code is None else hex(code)}")
    finally:
        assoc.release()
