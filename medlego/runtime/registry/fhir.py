"""The audit trail as FHIR R4 ``AuditEvent`` resources, one per row, in a ``Bundle`` (type collection).

What a hospital's audit repository (an ATNA/BALP consumer) ingests: ``recorded`` is the row's time,
``agent`` the caller (requestor), ``source`` this server, ``entity`` the adapter version and the
image's sha256 (never the image), ``outcome`` 0 (ok), 4 (refused) or 8 (server error). The full row
as hashed (its canonical JSON), its seq and its chain hash ride along as ``entity.detail`` so the
export can be checked against the chain. Written streamed: memory stays bounded whatever the rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TextIO

KIND_SYSTEM = "urn:medlego:audit:kind"
_DCM = "http://dicom.nema.org/resources/ontology/DCM"
_TYPE = {  # AuditEvent.type (DICOM audit event IDs, as FHIR R4's audit-event-type value set takes)
    "diagnosis": (_DCM, "110112", "Query"),
    "refused": (_DCM, "110113", "Security Alert"),
    "admin": (_DCM, "110100", "Application Activity"),
    "prune": (_DCM, "110105", "DICOM Study Deleted"),
}
_ACTION = {"diagnosis": "E", "refused": "E", "prune": "D"}
_ADMIN_ACTION = {"register": "C", "merge": "C", "delete": "D"}


def _outcome(row: dict) -> str:
    outcome = str(row.get("outcome") or "ok")
    if outcome == "ok":
        return "0"
    status = row.get("status")
    return "8" if outcome in ("error", "internal") or (isinstance(status, int) and status >= 500) else "4"


def audit_event(row: dict) -> dict:
    """One audit row (as :func:`~.audit.query` returns it) as a FHIR R4 AuditEvent resource."""
    kind = str(row.get("kind") or "")
    system, code, display = _TYPE.get(kind, (_DCM, "110100", "Application Activity"))
    caller = str(row.get("caller") or "") or "anonymous"
    body = {k: v for k, v in row.items() if k not in ("seq", "hash")}
    event: dict = {
        "resourceType": "AuditEvent",
        "id": f"medlego-audit-{row['seq']}",
        "type": {"system": system, "code": code, "display": display},
        "subtype": [{"system": KIND_SYSTEM, "code": kind or "unknown"}],
        "action": _ADMIN_ACTION.get(str(row.get("op") or ""), "U") if kind == "admin" else _ACTION.get(kind, "E"),
        "recorded": str(row["time"]),
        "outcome": _outcome(row),
        "agent": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
                                        "code": "humanuser" if caller not in ("anonymous", "cli") else "dataprocessor"}]},
                   "who": {"identifier": {"system": "urn:medlego:caller", "value": caller}, "display": caller},
                   "requestor": True}],
        "source": {"observer": {"display": "medlego"},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4",
                             "display": "Application Server"}]},
        "entity": [{"what": {"identifier": {"system": "urn:medlego:audit", "value": str(row["seq"])}},
                    "name": "audit row",
                    "detail": [{"type": "seq", "valueString": str(row["seq"])},
                               {"type": "hash", "valueString": str(row.get("hash") or "")},
                               {"type": "row", "valueString": json.dumps(body, sort_keys=True, separators=(",", ":"),
                                                                          ensure_ascii=True, default=str)}]}],
    }
    if row.get("reason"):
        event["outcomeDesc"] = " ".join(str(row["reason"]).split())[:1024]
    if row.get("request_id"):
        event["entity"].append({"what": {"identifier": {"system": "urn:medlego:request-id",
                                                        "value": str(row["request_id"])}}, "name": "request"})
    if row.get("adapter"):
        event["entity"].append({"what": {"identifier": {"system": "urn:medlego:adapter", "value": str(row["adapter"])}},
                                "name": "adapter"})
    if row.get("image_sha256"):
        event["entity"].append({"what": {"identifier": {"system": "urn:medlego:image-sha256",
                                                        "value": str(row["image_sha256"])}}, "name": "image"})
    return event


def write_bundle(rows: Iterable[dict], out: TextIO) -> int:
    """Write a Bundle (type collection) holding one AuditEvent per row; how many were written."""
    out.write('{"resourceType":"Bundle","type":"collection","entry":[')
    n = 0
    for row in rows:
        event = audit_event(row)
        out.write(("," if n else "") + "\n" + json.dumps({"fullUrl": f"urn:medlego:audit:{row['seq']}",
                                                          "resource": event}, separators=(",", ":")))
        n += 1
    out.write("\n]}\n")
    return n
