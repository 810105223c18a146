"""What stands between the labelling app and a hostile network or browser page.

- `Guard` (middleware): refuses oversized bodies and bodies with no declared length; refuses
  state-changing requests that a browser sent from another origin (CSRF), unless they carry a
  bearer token, which a browser never attaches on its own; puts the security headers on every
  answer (CSP without inline code, nosniff, no framing, no caching of pages holding labels).
- `csrf_token`: the per-session token every form carries, derived from the session id.
- `LoginLimiter`: failed sign-ins per client, 429 after too many in a window.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections import OrderedDict, deque
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.middleware.base import BaseHTTPMiddleware

from rlhf.label import pages

MAX_BODY = 64 * 1024  # bytes; a label is a few hundred
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
HEADERS = {
    # Only our own stylesheet and script, no inline code, forms post only to us, no framing at all.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",  # pages show someone's labels: no copy in caches or history
}


def is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def error_page(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """JSON for the API, a readable page (with a way back) for the browser."""
    if is_api(request):
        return JSONResponse({"detail": message}, status_code=status, headers=headers)
    return HTMLResponse(
        pages.render(pages.MESSAGE, "Not saved" if request.method == "POST" else "Error", message=message),
        status_code=status,
        headers=headers,
    )


def has_bearer(request: Request) -> bool:
    return request.headers.get("authorization", "").lower().startswith("bearer ")


def same_origin(request: Request) -> bool:
    """The browser says the request comes from a page of this app: Origin (or, without it, Referer)
    names the host and port the request was sent to. No Origin and no Referer, or Origin "null"
    (sandboxed frames, privacy redirects), counts as foreign. The scheme is not compared: behind a
    TLS proxy the page is https while the app itself hears http."""
    source = request.headers.get("origin") or request.headers.get("referer")
    host = request.headers.get("host")
    if not source or source == "null" or not host:
        return False
    return urlsplit(source).netloc.lower() == host.lower()


class Guard(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next):
        response = self._refuse(request) or await call_next(request)
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @staticmethod
    def _refuse(request: Request) -> Response | None:
        if request.method in SAFE_METHODS:
            return None
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            return error_page(request, 411, "a Content-Length header is required")
        if int(length) > MAX_BODY:
            return error_page(request, 413, f"request body over {MAX_BODY} bytes")
        if not has_bearer(request) and not same_origin(request):
            return error_page(
                request,
                403,
                "refused: this form was sent from another site (or without an Origin "
                "header); open the labelling page itself and try again",
            )
        return None


def csrf_token(session_id: str) -> str:
    """The token a signed-in page's forms carry: only a page that knows the (HttpOnly) session id
    can have it, so another page's form cannot forge a post even where the cookie goes along."""
    return hmac.new(session_id.encode(), b"rlhf-label-form", "sha256").hexdigest()


def csrf_ok(sent: str, expected: str) -> bool:
    return bool(sent) and hmac.compare_digest(sent.encode("utf-8", "surrogatepass"), expected.encode())


class LoginLimiter:
    """At most `max_failures` failed sign-ins per client in `window_s` seconds, then 429 until the
    oldest failure leaves the window. Kept in memory (one server process); bounded in clients."""

    def __init__(self, max_failures: int, window_s: float, max_clients: int = 10_000, clock=time.monotonic):
        self.max_failures, self.window_s, self.max_clients, self.clock = max_failures, window_s, max_clients, clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> int | None:
        """Seconds until this client may try again, or None when it may now."""
        with self._lock:
            times = self._recent(client)
            if len(times) < self.max_failures:
                return None
            return max(1, int(times[0] + self.window_s - self.clock()) + 1)

    def failed(self, client: str) -> None:
        with self._lock:
            self._recent(client, create=True).append(self.clock())
            self._failures.move_to_end(client)
            while len(self._failures) > self.max_clients:  # forget the longest-quiet clients first
                self._failures.popitem(last=False)

    def _recent(self, client: str, create: bool = False) -> deque[float]:
        times = self._failures.setdefault(client, deque()) if create else self._failures.get(client, deque())
        while times and times[0] <= self.clock() - self.window_s:
            times.popleft()
        return times
