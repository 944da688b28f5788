"""Bearer tokens: the admin (ops) API always needs one; the diagnosis API needs one if configured.

With no admin token configured the admin API is *closed* (every call refused), never open.
Tokens are compared in constant time. The same checks serve REST (``Authorization`` header)
and gRPC (``authorization`` metadata).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from medlego.runtime.errors import MedlegoError

ADMIN_TOKEN_ENV = "MEDLEGO_ADMIN_TOKEN"
API_TOKEN_ENV = "MEDLEGO_API_TOKEN"


class UnauthenticatedError(MedlegoError):
    """No credentials where some are required (HTTP 401, gRPC UNAUTHENTICATED)."""

    status = 401


class ForbiddenError(MedlegoError):
    """Wrong credentials, or an API that is closed by configuration (HTTP 403, PERMISSION_DENIED)."""

    status = 403


def bearer(value: str | None) -> str | None:
    """The token of an 'Authorization: Bearer <token>' value (None when absent or not a bearer)."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


@dataclass(frozen=True)
class Auth:
    admin_token: str | None = None  # None: the admin API is closed
    api_token: str | None = None  # None: diagnosis is open

    def check_admin(self, authorization: str | None) -> None:
        if not self.admin_token:
            raise ForbiddenError(f"the admin API is closed: no admin token is configured (set {ADMIN_TOKEN_ENV})")
        token = bearer(authorization)
        if token is None:
            raise UnauthenticatedError("the admin API needs 'Authorization: Bearer <admin token>'")
        if not _matches(token, self.admin_token):
            raise ForbiddenError("wrong admin token")

    def check_api(self, authorization: str | None) -> None:
        if not self.api_token:
            return
        token = bearer(authorization)
        if token is None:
            raise UnauthenticatedError("this server needs 'Authorization: Bearer <API token>' for diagnosis")
        # the admin token also opens the diagnosis API (ops can test what they deploy)
        if not (_matches(token, self.api_token) or (self.admin_token and _matches(token, self.admin_token))):
            raise ForbiddenError("wrong API token")
