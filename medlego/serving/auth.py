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
from dataclasses import dataclass, field
from pathlib import Path

from medlego.runtime.registry.audit import CURRENT
from medlego.runtime.config import ADMIN_TOKEN_ENV, AuthConfig, read_toml
from medlego.runtime.errors import BadInputError, ForbiddenError, UnauthenticatedError


def bearer(value: str | None) -> str | None:
    """The token of an 'Authorization: Bearer <token>' value (None when absent or not a bearer)."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


ROLES = ("admin", "diagnose", "read")
# what each role may do; "api" is the MEDLEGO_API_TOKEN identity (diagnosis and registry reads, as
# before named callers), "open" the anonymous caller when no diagnosis token is configured at all
ALLOWED = {"admin": {"admin", "diagnose", "read", "audit"}, "diagnose": {"diagnose"},
           "read": {"read", "audit"}, "api": {"diagnose", "read"}, "open": {"diagnose", "read"}}
_WHAT = {"admin": "the admin API", "diagnose": "diagnosis", "read": "registry reads", "audit": "the audit log"}


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


@dataclass(frozen=True)
class Auth:
    admin_token: str | None = None  # None: the admin API is closed (unless a named admin exists)
    api_token: str | None = None  # None and no named callers: diagnosis is open
    metrics_public: bool = False
    callers: tuple[Caller, ...] = ()  # named callers from the tokens file
    # set by the service: refused(caller_name, action, reason) records a refusal in the audit log
    hooks: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @staticmethod
    def from_config(cfg: AuthConfig) -> "Auth":
        callers = load_tokens_file(cfg.tokens_file) if getattr(cfg, "tokens_file", None) else ()
        return Auth(cfg.admin_token or None, cfg.api_token or None, cfg.metrics_public, callers)

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
        return (*out, *self.callers)

    def _refuse(self, caller: str, action: str, error: Exception) -> Exception:
        hook = self.hooks.get("refused")
        if hook is not None:
            hook(caller, action, str(error))
        return error

    def check(self, authorization: str | None, action: str) -> str:
        """The caller's name when it may do `action` (admin | diagnose | read | audit); else 401/403."""
        open_diagnosis = not self.api_token and not self.callers
        if action == "admin" and not self.admin_token and not any(c.role == "admin" for c in self.callers):
            raise self._refuse("", action, ForbiddenError(
                f"the admin API is closed: no admin token is configured (set {ADMIN_TOKEN_ENV})"))
        token = bearer(authorization)
        if token is None:
            if action in ("diagnose", "read") and open_diagnosis:
                return _set_caller("anonymous")
            needs = {"admin": "the admin API needs 'Authorization: Bearer <admin token>'",
                     "diagnose": "this server needs 'Authorization: Bearer <API token>' for diagnosis",
                     "read": "this server needs 'Authorization: Bearer <API token>' for registry reads",
                     "audit": "the audit log needs 'Authorization: Bearer <admin or read token>'"}
            raise self._refuse("", action, UnauthenticatedError(needs[action]))
        caller = self.identify(token)
        if caller is None:
            if action in ("diagnose", "read") and open_diagnosis:
                return _set_caller("anonymous")
            wrong = {"admin": "wrong admin token", "diagnose": "wrong API token", "read": "wrong API token",
                     "audit": "unknown token"}
            raise self._refuse("", action, ForbiddenError(wrong[action]))
        if action not in ALLOWED[caller.role]:
            raise self._refuse(caller.name, action, ForbiddenError(
                f"caller '{caller.name}' (role {caller.role}) may not use {_WHAT[action]}"))
        return _set_caller(caller.name)

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
