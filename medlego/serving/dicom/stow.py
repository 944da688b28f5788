"""The DICOMweb door: ``POST /dicom-web/studies`` (STOW-RS) and ``GET /v1/dicom/rules``.

The routes are part of every app (the role table covers them); without ``--dicom-rules`` they
answer 404 naming the flag. STOW-RS: token checked first (the diagnose role, as ``/v1/diagnose``),
then the body is streamed through :class:`~.multipart.MultipartReader` (chunked bodies with no
Content-Length included; the app's body limit counts every piece), each megabyte parsed in a worker
thread. Each part is one instance for :class:`~.door.DicomDoor`; the answer is the standard STOW-RS
response (DICOM JSON): ReferencedSOPSequence for the diagnosed instances, FailedSOPSequence with a
FailureReason for the others; 200 when all were diagnosed, 202 when some were, 409 when none.
``?adapter=REF[&task=T]`` names the adapter instead of the rules. ``?sr=return`` answers
``multipart/related`` instead: the DICOM JSON response first, then each SR as ``application/dicom``
(still stored at the destination); ``?sr=return-only`` the same without storing them anywhere
(``medlego dicom run`` stores them in the PACS it read the study from).
"""

from __future__ import annotations

import asyncio
import json
import uuid

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from medlego.runtime.errors import AdapterNotFoundError, BadInputError

from .. import limits as checks
from ..contract import DiagnosisAPI
from . import reasons
from .door import DicomDoor, Outcome
from .multipart import MultipartReader, boundary_of
from .rules import Target

FEED_BYTES = 1024 * 1024  # body bytes handed to the parsing thread at a time
NOT_CONFIGURED = "the DICOM door is not configured on this server (start it with medlego serve --dicom-rules FILE)"
DICOM_JSON = "application/dicom+json"


def door_of(request: Request) -> DicomDoor:
    door = getattr(request.app.state, "dicom_door", None)
    if door is None:
        raise AdapterNotFoundError(NOT_CONFIGURED)  # a 404 that says why
    return door


def router(service: DiagnosisAPI) -> APIRouter:
    r = APIRouter(tags=["DICOM"])

    @r.post("/dicom-web/studies", summary="STOW-RS: store (diagnose) DICOM instances; SRs go to the destination",
            openapi_extra={"requestBody": {"required": True, "content": {
                'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}}}})
    async def stow(request: Request, authorization: str | None = Header(None), adapter: str | None = None,
                   task: str | None = None, sr: str | None = None):
        service.auth.check_route(authorization, "POST /dicom-web/studies")
        door = door_of(request)
        explicit = _explicit(adapter, task)
        if sr not in (None, "", "return", "return-only"):
            raise BadInputError(f"'sr' is 'return' (the SRs in the answer too) or 'return-only' (in the answer, "
                                f"not stored at the destination), got {sr[:40]!r}")
        parts = await read_parts(request, service)
        keep = sr != "return-only"
        outcomes = await asyncio.gather(*[_one(door, p, explicit, n, keep) for n, p in enumerate(parts)])
        return answer(outcomes, with_srs=bool(sr))

    @r.get("/v1/dicom/rules", summary="The DICOM routing rules, destinations and DIMSE settings in force")
    async def rules(request: Request, authorization: str | None = Header(None)):
        service.auth.check_route(authorization, "GET /v1/dicom/rules")
        door = door_of(request)
        return {**door.rules.to_json(), "ae_title": door.ae_title}

    return r


def _explicit(adapter: str | None, task: str | None) -> list[Target] | None:
    ref = checks.check_text(adapter, "adapter")
    task = checks.check_text(task, "task")
    if ref is None:
        if task is not None:
            raise BadInputError("'task' needs 'adapter' (the rules name their own tasks)")
        return None
    return [Target(ref, task)]


async def _one(door: DicomDoor, part, explicit, index: int, store_srs: bool) -> Outcome:
    if part.content_type not in ("application/dicom", ""):
        return Outcome(failure=reasons.CANNOT_UNDERSTAND,
                       reason=f"part {index} is '{part.content_type[:60]}', not application/dicom")
    return await door.receive(part.data, door="dicomweb", explicit=explicit, size=part.size, index=index,
                              store_srs=store_srs)


async def read_parts(request: Request, service: DiagnosisAPI) -> list:
    """The body's parts, streamed and parsed off the event loop (a malformed body is a 400)."""
    limits = service.limits
    reader = MultipartReader(boundary_of(request.headers.get("content-type", "")), limits.max_image_bytes,
                             limits.max_batch_images)
    pending = bytearray()
    try:
        async for piece in request.stream():
            pending += piece
            if len(pending) >= FEED_BYTES:
                await run_in_threadpool(reader.feed, bytes(pending))
                pending.clear()
    except ClientDisconnect:
        raise BadInputError("the client closed the connection before its whole request body arrived") from None
    await run_in_threadpool(reader.feed, bytes(pending))
    parts = reader.close()
    if not parts:
        raise BadInputError("the multipart body holds no instance")
    return parts


def answer(outcomes: list[Outcome], with_srs: bool = False) -> Response:
    """The STOW-RS response: DICOM JSON (or, with_srs, multipart/related of it and the SRs)."""
    done = [o for o in outcomes if o.failure is None]
    failed = [o for o in outcomes if o.failure is not None]
    body: dict = {}
    if done:
        body["00081199"] = {"vr": "SQ", "Value": [_ref(o) for o in done]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [_ref(o, o.failure) for o in failed]}
    status = 200 if not failed else 202 if done else 409
    headers = {}
    unstored = [o for o in done if o.stored not in (None, "ok")]
    if unstored:  # diagnosed, but the destination did not take the SR: said, without patient data
        status = 202
        headers["Warning"] = f'299 medlego "{len(unstored)} SR(s) not stored at the destination"'
    data = json.dumps(body).encode()
    if not with_srs:
        return Response(data, status_code=status, media_type=DICOM_JSON, headers=headers)
    return _multipart(data, [f for o in done for f in o.sr_files()], status, headers)


def _ref(o: Outcome, failure: int | None = None) -> dict:
    item: dict = {}
    if o.sop_class:
        item["00081150"] = {"vr": "UI", "Value": [o.sop_class]}
    if o.sop_instance:
        item["00081155"] = {"vr": "UI", "Value": [o.sop_instance]}
    if failure is not None:
        item["00081197"] = {"vr": "US", "Value": [failure]}
        item["0040A160"] = {"vr": "UT", "Value": [o.reason]}  # Text Value: the reason in words (documented)
    return item


def _multipart(root: bytes, files: list[bytes], status: int, headers: dict) -> Response:
    boundary = uuid.uuid4().hex
    chunks = [f"--{boundary}\r\nContent-Type: {DICOM_JSON}\r\n\r\n".encode(), root]
    for f in files:
        chunks += [f"\r\n--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), f]
    chunks.append(f"\r\n--{boundary}--\r\n".encode())
    ctype = f'multipart/related; type="{DICOM_JSON}"; boundary={boundary}'
    return Response(b"".join(chunks), status_code=status, headers={**headers, "Content-Type": ctype})
