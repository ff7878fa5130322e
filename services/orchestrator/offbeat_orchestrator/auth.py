"""Bearer-token authentication of the admin API: where the token comes from, and the interceptor.

Every call must carry `authorization: Bearer <token>`; the comparison is constant-time. Missing
or wrong -> `UNAUTHENTICATED`, with a message that never contains either token. The standard
health service is exempt (probes cannot send credentials); reflection and `AdminService` are not.

The token comes from `OFFBEAT_ADMIN_TOKEN`, else from the file `[orchestrator] admin_token_file`
names; with neither, a random one is generated into `<state_dir>/<run>/admin.token` (mode 0600)
so the API is never open. The token is never logged or stored in the ledger.

Not covered: authorisation (every valid token may do everything) or token rotation.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import grpc
import grpc.aio

TOKEN_ENV: Final = "OFFBEAT_ADMIN_TOKEN"
EXEMPT_PREFIXES: Final = ("/grpc.health.v1.Health/",)

Denied = Callable[[str, grpc.aio.ServicerContext], Awaitable[None]]


def load_token(token_file: str, *, fallback_dir: Path) -> tuple[str, str]:
    """(token, where it came from). Raises ValueError for an unreadable or empty token file."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise ValueError(f"admin token file {str(path)!r} does not exist")
        token = path.read_text().strip()
        if not token:
            raise ValueError(f"admin token file {str(path)!r} is empty")
        return token, str(path)
    path = fallback_dir / "admin.token"
    if not path.is_file() or not path.read_text().strip():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip(), str(path)


def token_matches(header: str, token: str) -> bool:
    return hmac.compare_digest(header.encode(), f"Bearer {token}".encode())


class BearerAuth(grpc.aio.ServerInterceptor):
    """Refuses every call (but health checks) whose `authorization` metadata is not the token."""

    def __init__(self, token: str, *, on_denied: Denied | None = None) -> None:
        if not token:
            raise ValueError("empty admin token")
        self._token = token
        self._on_denied = on_denied

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())  # type: ignore[attr-defined]
        header = metadata.get("authorization", "")
        if isinstance(header, str) and token_matches(header, self._token):
            return handler
        why = "missing bearer token" if not header else "invalid bearer token"
        return _refusing(handler, method, f"{why}: send 'authorization: Bearer <token>'", self._on_denied)


def _refusing(handler: Any, method: str, message: str, on_denied: Denied | None) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts with UNAUTHENTICATED."""

    async def deny(context: grpc.aio.ServicerContext) -> None:
        if on_denied is not None:
            await on_denied(method, context)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await deny(context)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await deny(context)
        yield  # pragma: no cover - an async generator that never yields

    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, des, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, des, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, des, ser)
    return grpc.unary_unary_rpc_method_handler(unary, des, ser)
