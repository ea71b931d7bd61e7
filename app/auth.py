"""API keys and tenants.

``METASENT_API_KEYS`` lists bearer tokens; each is its own tenant. Only their SHA-256 hashes are
kept in memory, compared in constant time, and a tenant's id is derived from its key's hash
(never the key). With no key set the server is open: every request is tenant ``default``.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import ApiError

DEFAULT_TENANT = "default"
_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key from the server's METASENT_API_KEYS, sent as `Authorization: Bearer <key>`.",
)


def _sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """The hashes of the accepted API keys and their tenants.

    Args:
        keys (`list[str]`): the bearer tokens; empty for an open single-tenant server.
    """

    def __init__(self, keys: list[str]) -> None:
        self._hashes = [_sha256(key) for key in dict.fromkeys(keys)]

    @property
    def open(self) -> bool:
        """Whether no key is set (every request is tenant ``default``)."""
        return not self._hashes

    def tenant(self, key: str) -> str | None:
        """The tenant of ``key``, or ``None`` when it is not an accepted key.

        Every stored hash is compared (in constant time), whichever matches.
        """
        candidate = _sha256(key)
        found = None
        for stored in self._hashes:
            if hmac.compare_digest(candidate, stored):
                found = stored
        return None if found is None else f"t-{found[:16]}"


def _unauthorised(code: str, message: str) -> ApiError:
    return ApiError(
        401,
        code,
        message,
        "Authorization",
        "send the header 'Authorization: Bearer <key>' with a key from the server's METASENT_API_KEYS",
        headers={"WWW-Authenticate": "Bearer"},
    )


async def require_tenant(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
) -> str:
    """The caller's tenant, from its bearer token.

    Returns:
        `str`: the tenant id (``default`` on an open server).

    Raises:
        ApiError: 401 when the key is missing, not a bearer token, or not accepted.
    """
    keyring: KeyRing = request.app.state.keyring
    if keyring.open:
        return DEFAULT_TENANT
    if credentials is None:
        raise _unauthorised("missing_api_key", "this server needs an API key")
    tenant = keyring.tenant(credentials.credentials)
    if tenant is None:
        raise _unauthorised("invalid_api_key", "the API key is not accepted")
    return tenant


TenantDep = Annotated[str, Depends(require_tenant)]
