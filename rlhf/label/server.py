"""The labelling web app (FastAPI, served by uvicorn on 127.0.0.1 by default).

Pages: / (sign in), /label (one pair, side by side), /admin (statistics, admins only).
JSON API (Authorization: Bearer <token>): GET /api/next, POST /api/labels, GET /api/labels.
Every endpoint but the sign-in page needs a valid token (cookie or bearer): 401 without one,
403 for an admin page without admin rights. Which response is shown on the left is decided by
the server from (pair, annotator), never taken from the client, so sources stay hidden and a
client cannot mislabel by swapping sides. Endpoints are plain `def`s: FastAPI runs them in its
thread pool, and each write is one committed transaction before the response goes out.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, Field
from starlette.middleware.base import BaseHTTPMiddleware

from rlhf.label import pages, store

COOKIE = "rlhf_token"
MAX_BODY = 64 * 1024  # bytes; a label is a few hundred
MAX_COMMENT = 2000


class LabelIn(BaseModel):
    pair_id: int
    choice: Literal["left", "right", "tie", "both_bad"]
    strength: int | None = Field(default=None, ge=1, le=3)
    comment: str = Field(default="", max_length=MAX_COMMENT)


def left_is_a(pair_id: int, annotator_id: int) -> bool:
    """The side each annotator sees candidate A on: fixed per (pair, annotator), 50/50 overall."""
    return hashlib.sha256(f"{pair_id}:{annotator_id}".encode()).digest()[0] % 2 == 0


class LimitBody(BaseHTTPMiddleware):
    """Refuse oversized requests before reading them (413), and bodies with no declared length."""

    async def dispatch(self, request: Request, call_next):
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return JSONResponse({"detail": "a Content-Length header is required"}, status_code=411)
            if int(length) > MAX_BODY:
                return JSONResponse({"detail": f"request body over {MAX_BODY} bytes"}, status_code=413)
        return await call_next(request)


def create_app(db: str) -> FastAPI:
    engine = store.connect(db)
    app = FastAPI(title="rlhf preference labelling", docs_url=None, redoc_url=None)
    app.add_middleware(LimitBody)

    def annotator(request: Request) -> dict[str, Any]:
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else request.cookies.get(COOKIE)
        who = store.annotator_for(engine, token)
        if who is None:
            raise HTTPException(401, "sign in with a valid access token")
        return who

    def shown(pair: dict[str, Any], who: dict[str, Any]) -> dict[str, Any]:
        a_left = left_is_a(pair["pair_id"], who["id"])
        return {"pair_id": pair["pair_id"], "prompt": pair["prompt"], "left": pair["a"] if a_left else pair["b"],
                "right": pair["b"] if a_left else pair["a"]}

    def save(who: dict[str, Any], label: LabelIn) -> int:
        p = store.pair(engine, label.pair_id)
        if p is None:
            raise HTTPException(404, f"no pair {label.pair_id}")
        a_left = left_is_a(p["id"], who["id"])
        choice = {"left": "a" if a_left else "b", "right": "b" if a_left else "a"}.get(label.choice, label.choice)
        strength = label.strength if choice in ("a", "b") else None
        try:
            return store.add_label(engine, pair_id=p["id"], annotator_id=who["id"], choice=choice, strength=strength,
                                   comment=label.comment, left_id=p["a_id"] if a_left else p["b_id"])
        except store.AlreadyLabelled as e:
            raise HTTPException(409, str(e)) from None

    @app.exception_handler(HTTPException)
    def errors(request: Request, exc: HTTPException):
        if request.url.path.startswith("/api/") or request.method != "GET":
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        if exc.status_code == 401:
            return HTMLResponse(pages.render(pages.LOGIN, "Sign in", error=exc.detail), status_code=401)
        return HTMLResponse(pages.render("<p class='error'>{{ m }}</p>", "Error", m=exc.detail),
                            status_code=exc.status_code)

    @app.get("/", response_class=HTMLResponse)
    def login_page(request: Request):
        if store.annotator_for(engine, request.cookies.get(COOKIE)):
            return RedirectResponse("/label", status_code=303)
        return pages.render(pages.LOGIN, "Sign in")

    @app.post("/login")
    def login(token: str = Form(max_length=200)):
        if store.annotator_for(engine, token) is None:
            return HTMLResponse(pages.render(pages.LOGIN, "Sign in", error="That token is not valid."), status_code=401)
        resp = RedirectResponse("/label", status_code=303)
        resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", max_age=30 * 24 * 3600)
        return resp

    @app.post("/logout")
    def logout():
        resp = RedirectResponse("/", status_code=303)
        resp.delete_cookie(COOKIE)
        return resp

    @app.get("/label", response_class=HTMLResponse)
    def label_page(who: dict = Depends(annotator)):
        prog = store.progress(engine, who["id"])
        pair = store.next_pair(engine, who["id"])
        if pair is None:
            return pages.render(pages.DONE, "All done", signed_in=True, **prog)
        return pages.render(pages.LABEL, "Label", signed_in=True, name=who["name"], **prog, **shown(pair, who))

    @app.post("/label")
    def label_form(pair_id: int = Form(), choice: str = Form(), strength: int | None = Form(None),
                   comment: str = Form(""), who: dict = Depends(annotator)):
        try:
            label = LabelIn(pair_id=pair_id, choice=choice, strength=strength, comment=comment)
        except ValueError as e:
            raise HTTPException(422, f"invalid label: {e}") from None
        save(who, label)
        return RedirectResponse("/label", status_code=303)

    @app.post("/skip")
    def skip(pair_id: int = Form(), who: dict = Depends(annotator)):
        if store.pair(engine, pair_id) is None:
            raise HTTPException(404, f"no pair {pair_id}")
        store.add_skip(engine, pair_id, who["id"])
        return RedirectResponse("/label", status_code=303)

    @app.get("/admin", response_class=HTMLResponse)
    def admin(who: dict = Depends(annotator)):
        if not who["is_admin"]:
            raise HTTPException(403, "the statistics page is for admins")
        from rlhf.label.project import stats

        return pages.render(pages.ADMIN, "Statistics", signed_in=True, s=stats(engine))

    @app.get("/api/next")
    def api_next(who: dict = Depends(annotator)):
        pair = store.next_pair(engine, who["id"])
        return {"pair": shown(pair, who) if pair else None, "progress": store.progress(engine, who["id"])}

    @app.post("/api/labels", status_code=201)
    def api_label(label: LabelIn, who: dict = Depends(annotator)):
        return {"label_id": save(who, label)}

    @app.get("/api/labels")
    def api_own_labels(who: dict = Depends(annotator)):
        return {"labels": store.own_labels(engine, who["id"])}  # only the caller's own labels

    return app


def serve(db: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    app = create_app(db)
    print(f"[rlhf] labelling app on http://{host}:{port}/ (database {db})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
