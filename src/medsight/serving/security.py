"""What keeps the server safe in a browser's world and never answers a bare 500.

Pure ASGI pieces, importable without torch (the server answers ``/health`` before the model is
loaded): which ``Host`` headers are trusted (DNS rebinding), the security headers and the
Content-Security-Policy of every response, the same-origin proof that state-changing requests
carry when no token is configured (cross-site request forgery), the minimum strength of a
token, and a last-resort handler that turns anything unexpected into a logged 500 with an
error id.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import re
import traceback
import uuid

from starlette.responses import JSONResponse

log = logging.getLogger("medsight.serving")

#: Host names of this machine's loopback interface, as a browser writes them in ``Host``.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")

#: The header (and value) the page sends with every request. A cross-site HTML form cannot set
#: a header, and a cross-site script can only by a CORS preflight, which this server never
#: answers: so its presence proves the request came from a page of this origin.
SAME_ORIGIN_HEADER = "X-Requested-With"
SAME_ORIGIN_VALUE = "medsight"

#: Methods that change nothing; every other method needs the token or the same-origin header.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

#: Shortest bearer token accepted on an address other machines can reach.
MIN_TOKEN_LENGTH = 16

#: The page's policy: its own scripts and styles only (no inline ones), pictures also from
#: ``data:`` (heat maps) and ``blob:`` (previews of the chosen file), never framed.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)

SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_header_form(host: str) -> str:
    """How a browser writes ``host`` in a ``Host`` header (IPv6 literals in brackets)."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host.lower()
    return f"[{address}]" if address.version == 6 else str(address)


def allowed_hosts(bind: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The ``Host`` header values the server answers, from the address it listens on.

    Loopback binds answer the loopback names only, so a page on another domain that rebinds
    its name to 127.0.0.1 is refused. A specific address answers that address. A wildcard
    bind (0.0.0.0, ::) answers any name unless ``--allowed-host`` names them: it always needs
    a token, which a rebinding page does not have. ``extra`` (``--allowed-host``) is added.

    >>> allowed_hosts("127.0.0.1")
    ['localhost', '127.0.0.1', '[::1]']
    >>> allowed_hosts("0.0.0.0", ["scanner.example.org"])
    ['scanner.example.org', 'localhost', '127.0.0.1', '[::1]']
    """
    named = [_host_header_form(h.strip()) for h in extra if h.strip()]
    if is_loopback(bind):
        hosts = [*LOOPBACK_HOSTS, _host_header_form(bind)]
    elif bind in ("0.0.0.0", "::", "[::]", ""):
        hosts = [*named, *LOOPBACK_HOSTS] if named else ["*"]
    else:
        hosts = [_host_header_form(bind)]
    return list(dict.fromkeys([*named, *hosts]))


def token_problem(token: str | None, host: str) -> str | None:
    """Why ``token`` is not good enough to serve on ``host``, or None when it is."""
    if is_loopback(host):
        return None
    if not token:
        return "a bearer token is required"
    if len(token) < MIN_TOKEN_LENGTH:
        return (
            f"the bearer token has {len(token)} characters, fewer than the "
            f"{MIN_TOKEN_LENGTH} needed (e.g. python -c 'import secrets; "
            "print(secrets.token_urlsafe(24))')"
        )
    return None


def same_origin_proven(headers) -> bool:
    """True when the request carries the header only a page of this origin can send."""
    return headers.get(SAME_ORIGIN_HEADER, "").strip().lower() == SAME_ORIGIN_VALUE


def script_hash_csp(html: str, sources: str) -> str:
    """A CSP for a page of our own making (FastAPI's ``/docs``) with inline scripts: each
    inline script allowed by its SHA-256, nothing else inline; ``sources`` adds origins."""
    hashes = []
    for body in re.findall(r"<script>(.*?)</script>", html, flags=re.S):
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        hashes.append(f"'sha256-{digest}'")
    return (
        f"default-src 'none'; script-src 'self' {sources} {' '.join(hashes)}; "
        f"style-src 'self' {sources} 'unsafe-inline'; img-src 'self' data: {sources}; "
        f"connect-src 'self'; worker-src blob:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


class SecurityHeaders:
    """ASGI middleware: the security headers on every response (a response may set its own
    Content-Security-Policy, as ``/docs`` does)."""

    def __init__(self, app, headers: dict[str, str] | None = None):
        self.app = app
        self.headers = [(k.encode(), v.encode()) for k, v in (headers or SECURITY_HEADERS).items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.headers if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class TrackedSend:
    """An ASGI ``send`` that remembers whether the response's status line went out: after it,
    a middleware can no longer answer with a response of its own."""

    def __init__(self, send):
        self.send, self.started = send, False

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)


class CatchAll:
    """ASGI middleware: anything a route did not expect becomes a 500 JSON body with an error
    id; the traceback goes to the log under that id, never to the client."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        tracked = TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:  # noqa: BLE001 - the last line of defence: log it, answer 500
            error_id = uuid.uuid4().hex[:12]
            log.error(
                "error_id=%s %s %s failed: %s: %s\n%s",
                error_id,
                scope.get("method"),
                scope.get("path"),
                type(exc).__name__,
                exc,
                "".join(traceback.format_exception(exc)),
            )
            if tracked.started:  # the status line is gone: all that is left is to end it
                return
            body = {
                "detail": f"internal error; the server's log holds the details under {error_id}",
                "error_id": error_id,
            }
            await JSONResponse(body, status_code=500)(scope, receive, send)
