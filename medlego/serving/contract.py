"""The one serving contract: what every front door (REST, gRPC, Ray's proxies) calls.

:class:`DiagnosisAPI` is implemented twice — by the in-process :class:`~.service.DiagnosisService`
(one engine in this process) and by the Ray ingress's :class:`~.ray_frontend.RayFrontend` (engines in
replicas) — and the REST app and the gRPC servicer are each written once against it. Every method
is a coroutine; every expected failure is a :class:`~medlego.runtime.errors.MedlegoError`, whose
class decides the answer on every transport (``runtime/errors.py``). Answers are the JSON the
REST API returns; the gRPC layer converts them to protobuf. The registry writes are grouped under
``api.admin`` (:class:`AdminAPI`). ``tests/test_contract.py`` checks both implementations against
these protocols, method by method and signature by signature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from medlego.runtime.config import Limits
from medlego.runtime.errors import MedlegoError

from .auth import Auth

# The registry writes; each is a method of the contract and needs the admin token.
ADMIN_OPERATIONS = ("register", "delete", "pin", "unpin", "set_alias", "remove_alias", "merge")

# audit rows in one answer (GET /v1/audit, QueryAudit): an answer is built in one piece, so it is bounded
MAX_AUDIT_PAGE = 1000


@dataclass
class DiagnoseItem:
    """One image to diagnose, as any transport receives it: an encoded file (``image``), or pixels
    already preprocessed as the adapter's ``preprocess`` says (``pixels``, float32 [3, S, S]; then
    ``image`` is empty). KServe v2's ``pixel_values`` input is the second kind."""

    image: bytes
    adapter: str
    task: str | None = None
    top_k: int | None = None
    pixels: Any = None  # numpy float32 [3, S, S] or None (numpy is not imported by the contract)
    # the adapter already resolved by whoever routed the item (a Ray replica: the ingress's resolve
    # plus the multiplexed loader's host copy), an engine ResolvedAdapter; None: resolve `adapter`
    resolved: Any = None
    # the image's audit fields (sha256, format, size), computed once by prepare() in the decode pool, so
    # that recording the diagnosis never hashes megabytes on the event loop; None: not computed yet
    image_audit: dict | None = None
    # the DICOM doors' identifiers of the instance (Study/Series/SOP Instance UIDs, calling AE) for its
    # audit row (serving/dicom/instance.py Instance.audit: never patient attributes); None elsewhere
    dicom: dict | None = None


@dataclass
class MergeSpec:
    """A merge of registered adapters, registered under `name` (the merge job's inputs)."""

    name: str
    sources: list[str]
    method: str = "med-lego"
    params: dict = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    task_names: list[str] | None = None
    move_aliases: bool = False


@runtime_checkable
class AdminAPI(Protocol):
    """The registry writes (admin token): ADMIN_OPERATIONS."""

    async def register(self, name: str, data: bytes, aliases: list[str], move_aliases: bool = False) -> dict: ...
    async def delete(self, ref: str, all_versions: bool = False) -> list[str]: ...
    async def pin(self, ref: str) -> dict: ...
    async def unpin(self, ref: str) -> dict: ...
    async def set_alias(self, alias: str, target: str) -> dict: ...
    async def remove_alias(self, alias: str) -> None: ...
    async def merge(self, spec: MergeSpec) -> dict: ...


@runtime_checkable
class DiagnosisAPI(Protocol):
    limits: Limits
    auth: Auth

    @property
    def admin(self) -> AdminAPI: ...  # the registry writes (read-only here: each implementation has its own kind)

    # diagnosis (API token)
    async def diagnose(self, item: DiagnoseItem, api: str = "rest") -> dict: ...
    async def diagnose_many(self, items: list[DiagnoseItem], api: str = "rest") -> list[dict]: ...

    # registry reads (API token)
    # one page in (name, version) order: {"adapters", "aliases" (those of this page's names), "next_cursor"
    # (absent on the last page)}; filters as runtime/registry/listing.check_filters takes them
    async def list_adapters(self, limit: int | None = None, cursor: str | None = None, prefix: str | None = None,
                            task: str | None = None, base: str | None = None) -> dict: ...
    async def describe(self, ref: str) -> dict: ...
    async def aliases(self) -> dict[str, str]: ...

    # the audit trail (audit role): rows matching filters of runtime/registry/audit.query
    async def audit_rows(self, **filters: Any) -> list[dict]: ...
    # a request answered `status` >= 400 by a stage no recorder saw (the transports' refusal recorder)
    def refused_at(self, status: int, **fields: Any) -> None: ...

    # ops
    async def health(self) -> dict: ...
    async def info(self) -> dict: ...
    async def metrics_text(self) -> bytes: ...


def item_error(index: int, count: int, error: BaseException) -> BaseException:
    """The error of item `index` of a `count`-item request, with the item named when there are several."""
    if count > 1 and isinstance(error, MedlegoError):
        named = type(error)(f"image {index}: {error}")
        return named
    return error
