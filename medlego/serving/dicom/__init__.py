"""The DICOM doors of the server (issue 28): a hospital's PACS sends images over DICOMweb (STOW-RS,
``stow.py``) or DIMSE (a C-STORE SCP, ``dimse.py``); each instance is routed by the rules file
(``rules.py``), read (``instance.py``), diagnosed through the same serving contract as
``/v1/diagnose`` (``door.py``), and its results go back to the PACS as a DICOM Structured Report
(``sr.py``) sent to the configured destination (``destination.py``). The STOW-RS body is parsed by
a streaming, bounded ``multipart/related`` reader (``multipart.py``).

pynetdicom, highdicom and dicomweb-client are the optional extra ``medlego[dicom]``; :func:`require`
turns a missing one into a one-line error that says how to install it.
"""

from __future__ import annotations

import importlib

from medlego.runtime.errors import BadInputError

INSTALL_HINT = 'pip install "medlego[dicom]"'


def require(*modules: str) -> None:
    """Raise a one-line BadInputError naming the extra when one of `modules` cannot be imported."""
    for name in modules or ("pynetdicom", "highdicom", "dicomweb_client"):
        try:
            importlib.import_module(name)
        except ImportError:
            raise BadInputError(f"the DICOM door needs the '{name}' package: {INSTALL_HINT}") from None
