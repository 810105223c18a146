"""The labelling web app (FastAPI, served by uvicorn on 127.0.0.1 by default).

Pages: / (sign in), /label (one pair, side by side), /admin (statistics, admins only).
JSON API (Authorization: Bearer <token>, for scripts): GET /api/next, POST /api/labels, GET /api/labels.

Who is asking: a bearer token (scripts), or a browser session. Signing in with the token starts a
server-side session (random id in an HttpOnly, SameSite=Strict cookie, stored hashed, expiring);
signing out ends it on the server; `rlhf label revoke` ends every session and the token. Every
endpoint but the sign-in page needs one of the two: 401 without, 403 for an admin page without
admin rights. Browser form posts must come from the app's own pages (Origin check and a per-session
CSRF token, see security.py). Labels are only taken for the pair the server served to that
annotator, never beyond the pair's overlap (assign.py). Which response is shown on the left is
decided by the server from (pair, annotator), never taken from the client, so sources stay hidden
and a client cannot mislabel by swapping sides. Endpoints are plain `def`s: FastAPI runs them in its
thread pool, and each write is one committed transaction before the response goes out.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import sys
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhf.label import assign, pages, store
from rlhf.label.security import Guard, LoginLimiter, csrf_ok, csrf_token, error_page, is_api

SESSION_COOKIE = "rlhf_session"
LOGIN_COOKIE = "rlhf_login"  # the sign-in form's own CSRF value (double submit), before any session exists
MAX_COMMENT = 2000
MAX_ID = 2**63 - 1  # the databases' integer range: anything larger is no pair, and must not reach SQL


@dataclass(frozen=True)
class Settings:
    lease_s: float = assign.DEFAULT_LEASE_S  # how long a served pair is held for its annotator
    session_s: float = 12 * 3600  # a browser sign-in lasts a working day
    secure_cookies: bool = False  # also on by itself for requests that arrived over https
    login_failures: int = 10  # failed sign-ins per client in login_window_s before 429
    login_window_s: float = 300.0


class LabelIn(BaseModel):
    """A label as the API takes it: strict JSON types (no `true` for 1, no "3" or 3.0 for 3), known
    fields only, and text the database can store."""

    model_config = ConfigDict(strict=True, extra="forbid")
    pair_id: int = Field(ge=1, le=MAX_ID)
    choice: Literal["left", "right", "tie", "both_bad", "good", "bad"]  # the last two: single-response projects
    strength: int | None = Field(default=None, ge=1, le=3)
    comment: str = Field(default="", max_length=MAX_COMMENT)

    @field_validator("comment")
    @classmethod
    def storable(cls, v: str) -> str:
        if "\x00" in v:  # PostgreSQL text cannot hold NUL
            raise ValueError("a comment cannot contain NUL characters")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: valid JSON escape, not valid text
            raise ValueError("a comment must be valid Unicode text (it has a lone surrogate)") from None
        return v


@dataclass(frozen=True)
class Caller:
    id: int
    name: str
    is_admin: bool
    session: str | None  # the browser session id; None for a bearer token

    @property
    def csrf(self) -> str | None:
        return csrf_token(self.session) if self.session else None


def left_is_a(pair_id: int, annotator_id: int) -> bool:
    """The side each annotator sees candidate A on: fixed per (pair, annotator), 50/50 overall."""
    return hashlib.sha256(f"{pair_id}:{annotator_id}".encode()).digest()[0] % 2 == 0


def describe(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validation errors without the input echoed back: it may be huge, NaN, or not encodable."""
    clean = lambda v: str(v).encode("utf-8", "backslashreplace").decode()[:200]  # noqa: E731
    return [{"loc": [clean(x) for x in e["loc"]], "msg": clean(e["msg"]), "type": e["type"]} for e in errors]


class Ctx:
    """What the routes share: the database, the settings and the sign-in limiter."""

    def __init__(self, db: str, settings: Settings):
        self.engine = store.connect(db)
        self.mode = store.mode(self.engine)  # fixed when the project is made
        self.settings = settings
        self.limiter = LoginLimiter(settings.login_failures, settings.login_window_s)

    def caller(self, request: Request) -> Caller:
        auth = request.headers.get("authorization", "")
        session = None
        if auth.lower().startswith("bearer "):
            row = store.annotator_for(self.engine, auth[7:])
        else:
            session = request.cookies.get(SESSION_COOKIE)
            row = store.annotator_for_session(self.engine, session)
        if row is None:
            raise HTTPException(
                401, "sign in with a valid access token" if session is None else "your session has ended; sign in again"
            )
        return Caller(row["id"], row["name"], bool(row["is_admin"]), session)

    def form_caller(self, request: Request, csrf: str = Form("", max_length=200)) -> Caller:
        """The caller of a browser form post: a session's form must carry that session's token."""
        who = self.caller(request)
        if who.session is not None and not csrf_ok(csrf, who.csrf or ""):
            raise HTTPException(403, "this form is out of date or came from another page; reload the page")
        return who

    def secure(self, request: Request) -> bool:
        return self.settings.secure_cookies or request.url.scheme == "https"

    def login_page(
        self, request: Request, error: str | None = None, status: int = 200, headers: dict[str, str] | None = None
    ) -> HTMLResponse:
        value = request.cookies.get(LOGIN_COOKIE, "")
        if not re.fullmatch(r"[A-Za-z0-9_-]{32}", value):
            value = secrets.token_urlsafe(24)
        resp = HTMLResponse(
            pages.render(pages.LOGIN, "Sign in", error=error, login_csrf=value), status_code=status, headers=headers
        )
        resp.set_cookie(LOGIN_COOKIE, value, httponly=True, samesite="strict", secure=self.secure(request))
        return resp

    def shown(self, pair: dict[str, Any], who: Caller) -> dict[str, Any]:
        if self.mode == "single":
            return {"pair_id": pair["pair_id"], "prompt": pair["prompt"], "response": pair["a"], "mode": "single"}
        a_left = left_is_a(pair["pair_id"], who.id)
        return {
            "pair_id": pair["pair_id"],
            "prompt": pair["prompt"],
            "left": pair["a"] if a_left else pair["b"],
            "right": pair["b"] if a_left else pair["a"],
        }

    def save(self, who: Caller, label: LabelIn, repeat_ok: bool = False) -> int | None:
        """Store a label; 404 / 403 (not served to you) / 409 (yours already, or the pair is full).
        With repeat_ok, a label this caller already gave is not an error (None)."""
        p = store.pair(self.engine, label.pair_id)
        if p is None:
            raise HTTPException(404, f"no pair {label.pair_id}")
        a_left = left_is_a(p["id"], who.id)
        choice = {"left": "a" if a_left else "b", "right": "b" if a_left else "a"}.get(label.choice, label.choice)
        if choice not in store.CHOICES[self.mode]:
            allowed = ("good", "bad") if self.mode == "single" else ("left", "right", "tie", "both_bad")
            raise HTTPException(
                422,
                f"this project labels {'single responses' if self.mode == 'single' else 'pairs'}"
                f": choice must be one of {', '.join(allowed)}, not {label.choice!r}",
            )
        strength = label.strength if choice in ("a", "b") else None
        try:
            return assign.add_label(
                self.engine,
                pair_id=p["id"],
                annotator_id=who.id,
                choice=choice,
                strength=strength,
                comment=label.comment,
                left_id=p["a_id"] if a_left else p["b_id"],
            )
        except store.AlreadyLabelled as e:
            if repeat_ok:
                return None
            raise HTTPException(409, str(e)) from None
        except store.NotServed as e:
            raise HTTPException(403, str(e)) from None
        except store.PairFull as e:
            raise HTTPException(409, str(e)) from None


def create_app(db: str, settings: Settings | None = None) -> FastAPI:
    ctx = Ctx(db, settings or Settings())
    # No /docs, /redoc or /openapi.json: the schema is for us, not for whoever finds the port.
    app = FastAPI(title="rlhf preference labelling", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard)
    _error_handlers(app, ctx)
    for router in (_static_routes(), _sign_in_routes(ctx), _page_routes(ctx), _api_routes(ctx)):
        app.include_router(router)
    return app


def _error_handlers(app: FastAPI, ctx: Ctx) -> None:
    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 401 and not is_api(request):
            return ctx.login_page(request, str(exc.detail), 401)
        return error_page(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    def invalid(request: Request, exc: RequestValidationError) -> Response:
        problems = describe(list(exc.errors()))
        if is_api(request):
            return JSONResponse({"detail": problems}, status_code=422)
        said = "; ".join(f"{'.'.join(p['loc'][1:]) or 'form'}: {p['msg']}" for p in problems)
        return error_page(request, 422, f"invalid form: {said}")


def _static_routes() -> APIRouter:
    r = APIRouter()

    @r.get("/static/app.css")
    def css() -> Response:
        return PlainTextResponse(pages.CSS, media_type="text/css")

    @r.get("/static/label.js")
    def js() -> Response:
        return PlainTextResponse(pages.JS, media_type="text/javascript")

    return r


def _sign_in_routes(ctx: Ctx) -> APIRouter:
    r = APIRouter()

    @r.get("/", response_class=HTMLResponse)
    def home(request: Request) -> Response:
        if store.annotator_for_session(ctx.engine, request.cookies.get(SESSION_COOKIE)):
            return RedirectResponse("/label", status_code=303)
        return ctx.login_page(request)

    @r.post("/login")
    def login(request: Request, token: str = Form(""), login_csrf: str = Form("")) -> Response:
        client = request.client.host if request.client else "unknown"
        wait = ctx.limiter.retry_after(client)
        if wait is not None:
            return ctx.login_page(
                request, f"Too many failed sign-ins; try again in {wait} seconds.", 429, {"Retry-After": str(wait)}
            )
        if not csrf_ok(login_csrf, request.cookies.get(LOGIN_COOKIE, "")):
            return ctx.login_page(request, "The sign-in form had expired; please sign in again.", 403)
        row = store.annotator_for(ctx.engine, token) if len(token) <= 200 else None  # the body is capped at 64 KB
        if row is None:
            ctx.limiter.failed(client)
            return ctx.login_page(request, "That token is not valid.", 401)
        sid = store.new_session(ctx.engine, row["id"], ctx.settings.session_s)
        resp = RedirectResponse("/label", status_code=303)
        resp.set_cookie(
            SESSION_COOKIE,
            sid,
            max_age=int(ctx.settings.session_s),
            httponly=True,
            samesite="strict",
            secure=ctx.secure(request),
        )
        resp.delete_cookie(LOGIN_COOKIE)
        return resp

    @r.post("/logout")
    def logout(who: Caller = Depends(ctx.form_caller)) -> Response:
        store.end_session(ctx.engine, who.session)  # the cookie is dead on the server, not only in this browser
        resp = RedirectResponse("/", status_code=303)
        resp.delete_cookie(SESSION_COOKIE)
        return resp

    return r


def _page_routes(ctx: Ctx) -> APIRouter:
    r = APIRouter()

    @r.get("/label", response_class=HTMLResponse)
    def label_page(who: Caller = Depends(ctx.caller)) -> str:
        prog = assign.progress(ctx.engine, who.id)
        pair = assign.next_pair(ctx.engine, who.id, ctx.settings.lease_s)
        if pair is None:
            return pages.render(pages.DONE, "All done", csrf=who.csrf, **prog)
        page = pages.LABEL_SINGLE if ctx.mode == "single" else pages.LABEL
        return pages.render(page, "Label", csrf=who.csrf, name=who.name, **prog, **ctx.shown(pair, who))

    @r.post("/label")
    def label_form(
        pair_id: int = Form(ge=1, le=MAX_ID),
        choice: str = Form(max_length=20),
        strength: int | None = Form(None, ge=1, le=3),
        comment: str = Form("", max_length=MAX_COMMENT),
        who: Caller = Depends(ctx.form_caller),
    ) -> Response:
        try:
            label = LabelIn(pair_id=pair_id, choice=choice, strength=strength, comment=comment)
        except ValidationError as e:
            raise HTTPException(
                422,
                "invalid label: " + "; ".join(f"{'.'.join(p['loc'])}: {p['msg']}" for p in describe(list(e.errors()))),
            ) from None
        # A second press of the same page posts the same pair again: the first label stands, and
        # the annotator simply goes on to the next pair instead of seeing an error.
        ctx.save(who, label, repeat_ok=True)
        return RedirectResponse("/label", status_code=303)

    @r.post("/skip")
    def skip(pair_id: int = Form(ge=1, le=MAX_ID), who: Caller = Depends(ctx.form_caller)) -> Response:
        if store.pair(ctx.engine, pair_id) is None:
            raise HTTPException(404, f"no pair {pair_id}")
        try:
            assign.add_skip(ctx.engine, pair_id, who.id)
        except store.NotServed as e:
            raise HTTPException(403, str(e)) from None
        return RedirectResponse("/label", status_code=303)

    @r.get("/admin", response_class=HTMLResponse)
    def admin(who: Caller = Depends(ctx.caller)) -> str:
        if not who.is_admin:
            raise HTTPException(403, "the statistics page is for admins")
        from rlhf.label.project import stats

        return pages.render(pages.ADMIN, "Statistics", csrf=who.csrf, s=stats(ctx.engine))

    return r


def _api_routes(ctx: Ctx) -> APIRouter:
    r = APIRouter(prefix="/api")

    @r.get("/next")
    def api_next(who: Caller = Depends(ctx.caller)) -> dict[str, Any]:
        pair = assign.next_pair(ctx.engine, who.id, ctx.settings.lease_s)
        return {"pair": ctx.shown(pair, who) if pair else None, "progress": assign.progress(ctx.engine, who.id)}

    @r.post("/labels", status_code=201)
    def api_label(label: LabelIn, who: Caller = Depends(ctx.caller)) -> dict[str, Any]:
        return {"label_id": ctx.save(who, label)}

    @r.get("/labels")
    def api_own_labels(who: Caller = Depends(ctx.caller)) -> dict[str, Any]:
        return {"labels": assign.own_labels(ctx.engine, who.id)}  # only the caller's own labels

    return r


def exposure_warning(host: str) -> str | None:
    """A warning for a host other machines can reach: the app speaks plain HTTP."""
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass  # a host name: assume reachable
    return (
        f"[rlhf] WARNING: serving on {host}: other machines can reach this plain-HTTP server, and access "
        "tokens and session cookies would cross the network unencrypted. For a team, keep the app on "
        "127.0.0.1 behind a reverse proxy that terminates TLS (nginx, caddy; see docs/labelling.md) and pass "
        "--secure-cookies."
    )


def serve(db: str, host: str = "127.0.0.1", port: int = 8000, settings: Settings | None = None) -> None:
    import uvicorn

    app = create_app(db, settings)
    warning = exposure_warning(host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(f"[rlhf] labelling app on http://{host}:{port}/ (database {db})", flush=True)
    # X-Forwarded-For / -Proto are believed only from a proxy on this machine: they set the client
    # address the sign-in limiter counts, and https turns the Secure cookie flag on.
    uvicorn.run(app, host=host, port=port, log_level="warning", proxy_headers=True, forwarded_allow_ips="127.0.0.1")
