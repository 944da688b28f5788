"""`medlego dicom run`: diagnose a study that sits in a PACS, and put the SRs back into it.

The study is retrieved by WADO-RS from ``--pacs`` (a DICOMweb root), sent to a RUNNING medlego server's
STOW-RS door (``--server``; so decoding, routing, limits, audit and the engine are the server's own)
with ``?sr=return-only``, and the SRs that come back are stored in the PACS by STOW-RS. ``--adapter``
names the adapter; without it the server's rules route each instance. One line per instance; exit 0
when every instance was diagnosed, 1 when some were not (their reasons printed), 2 for a mistake.
"""

from __future__ import annotations

import io
import json
import os

from .client import API_TOKEN_ENV, DEFAULT_URL

BATCH = 16  # instances per STOW-RS request to the server


def register(sub) -> None:
    p = sub.add_parser("dicom", help="DICOM: diagnose a study in a PACS through a running server (SRs back to the PACS)",
                       description="DICOM tools (docs/dicom.md). The server's own doors: `medlego serve --dicom-rules FILE`.")
    s = p.add_subparsers(dest="dicom_command", metavar="ACTION", required=True)
    r = s.add_parser("run", help="retrieve a study by WADO-RS, diagnose it on a server, store the SRs in the PACS",
                     description=(__doc__ or "").split("\n\n", 1)[-1].replace("``", "'"))
    r.add_argument("--pacs", required=True, metavar="URL", help="the PACS's DICOMweb root, e.g. http://pacs:8042/dicom-web")
    r.add_argument("--study", required=True, metavar="UID", help="Study Instance UID to diagnose")
    r.add_argument("--adapter", help="registered NAME[@VERSION] or alias for every instance (default: the server's rules)")
    r.add_argument("--task", help="the adapter's task (with --adapter; needed when it has several)")
    r.add_argument("--server", default=DEFAULT_URL, metavar="URL", help="the running medlego server's REST address")
    r.add_argument("--token", help=f"API token, where the server has one (default ${API_TOKEN_ENV})")
    r.add_argument("--no-store", action="store_true", help="diagnose and print, but store no SR in the PACS")
    r.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each answer")
    r.set_defaults(func=_run)


def _run(args) -> int:
    from medlego.runtime.errors import BadInputError
    from medlego.serving.dicom import require

    require("dicomweb_client", "highdicom")
    if args.task and not args.adapter:
        raise BadInputError("--task needs --adapter (the server's rules name their own tasks)")
    for flag, url in (("--pacs", args.pacs), ("--server", args.server)):
        if not url.startswith(("http://", "https://")):
            raise BadInputError(f"{flag} must be an http(s) URL, got {url!r}")
    instances = _retrieve(args.pacs, args.study)
    failed, srs = 0, []
    for start in range(0, len(instances), BATCH):
        report, files = _diagnose(args, instances[start:start + BATCH])
        failed += _print_report(report)
        srs += files
    if srs and not args.no_store:
        _store(args.pacs, srs)
    print(f"{len(instances)} instance(s), {len(instances) - failed} diagnosed, {len(srs)} SR(s) "
          + ("not stored (--no-store)" if args.no_store else f"stored in {args.pacs}"))
    return 1 if failed else 0


def _retrieve(pacs: str, study: str) -> list[bytes]:
    from dicomweb_client.api import DICOMwebClient

    from medlego.runtime.errors import BadInputError

    try:
        datasets = DICOMwebClient(url=pacs).retrieve_study(study)
    except Exception as e:  # requests' errors: one line
        raise BadInputError(f"cannot retrieve study {study} from {pacs}: {_line(e)}") from None
    if not datasets:
        raise BadInputError(f"study {study} has no instances at {pacs}")
    out = []
    for ds in datasets:
        fp = io.BytesIO()
        ds.save_as(fp, enforce_file_format=True)
        out.append(fp.getvalue())
    return out


def _diagnose(args, files: list[bytes]) -> tuple[dict, list[bytes]]:
    """One STOW-RS request to the server: its DICOM JSON report and the SRs it returned."""
    import uuid

    import httpx

    from medlego.runtime.errors import BadInputError

    boundary = uuid.uuid4().hex
    body = b"".join(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), f) for f in files)
    body += b"--%s--\r\n" % boundary.encode()
    params = {"sr": "return-only", **({"adapter": args.adapter} if args.adapter else {}),
              **({"task": args.task} if args.task else {})}
    token = args.token or os.environ.get(API_TOKEN_ENV)
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        r = httpx.post(args.server.rstrip("/") + "/dicom-web/studies", params=params, content=body,
                       headers=headers, timeout=args.timeout)
    except httpx.HTTPError as e:
        raise BadInputError(f"cannot reach the server at {args.server}: {_line(e)}") from None
    if not r.headers.get("content-type", "").startswith("multipart/related"):
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        raise BadInputError(f"the server answered {r.status_code}: {_line(detail)}")
    parts = _parts(r.content, r.headers["content-type"])
    return json.loads(parts[0]), parts[1:]


def _parts(body: bytes, ctype: str) -> list[bytes]:
    from medlego.serving.dicom.multipart import MultipartReader, boundary_of

    reader = MultipartReader(boundary_of(ctype, expected="application/dicom+json"), len(body), 10_000)
    reader.feed(body)
    return [p.data or b"" for p in reader.close()]


def _print_report(report: dict) -> int:
    """One line per instance; returns how many failed."""
    from medlego.serving.dicom.reasons import reason_name

    for item in report.get("00081199", {}).get("Value", []):
        print(f"{_uid(item)}: diagnosed")
    failed = report.get("00081198", {}).get("Value", [])
    for item in failed:
        code = item.get("00081197", {}).get("Value", [0])[0]
        text = item.get("0040A160", {}).get("Value", [""])[0]
        print(f"{_uid(item)}: not diagnosed, 0x{code:04X} {reason_name(code)}: {text}")
    return len(failed)


def _store(pacs: str, files: list[bytes]) -> None:
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    from medlego.runtime.errors import BadInputError

    try:
        DICOMwebClient(url=pacs).store_instances([pydicom.dcmread(io.BytesIO(f)) for f in files])
    except Exception as e:
        raise BadInputError(f"cannot store the SRs in {pacs}: {_line(e)}") from None


def _uid(item: dict) -> str:
    return item.get("00081155", {}).get("Value", ["(no SOP Instance UID)"])[0]


def _line(e) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__
