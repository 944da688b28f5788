"""Bearer tokens: the admin (ops) API always needs one; the diagnosis API needs one if configured.

With no admin token configured the admin API is *closed* (every call refused), never open.
Tokens are compared in constant time. The same checks serve REST (``Authorization`` header)
and gRPC (``authorization`` metadata). ``/metrics`` lists adapter names, so it follows the
diagnosis token unless the configuration makes it public.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from medlego.runtime.config import ADMIN_TOKEN_ENV, AuthConfig
from medlego.runtime.errors import ForbiddenError, UnauthenticatedError


def bearer(value: str | None) -> str | None:
    """The token of an 'Authorization: Bearer <token>' value (None when absent or not a bearer)."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class Auth:
    admin_token: str | None = None  # None: the admin API is closed
    api_token: str | None = None  # None: diagnosis is open
    metrics_public: bool = False

    @staticmethod
    def from_config(cfg: AuthConfig) -> "Auth":
        return Auth(cfg.admin_token or None, cfg.api_token or None, cfg.metrics_public)

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

    def check_metrics(self, authorization: str | None) -> None:
        if not self.metrics_public:
            self.check_api(authorization)
