"""Bearer tokens and named callers with roles: the admin (ops) API always needs a token; the
diagnosis API needs one if any diagnosis token (``MEDLEGO_API_TOKEN`` or a named caller) is configured.

Callers: ``admin`` (``MEDLEGO_ADMIN_TOKEN``, role admin), ``api`` (``MEDLEGO_API_TOKEN``: diagnosis
and registry reads), and the named callers of ``[auth] tokens_file`` with role ``admin`` (all),
``diagnose`` (diagnosis only) or ``read`` (registry reads and the audit log). Only the sha256 of a
named caller's token is stored; a presented token's sha256 is compared with every entry in
constant time.

With no admin token configured the admin API is *closed* (every call refused), never open.
Tokens are compared in constant time. The same checks serve REST (``Authorization`` header)
and gRPC (``authorization`` metadata). ``/metrics`` lists adapter names, so it follows the
diagnosis token unless the configuration makes it public.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medlego.runtime.registry.audit import CURRENT
from medlego.runtime.config import ADMIN_TOKEN_ENV, AuthConfig, read_toml
from medlego.runtime.errors import BadInputError, ForbiddenError, UnauthenticatedError

log = logging.getLogger("medlego.auth")


def bearer(value: str | None) -> str | None:
    """The token of an 'Authorization: Bearer <token>' value (None when absent or not a bearer)."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


ROLES = ("admin", "diagnose", "read")
# The one role table. Each route and RPC needs one action (ROUTES); each role may do these actions.
# "api" is the MEDLEGO_API_TOKEN identity, "open" the anonymous caller when no diagnosis token is
# configured at all. "describe" (one model's metadata: what a client needs to use it) is allowed to
# the diagnose role and the read role alike, on /v1, /v2 and gRPC.
ALLOWED = {"admin": {"admin", "diagnose", "describe", "read", "audit"}, "diagnose": {"diagnose", "describe"},
           "read": {"describe", "read", "audit"}, "api": {"diagnose", "describe", "read"},
           "open": {"diagnose", "describe", "read"}}
_WHAT = {"admin": "the admin API", "diagnose": "diagnosis", "describe": "model metadata", "read": "registry reads",
         "audit": "the audit log"}
# action per route ("METHOD /path" of REST /v1 and /v2, "rpc Service/Method" of gRPC); None: open to all.
# /metrics is "read" unless [auth] metrics_public. tests/test_slow_bodies.py walks every route against it.
ROUTES: dict[str, str | None] = {
    "POST /v1/diagnose": "diagnose", "POST /v1/diagnose/batch": "diagnose",
    "GET /v1/adapters": "read", "GET /v1/aliases": "read", "GET /v1/info": "read", "GET /metrics": "read",
    "GET /v1/adapters/{ref}": "describe",
    "GET /v1/audit": "audit",
    "POST /dicom-web/studies": "diagnose", "GET /v1/dicom/rules": "read",  # the DICOM door (serving/dicom/)
    "POST /v1/adapters": "admin", "DELETE /v1/adapters/{ref}": "admin", "POST /v1/adapters/{ref}/pin": "admin",
    "POST /v1/adapters/{ref}/unpin": "admin", "PUT /v1/aliases/{alias}": "admin",
    "DELETE /v1/aliases/{alias}": "admin", "POST /v1/merge": "admin",
    "GET /healthz": None, "GET /readyz": None, "GET /v2": None, "GET /v2/": None,
    "GET /v2/health/live": None, "GET /v2/health/ready": None, "POST /v2/repository/index": "read",
    "GET /v2/models/{model}": "describe", "GET /v2/models/{model}/versions/{version}": "describe",
    "GET /v2/models/{model}/ready": "describe", "GET /v2/models/{model}/versions/{version}/ready": "describe",
    "POST /v2/models/{model}/infer": "diagnose", "POST /v2/models/{model}/versions/{version}/infer": "diagnose",
    "rpc medlego.v1.Medlego/Diagnose": "diagnose", "rpc medlego.v1.Medlego/DiagnoseBatch": "diagnose",
    "rpc medlego.v1.Medlego/ListAdapters": "read", "rpc medlego.v1.Medlego/ListAliases": "read",
    "rpc medlego.v1.Medlego/Info": "read", "rpc medlego.v1.Medlego/DescribeAdapter": "describe",
    "rpc medlego.v1.Medlego/QueryAudit": "audit", "rpc medlego.v1.Medlego/Health": None,
    **{f"rpc medlego.v1.Medlego/{m}": "admin" for m in ("RegisterAdapter", "DeleteAdapter", "PinAdapter",
                                                       "UnpinAdapter", "SetAlias", "RemoveAlias", "MergeAdapters")},
    "rpc inference.GRPCInferenceService/ModelMetadata": "describe",
    "rpc inference.GRPCInferenceService/ModelReady": "describe",
    "rpc inference.GRPCInferenceService/ModelInfer": "diagnose",
    "rpc inference.GRPCInferenceService/RepositoryIndex": "read",
    "rpc inference.GRPCInferenceService/ServerLive": None, "rpc inference.GRPCInferenceService/ServerReady": None,
    "rpc inference.GRPCInferenceService/ServerMetadata": None,
}


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(digest(given), digest(expected))


@dataclass(frozen=True)
class Caller:
    name: str
    role: str  # admin | diagnose | read | api | open
    sha256: bytes = b""  # the token's digest (named callers)


def load_tokens_file(path: str) -> tuple[Caller, ...]:
    """The named callers of a tokens file: ``[[token]]`` tables of name, role and sha256 (hex)."""
    p = Path(path).expanduser()
    data = read_toml(p, "[auth] tokens_file")
    entries = data.get("token", [])
    if not isinstance(entries, list) or set(data) - {"token"}:
        raise BadInputError(f"tokens file {p}: expected only [[token]] tables (name, role, sha256)")
    callers, names = [], set()
    for n, e in enumerate(entries):
        if not isinstance(e, dict) or set(e) != {"name", "role", "sha256"}:
            raise BadInputError(f"tokens file {p}: entry {n + 1} needs exactly name, role and sha256")
        name, role, sha = e["name"], e["role"], e["sha256"]
        if not isinstance(name, str) or not name.strip() or name in ("admin", "api", "anonymous") or name in names:
            raise BadInputError(f"tokens file {p}: entry {n + 1} has an empty, reserved or repeated name {name!r}")
        if role not in ROLES:
            raise BadInputError(f"tokens file {p}: entry {n + 1} ({name}) has role {role!r}; choose from {', '.join(ROLES)}")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha.lower()):
            raise BadInputError(f"tokens file {p}: entry {n + 1} ({name}) needs the token's sha256 as 64 hex digits")
        names.add(name)
        callers.append(Caller(name, role, bytes.fromhex(sha)))
    return tuple(callers)


class TokensFile:
    """The named callers of ``[auth] tokens_file``, re-read when the file changes (its mtime, size or
    inode; looked at most once per ``every_s``): a removed entry is revoked within seconds, no
    restart. A file that does not parse keeps the callers it had (an editor half-way through a
    save), and says so in the log; a file that is gone revokes every named caller. Each change
    calls ``on_change(added, removed, changed)`` (the service records it as an audit row)."""

    def __init__(self, path: str, every_s: float = 1.0):
        self.path = Path(path).expanduser()
        self.every_s = every_s
        # set by the service: on_change(added, removed, changed) records the change as an audit row
        self.on_change: Callable[[list[str], list[str], list[str]], None] | None = None
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._stamp = self._stat()
        self.callers = load_tokens_file(str(self.path))  # at start-up a bad file is a one-line error

    def _stat(self):
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def current(self) -> tuple[Caller, ...]:
        now = time.monotonic()
        if now - self._checked < self.every_s or not self._lock.acquire(blocking=False):
            return self.callers
        try:
            self._checked = now
            stamp = self._stat()
            if stamp != self._stamp:
                self._reload(stamp)
        finally:
            self._lock.release()
        return self.callers

    def _reload(self, stamp) -> None:
        old = self.callers
        if stamp is None:
            new: tuple[Caller, ...] = ()
        else:
            try:
                new = load_tokens_file(str(self.path))
            except (BadInputError, OSError) as e:
                log.error("tokens file %s not reloaded (the previous callers stay): %s", self.path, e)
                return  # stamp kept: the next look tries again
        self._stamp = stamp
        self.callers = new
        before, after = {c.name: c for c in old}, {c.name: c for c in new}
        added = sorted(set(after) - set(before))
        removed = sorted(set(before) - set(after))
        changed = sorted(n for n in set(before) & set(after) if before[n] != after[n])
        log.warning("tokens file %s reloaded: added %s, removed %s, changed %s", self.path, added or "none",
                    removed or "none", changed or "none")
        if self.on_change is not None and (added or removed or changed):
            try:
                self.on_change(added, removed, changed)
            except Exception:
                log.exception("could not record the tokens file change")


@dataclass(frozen=True)
class Auth:
    admin_token: str | None = None  # None: the admin API is closed (unless a named admin exists)
    api_token: str | None = None  # None and no named callers: diagnosis is open
    metrics_public: bool = False
    callers: tuple[Caller, ...] = ()  # named callers from the tokens file (at start-up)
    tokens_file: TokensFile | None = field(default=None, compare=False, hash=False, repr=False)  # re-read on change
    # set by the service: refused(caller_name, action, reason) records a refusal in the audit log
    hooks: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @staticmethod
    def from_config(cfg: AuthConfig) -> "Auth":
        tokens = TokensFile(cfg.tokens_file) if cfg.tokens_file else None
        return Auth(cfg.admin_token or None, cfg.api_token or None, cfg.metrics_public,
                    tokens.callers if tokens is not None else (), tokens)

    def _callers(self) -> tuple[Caller, ...]:
        """The named callers now: the tokens file's latest content when there is one."""
        return self.tokens_file.current() if self.tokens_file is not None else self.callers

    def identify(self, token: str) -> Caller | None:
        """The caller a token belongs to: sha256 digests compared in constant time, every entry tried."""
        d = digest(token)
        found = None
        for c in self._known():
            if hmac.compare_digest(d, c.sha256) and found is None:
                found = c
        return found

    def _known(self) -> tuple[Caller, ...]:
        out = []
        if self.admin_token:
            out.append(Caller("admin", "admin", digest(self.admin_token)))
        if self.api_token:
            out.append(Caller("api", "api", digest(self.api_token)))
        return (*out, *self._callers())

    def _refuse(self, caller: str, action: str, error: Exception) -> Exception:
        hook = self.hooks.get("refused")
        if hook is not None:
            hook(caller, action, str(error))
        return error

    def check(self, authorization: str | None, action: str) -> str:
        """The caller's name when it may do `action` (admin | diagnose | describe | read | audit); else 401/403."""
        callers = self._callers()
        open_diagnosis = not self.api_token and not callers
        if action == "admin" and not self.admin_token and not any(c.role == "admin" for c in callers):
            raise self._refuse("", action, ForbiddenError(
                f"the admin API is closed: no admin token is configured (set {ADMIN_TOKEN_ENV})"))
        token = bearer(authorization)
        if token is None:
            if action in ALLOWED["open"] and open_diagnosis:
                return _set_caller("anonymous")
            needs = {"admin": "the admin API needs 'Authorization: Bearer <admin token>'",
                     "diagnose": "this server needs 'Authorization: Bearer <API token>' for diagnosis",
                     "read": "this server needs 'Authorization: Bearer <API token>' for registry reads",
                     "describe": "this server needs 'Authorization: Bearer <API token>' for model metadata",
                     "audit": "the audit log needs 'Authorization: Bearer <admin or read token>'"}
            raise self._refuse("", action, UnauthenticatedError(needs[action]))
        caller = self.identify(token)
        if caller is None:
            if action in ALLOWED["open"] and open_diagnosis:
                return _set_caller("anonymous")
            wrong = {"admin": "wrong admin token", "diagnose": "wrong API token", "read": "wrong API token",
                     "describe": "wrong API token", "audit": "unknown token"}
            raise self._refuse("", action, ForbiddenError(wrong[action]))
        if action not in ALLOWED[caller.role]:
            raise self._refuse(caller.name, action, ForbiddenError(
                f"caller '{caller.name}' (role {caller.role}) may not use {_WHAT[action]}"))
        return _set_caller(caller.name)

    def check_route(self, authorization: str | None, route: str) -> str | None:
        """The check of one route of :data:`ROUTES` (``"GET /v1/adapters/{ref}"``); None for an open route."""
        action = ROUTES[route]
        if action is None or (route == "GET /metrics" and self.metrics_public):
            return None
        return self.check(authorization, action)

    def check_admin(self, authorization: str | None) -> str:
        return self.check(authorization, "admin")

    def check_api(self, authorization: str | None, action: str = "diagnose") -> str:
        return self.check(authorization, action)

    def check_read(self, authorization: str | None) -> str:
        return self.check(authorization, "read")

    def check_audit(self, authorization: str | None) -> str:
        return self.check(authorization, "audit")

    def check_metrics(self, authorization: str | None) -> None:
        if not self.metrics_public:
            self.check(authorization, "read")


def _set_caller(name: str) -> str:
    """Note the caller on the request being served (the audit log reads it)."""
    current = CURRENT.get()
    if current is None:
        CURRENT.set({"caller": name})
    else:
        current["caller"] = name
    return name
