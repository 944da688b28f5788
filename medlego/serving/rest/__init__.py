"""The REST routes of ``/v1`` (and the ops routes), one FastAPI router per concern, each written once
against the serving contract: ``diagnose``, ``adapters`` (registry reads), ``admin`` (registry
writes), ``audit``, ``ops``. Every route checks its token first, from the one role table
(``serving/auth.py ROUTES``), so no byte of a body is read for a caller who may not use the route;
bodies are read by ``parsing``. ``serving/app.py`` assembles them with the middleware and the error
handlers."""

from __future__ import annotations

from fastapi import APIRouter

from ..contract import DiagnosisAPI
from ..dicom import stow
from . import adapters, admin, audit, diagnose, ops


def routers(service: DiagnosisAPI) -> list[APIRouter]:
    return [module.router(service) for module in (diagnose, adapters, admin, ops, audit, stow)]
