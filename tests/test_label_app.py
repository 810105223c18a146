"""The labelling app through its HTTP interface (FastAPI's TestClient): auth, sessions, CSRF,
fair assignment, isolation between annotators, escaping, bad input, security headers, durability,
and the export feeding the reward stage. The browser-side facts are in test_label_browser.py."""

from __future__ import annotations

import datetime as dt
import json
import re
import sqlite3

import pytest
from fastapi.testclient import TestClient

from conftest import REPO
from label_helpers import make_project, put_label, race_for_pair_one
from rlhf.cli import main
from rlhf.config import load_recipe
from rlhf.label import project, store
from rlhf.label.security import LoginLimiter
from rlhf.label.server import Settings, create_app

ORIGIN = {"origin": "http://testserver"}  # what a browser sends with a post from the app's own page
FORM = {"content-type": "application/x-www-form-urlencoded"}  # for form bodies written byte by byte


@pytest.fixture()
def app(tmp_path):
    db = make_project(tmp_path, overlap=2, prompt_text=None)
    engine = store.connect(str(db))
    tokens = {name: store.add_annotator(engine, name, is_admin=(name == "admin")) for name in ("ann", "ben", "admin")}
    client = TestClient(create_app(str(db)), headers=ORIGIN)
    return client, tokens, db, engine


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def count_labels(db) -> int:
    with sqlite3.connect(db) as c:  # a separate connection: sees only what was committed
        return c.execute("select count(*) from labels").fetchone()[0]


def sql(db, query: str, *args):
    with sqlite3.connect(db) as c:
        return c.execute(query, args).fetchall()


def sign_in(client: TestClient, token: str, **kw):
    """What a browser does: open the sign-in page (its form carries a CSRF value), then post it."""
    page = client.get("/")
    value = re.search(r'name="login_csrf" value="([^"]+)"', page.text).group(1)
    return client.post("/login", data={"token": token, "login_csrf": value}, follow_redirects=False, **kw)


def form_token(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def served(client: TestClient, token: str) -> dict | None:
    return client.get("/api/next", headers=bearer(token)).json()["pair"]


def expire_leases(db) -> None:
    sql(db, "update assignments set expires_at = '2000-01-01 00:00:00.000000'")


# --- sign-in, sessions, isolation -----------------------------------------------------------------


def test_every_endpoint_but_login_needs_a_token(app):
    client, tokens, _, _ = app
    assert client.get("/").status_code == 200
    for method, path in (("get", "/label"), ("get", "/admin"), ("get", "/api/next"), ("get", "/api/labels")):
        assert getattr(client, method)(path).status_code == 401, path
        assert getattr(client, method)(path, headers=bearer("not-a-token")).status_code == 401, path
    assert client.post("/api/labels", json={"pair_id": 1, "choice": "left"}).status_code == 401
    assert client.post("/label", data={"pair_id": 1, "choice": "left"}).status_code == 401
    assert client.post("/skip", data={"pair_id": 1}).status_code == 401
    assert sign_in(client, "wrong").status_code == 401
    assert client.get("/admin", headers=bearer(tokens["ann"])).status_code == 403
    assert client.get("/admin", headers=bearer(tokens["admin"])).status_code == 200


def test_login_session_label_form_and_progress(app):
    client, tokens, db, _ = app
    r = sign_in(client, tokens["ann"])
    assert r.status_code == 303 and "httponly" in r.headers["set-cookie"].lower()
    assert "samesite=strict" in r.headers["set-cookie"].lower()
    page = client.get("/label")
    assert "you labelled <strong>0</strong>" in page.text
    pair_id = int(re.search(r'name="pair_id" value="(\d+)"', page.text).group(1))
    r = client.post(
        "/label",
        data={"pair_id": pair_id, "choice": "left", "strength": "3", "comment": "clear", "csrf": form_token(page.text)},
        follow_redirects=False,
    )
    assert r.status_code == 303 and count_labels(db) == 1  # committed before the answer
    assert "you labelled <strong>1</strong>" in client.get("/label").text


def test_the_cookie_is_a_server_side_session_not_the_token(app):
    client, tokens, db, _ = app
    sign_in(client, tokens["ann"])
    sid = client.cookies["rlhf_session"]
    assert sid != tokens["ann"] and tokens["ann"] not in str(sql(db, "select * from sessions"))
    assert sql(db, "select id_hash from sessions") == [(store.hash_token(sid),)]  # stored hashed
    # the token itself in the cookie (as the old app had it) signs nobody in
    fresh = TestClient(client.app, headers=ORIGIN, cookies={"rlhf_session": tokens["ann"], "rlhf_token": tokens["ann"]})
    assert fresh.get("/api/next").status_code == 401


def test_sessions_expire(tmp_path):
    db = make_project(tmp_path)
    token = store.add_annotator(store.connect(str(db)), "ann")
    client = TestClient(create_app(str(db), Settings(session_s=3600)), headers=ORIGIN)
    r = sign_in(client, token)
    assert "max-age=3600" in r.headers["set-cookie"].lower()
    (expires,) = sql(db, "select expires_at from sessions")[0]
    left = dt.datetime.fromisoformat(expires).replace(tzinfo=dt.timezone.utc) - dt.datetime.now(dt.timezone.utc)
    assert 3500 < left.total_seconds() <= 3600
    assert client.get("/api/next").status_code == 200
    sql(db, "update sessions set expires_at = '2000-01-01 00:00:00.000000'")  # an hour later...
    r = client.get("/label")
    assert r.status_code == 401 and "session has ended" in r.text


def test_logout_ends_the_session_on_the_server(app):
    client, tokens, db, _ = app
    sign_in(client, tokens["ann"])
    sid = client.cookies["rlhf_session"]
    page = client.get("/label")
    assert client.post("/logout", data={"csrf": form_token(page.text)}, follow_redirects=False).status_code == 303
    assert sql(db, "select count(*) from sessions") == [(0,)]
    # a copy of the cookie kept elsewhere (another tab, a stolen copy) is dead too
    stolen = TestClient(client.app, headers=ORIGIN, cookies={"rlhf_session": sid})
    assert stolen.get("/api/next").status_code == 401


def test_revoke_ends_token_and_sessions(app, capsys):
    client, tokens, db, _ = app
    sign_in(client, tokens["ann"])
    pair = served(client, tokens["ann"])  # ann holds a pair...
    assert client.get("/api/next").status_code == 200
    assert main(["label", "revoke", "ann", "--db", str(db)]) == 0
    assert "revoked 'ann'" in capsys.readouterr().out
    assert client.get("/api/next").status_code == 401  # the session
    assert client.get("/api/next", headers=bearer(tokens["ann"])).status_code == 401  # the token
    assert sign_in(TestClient(client.app, headers=ORIGIN), tokens["ann"]).status_code == 401
    assert client.get("/api/next", headers=bearer(tokens["ben"])).status_code == 200  # others unaffected
    # ...and its place is given back at once, not when the lease would have run out
    [(until,)] = sql(
        db,
        "select s.expires_at from assignments s join annotators a on a.id = s.annotator_id "
        "where a.name = 'ann' and s.pair_id = ?",
        pair["pair_id"],
    )
    assert dt.datetime.fromisoformat(until).replace(tzinfo=dt.timezone.utc) <= dt.datetime.now(dt.timezone.utc)
    assert main(["label", "revoke", "nobody", "--db", str(db)]) == 2
    assert "no annotator named 'nobody'" in capsys.readouterr().err


def test_secure_cookie_behind_tls_or_by_flag(tmp_path):
    db = make_project(tmp_path)
    token = store.add_annotator(store.connect(str(db)), "ann")
    plain = sign_in(TestClient(create_app(str(db)), headers=ORIGIN), token)
    assert "secure" not in plain.headers["set-cookie"].lower()  # plain http on loopback: a Secure cookie is lost
    flagged = sign_in(TestClient(create_app(str(db), Settings(secure_cookies=True)), headers=ORIGIN), token)
    assert "; secure" in flagged.headers["set-cookie"].lower()
    # https as the app sees it (uvicorn sets the scheme from a trusted proxy's X-Forwarded-Proto)
    tls = TestClient(create_app(str(db)), base_url="https://testserver", headers={"origin": "https://testserver"})
    assert "; secure" in sign_in(tls, token).headers["set-cookie"].lower()


def test_annotators_cannot_read_or_overwrite_each_others_labels(tmp_path):
    db = make_project(tmp_path, n_prompts=1, overlap=2)
    engine = store.connect(str(db))
    tokens = {n: store.add_annotator(engine, n) for n in ("ann", "ben")}
    client = TestClient(create_app(str(db)))
    pair = served(client, tokens["ann"])
    assert (
        client.post(
            "/api/labels",
            json={"pair_id": pair["pair_id"], "choice": "left", "strength": 2},
            headers=bearer(tokens["ann"]),
        ).status_code
        == 201
    )
    # ann cannot label the same pair again (no overwrite of the acknowledged label)
    again = client.post(
        "/api/labels", json={"pair_id": pair["pair_id"], "choice": "right"}, headers=bearer(tokens["ann"])
    )
    assert again.status_code == 409 and "already" in again.json()["detail"]
    # ben sees only his own labels, and his label on the same pair is his own row
    assert client.get("/api/labels", headers=bearer(tokens["ben"])).json()["labels"] == []
    assert served(client, tokens["ben"])["pair_id"] == pair["pair_id"]
    assert (
        client.post(
            "/api/labels", json={"pair_id": pair["pair_id"], "choice": "tie"}, headers=bearer(tokens["ben"])
        ).status_code
        == 201
    )
    mine = client.get("/api/labels", headers=bearer(tokens["ann"])).json()["labels"]
    assert [(row["pair_id"], row["strength"]) for row in mine] == [(pair["pair_id"], 2)]
    rows = sql(db, "select a.name, l.choice from labels l join annotators a on a.id = l.annotator_id order by a.name")
    assert [r[0] for r in rows] == ["ann", "ben"] and rows[1][1] == "tie"


def test_sides_are_decided_by_the_server(app):
    client, tokens, db, engine = app
    pair = served(client, tokens["ann"])
    raw = store.pair(engine, pair["pair_id"])
    texts = dict(sql(db, "select id, text from candidates"))
    client.post("/api/labels", json={"pair_id": pair["pair_id"], "choice": "left"}, headers=bearer(tokens["ann"]))
    [(choice, left_id)] = sql(db, "select choice, left_id from labels")
    assert texts[left_id] == pair["left"]  # what was on the left is what the label records
    assert choice == ("a" if left_id == raw["a_id"] else "b")


def test_prompts_and_responses_are_escaped(tmp_path):
    db = make_project(tmp_path, n_prompts=1, prompt_text="<script>alert('x')</script> review the pizza")
    token = store.add_annotator(store.connect(str(db)), "ann")
    page = TestClient(create_app(str(db))).get("/label", headers=bearer(token)).text
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; review the pizza" in page


# --- fair assignment ------------------------------------------------------------------------------


def test_a_label_needs_the_pair_to_have_been_served(app):
    client, tokens, db, _ = app
    mine = served(client, tokens["ann"])["pair_id"]
    other = next(i for i in range(1, 7) if i != mine)
    r = client.post("/api/labels", json={"pair_id": other, "choice": "left"}, headers=bearer(tokens["ann"]))
    assert r.status_code == 403 and "not served to you" in r.json()["detail"]
    # the form and skip are held to the same rule
    h = bearer(tokens["ann"])
    assert client.post("/label", data={"pair_id": other, "choice": "tie"}, headers=h).status_code == 403
    assert client.post("/skip", data={"pair_id": other}, headers=bearer(tokens["ann"])).status_code == 403
    assert count_labels(db) == 0 and sql(db, "select count(*) from skips") == [(0,)]
    assert (
        client.post("/api/labels", json={"pair_id": mine, "choice": "left"}, headers=bearer(tokens["ann"])).status_code
        == 201
    )


def test_next_holds_one_pair_until_labelled_and_leases_count_against_overlap(tmp_path):
    db = make_project(tmp_path, n_prompts=1, overlap=1)
    engine = store.connect(str(db))
    tokens = {n: store.add_annotator(engine, n) for n in ("ann", "ben")}
    client = TestClient(create_app(str(db)))
    first = served(client, tokens["ann"])
    assert served(client, tokens["ann"]) == first  # a reload or retry gets the same pair back
    assert served(client, tokens["ben"]) is None  # overlap 1, and ann holds its one place
    expire_leases(db)  # ann walks away; the lease runs out...
    assert served(client, tokens["ben"])["pair_id"] == first["pair_id"]  # ...and ben gets the place
    assert (
        client.post(
            "/api/labels", json={"pair_id": first["pair_id"], "choice": "left"}, headers=bearer(tokens["ben"])
        ).status_code
        == 201
    )
    late = client.post(
        "/api/labels", json={"pair_id": first["pair_id"], "choice": "right"}, headers=bearer(tokens["ann"])
    )
    assert late.status_code == 409 and "all the labels it needs" in late.json()["detail"]
    assert count_labels(db) == 1


def test_a_lapsed_lease_may_still_label_while_a_place_is_free(tmp_path):
    db = make_project(tmp_path, n_prompts=1, overlap=2)
    token = store.add_annotator(store.connect(str(db)), "ann")
    client = TestClient(create_app(str(db), Settings(lease_s=600)))
    pair = served(client, token)
    expire_leases(db)  # a long look at the pair, nobody else wanted it
    assert (
        client.post(
            "/api/labels", json={"pair_id": pair["pair_id"], "choice": "left"}, headers=bearer(token)
        ).status_code
        == 201
    )


def test_lease_length_is_the_setting(tmp_path):
    db = make_project(tmp_path, n_prompts=1)
    token = store.add_annotator(store.connect(str(db)), "ann")
    served(TestClient(create_app(str(db), Settings(lease_s=90))), token)
    [(t0, t1)] = sql(db, "select served_at, expires_at from assignments")
    held = dt.datetime.fromisoformat(t1) - dt.datetime.fromisoformat(t0)
    assert held == dt.timedelta(seconds=90)


def test_concurrent_labels_never_exceed_the_overlap(tmp_path):
    """12 annotators whose (lapsed) leases all let them label one pair of overlap 3, at once, each
    through its own engine (as separate server processes would): the count is taken inside the
    database's writer lock, so exactly 3 labels land."""
    db = make_project(tmp_path, n_prompts=1, overlap=3)
    engine = store.connect(str(db))
    ids = []
    for i in range(12):
        store.add_annotator(engine, f"a{i}")
        ids.append(sql(db, "select id from annotators where name = ?", f"a{i}")[0][0])
    outcomes = race_for_pair_one(str(db), ids)
    assert sorted(outcomes) == ["full"] * 9 + ["ok"] * 3
    assert count_labels(db) == 3


def test_skip_moves_on_and_all_done(tmp_path):
    db = make_project(tmp_path, n_prompts=2)
    token = store.add_annotator(store.connect(str(db)), "ann")
    client = TestClient(create_app(str(db)))
    h = bearer(token)
    first = served(client, token)["pair_id"]
    client.post("/skip", data={"pair_id": first}, headers=h)
    second = served(client, token)["pair_id"]
    assert second != first
    client.post("/api/labels", json={"pair_id": second, "choice": "right"}, headers=h)
    assert served(client, token) is None
    assert "All done" in client.get("/label", headers=h).text


def test_overlap_serves_each_pair_to_k_annotators_and_stats(app, capsys):
    client, tokens, db, engine = app
    for name in ("ann", "ben"):
        h = bearer(tokens[name])
        while (nxt := served(client, tokens[name])) is not None:
            choice = "left" if name == "ann" or nxt["pair_id"] % 3 else "tie"
            client.post("/api/labels", json={"pair_id": nxt["pair_id"], "choice": choice, "strength": 3}, headers=h)
    # overlap 2: both labelled all 6 pairs, and the admin has nothing left
    assert served(client, tokens["admin"]) is None
    s = project.stats(engine)
    assert s["labels"] == 12 and s["overlapping_pairs"] == 6
    assert {n: a["labels"] for n, a in s["annotators"].items()} == {"ann": 6, "ben": 6}
    assert 0.0 <= s["raw_agreement"] <= 1.0 and s["tie_rate"] == pytest.approx(2 / 12)
    assert main(["label", "stats", "--db", str(db)]) == 0
    assert "12 labels on 6 of 6 pairs" in capsys.readouterr().out


# --- CSRF, headers, exposure ----------------------------------------------------------------------

FOREIGN = [
    {"origin": "http://127.0.0.1:9999"},
    {"origin": "https://evil.example"},
    {"origin": "null"},
    {"referer": "http://evil.example/page"},
    {},
]


@pytest.mark.parametrize("headers", FOREIGN, ids=["other-port", "other-site", "null", "foreign-referer", "none"])
def test_cookie_posts_from_another_origin_are_refused(app, headers):
    client, tokens, db, _ = app
    sign_in(client, tokens["ann"])
    page = client.get("/label").text
    pair_id, csrf = re.search(r'name="pair_id" value="(\d+)"', page).group(1), form_token(page)
    foreign = TestClient(client.app, cookies=dict(client.cookies))  # the victim's cookies, the attacker's page
    form = {"pair_id": pair_id, "choice": "left", "csrf": csrf}  # even with the token, had it leaked
    for path, data in (("/label", form), ("/skip", form), ("/logout", {"csrf": csrf})):
        r = foreign.post(path, data=data, headers=headers, follow_redirects=False)
        assert r.status_code == 403 and "another site" in r.text, (path, r.status_code)
    r = foreign.post("/api/labels", json={"pair_id": int(pair_id), "choice": "left"}, headers=headers)
    assert r.status_code == 403
    assert count_labels(db) == 0 and sql(db, "select count(*) from skips") == [(0,)]
    assert client.get("/api/next").status_code == 200  # the session was not ended either
    # a login from another page does not sign a browser in as someone else (even with the form's value)
    victim = TestClient(client.app)
    value = re.search(r'name="login_csrf" value="([^"]+)"', victim.get("/").text).group(1)
    r = victim.post(
        "/login", data={"token": tokens["ben"], "login_csrf": value}, headers=headers, follow_redirects=False
    )
    assert r.status_code == 403 and "rlhf_session" not in r.headers.get("set-cookie", "")


def test_same_origin_referer_is_enough_when_origin_is_missing(app):
    client, tokens, db, _ = app
    sign_in(client, tokens["ann"])
    page = client.get("/label").text
    pair_id = re.search(r'name="pair_id" value="(\d+)"', page).group(1)
    r = client.post(
        "/label",
        data={"pair_id": pair_id, "choice": "tie", "csrf": form_token(page)},
        headers={"origin": "", "referer": "http://testserver/label"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and count_labels(db) == 1


def test_forms_need_the_sessions_csrf_token(app):
    client, tokens, db, _ = app
    sign_in(client, tokens["ann"])
    page = client.get("/label").text
    pair_id = re.search(r'name="pair_id" value="(\d+)"', page).group(1)
    for bad in ("", "&csrf=", "&csrf=" + "0" * 64, "&csrf=%ED%A0%80"):  # the last: a surrogate in UTF-8 (invalid)
        r = client.post(
            "/label", content=f"pair_id={pair_id}&choice=left{bad}".encode(), headers=FORM, follow_redirects=False
        )
        assert r.status_code == 403 and "reload the page" in r.text
    # another session's token is no good either
    other = TestClient(client.app, headers=ORIGIN)
    sign_in(other, tokens["ben"])
    r = client.post("/label", data={"pair_id": pair_id, "choice": "left", "csrf": form_token(other.get("/label").text)})
    assert r.status_code == 403 and count_labels(db) == 0
    # the login form needs its own value (from the sign-in page) too
    r = TestClient(client.app, headers=ORIGIN).post("/login", data={"token": tokens["ann"]}, follow_redirects=False)
    assert r.status_code == 403 and "rlhf_session" not in r.headers.get("set-cookie", "")


def test_security_headers_on_every_answer(app):
    client, tokens, _, _ = app
    answers = [
        client.get("/"),
        client.get("/label"),
        client.get("/label", headers=bearer(tokens["ann"])),
        client.get("/api/next", headers=bearer(tokens["ann"])),
        client.get("/api/next"),
        client.get("/static/app.css"),
        client.get("/nowhere"),
        client.post("/api/labels", json={"pair_id": "x"}, headers=bearer(tokens["ann"])),
        client.post("/label", data={"pair_id": 1}, headers={"origin": "http://elsewhere"}),
    ]
    for r in answers:
        csp = r.headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp, r.url
        assert r.headers.get("x-content-type-options") == "nosniff", r.url
        assert r.headers.get("x-frame-options") == "DENY", r.url
        assert r.headers.get("cache-control") == "no-store", r.url
    page = answers[2].text  # the label page itself has no inline script or style for the CSP to block
    assert "<script>" not in page and "<style" not in page and " style=" not in page
    assert client.get("/static/label.js").headers["content-type"].startswith("text/javascript")


def test_api_schema_and_docs_are_not_public(app):
    client, tokens, _, _ = app
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert client.get(path).status_code == 404, path
        assert client.get(path, headers=bearer(tokens["admin"])).status_code == 404, path


def test_failed_logins_are_rate_limited_per_client(tmp_path):
    db = make_project(tmp_path)
    token = store.add_annotator(store.connect(str(db)), "ann")
    app = create_app(str(db), Settings(login_failures=3, login_window_s=60))
    attacker = TestClient(app, headers=ORIGIN, client=("10.0.0.66", 5000))
    for _ in range(3):
        assert sign_in(attacker, "guess").status_code == 401
    r = sign_in(attacker, token)  # even the right token: the client is blocked for the window
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0 and "Too many" in r.text
    assert sign_in(TestClient(app, headers=ORIGIN, client=("10.0.0.7", 5000)), token).status_code == 303


def test_login_limiter_window():
    now = [1000.0]
    lim = LoginLimiter(max_failures=2, window_s=60, max_clients=3, clock=lambda: now[0])
    lim.failed("a")
    assert lim.retry_after("a") is None
    lim.failed("a")
    assert lim.retry_after("a") == 61
    now[0] += 30
    assert lim.retry_after("a") == 31 and lim.retry_after("b") is None
    now[0] += 31
    assert lim.retry_after("a") is None  # the failures left the window
    for c in "bcde":
        lim.failed(c)
    assert len(lim._failures) == 3  # bounded memory: the quietest clients are forgotten


def test_serving_beyond_loopback_warns(tmp_path, monkeypatch, capsys):
    import uvicorn

    db = make_project(tmp_path)
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    assert main(["label", "serve", "--db", str(db), "--port", "8123"]) == 0
    assert "WARNING" not in capsys.readouterr().err
    assert (
        main(["label", "serve", "--db", str(db), "--host", "0.0.0.0", "--secure-cookies", "--lease-minutes", "5"]) == 0
    )
    err = capsys.readouterr().err
    assert "WARNING: serving on 0.0.0.0" in err and "TLS" in err and "reverse proxy" in err
    assert [c["host"] for c in calls] == ["127.0.0.1", "0.0.0.0"] and calls[1]["forwarded_allow_ips"] == "127.0.0.1"
    assert main(["label", "serve", "--db", str(db), "--lease-minutes", "0"]) == 2


# --- bad input ------------------------------------------------------------------------------------

HOSTILE = {
    "NaN pair id": b'{"pair_id": NaN, "choice": "left"}',
    "1e400 pair id": b'{"pair_id": 1e400, "choice": "left"}',
    "Infinity strength": b'{"pair_id": PAIR, "choice": "left", "strength": Infinity}',
    "NaN strength": b'{"pair_id": PAIR, "choice": "left", "strength": NaN}',
    "lone surrogate comment": b'{"pair_id": PAIR, "choice": "left", "comment": "\\ud800"}',
    "NUL in comment": b'{"pair_id": PAIR, "choice": "left", "comment": "a\\u0000b"}',
    "pair id 2^63": b'{"pair_id": 9223372036854775808, "choice": "left"}',
    "pair id -2^63-1": b'{"pair_id": -9223372036854775809, "choice": "left"}',
    "true as pair id": b'{"pair_id": true, "choice": "left"}',
    "string pair id": b'{"pair_id": "PAIR", "choice": "left"}',
    "float pair id": b'{"pair_id": PAIR.0, "choice": "left"}',
    "string strength": b'{"pair_id": PAIR, "choice": "left", "strength": "2"}',
    "number as choice": b'{"pair_id": PAIR, "choice": 1}',
    "list as comment": b'{"pair_id": PAIR, "choice": "left", "comment": ["x"]}',
    "unknown field": b'{"pair_id": PAIR, "choice": "left", "admin": true}',
    "a list": b'[{"pair_id": PAIR, "choice": "left"}]',
    "null": b"null",
    "invalid utf-8": b'{"pair_id": PAIR, "choice": "left", "comment": "\xff\xfe"}',
    "deep nesting": b"[" * 20000 + b"]" * 20000,
    "not json": b"not json",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_json_is_a_4xx_and_writes_nothing(app, name):
    client, tokens, db, _ = app
    h = bearer(tokens["ann"])
    pair_id = served(client, tokens["ann"])["pair_id"]
    body = HOSTILE[name].replace(b"PAIR", str(pair_id).encode())
    r = client.post("/api/labels", content=body, headers={**h, "content-type": "application/json"})
    assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
    assert "detail" in r.json()
    assert count_labels(db) == 0
    assert served(client, tokens["ann"])["pair_id"] == pair_id  # and the app still works


def test_malformed_and_oversized_requests_write_nothing(app):
    client, tokens, db, _ = app
    h = bearer(tokens["ann"])
    pair_id = served(client, tokens["ann"])["pair_id"]
    bad = [
        ({"pair_id": pair_id, "choice": "maybe"}, 422),
        ({"pair_id": pair_id}, 422),
        ({"pair_id": pair_id, "choice": "left", "strength": 9}, 422),
        ({"pair_id": pair_id, "choice": "left", "comment": "x" * 2001}, 422),
        ({"pair_id": 10**6, "choice": "left"}, 404),
    ]
    for body, status in bad:
        r = client.post("/api/labels", json=body, headers=h)
        assert r.status_code == status, (body, r.text)
        assert "detail" in r.json()
    r = client.post(
        "/api/labels", content=b"{" + b" " * 70_000 + b"}", headers={**h, "content-type": "application/json"}
    )
    assert r.status_code == 413 and "over" in r.json()["detail"]
    for form in (
        {"pair_id": pair_id, "choice": "sideways"},
        {"pair_id": str(2**63), "choice": "left"},
        {"pair_id": "1e400", "choice": "left"},
        {"pair_id": "true", "choice": "left"},
        {"pair_id": pair_id, "choice": "left", "strength": "NaN"},
        {"pair_id": pair_id, "choice": "left", "comment": "a\x00b"},
    ):
        r = client.post("/label", data=form, headers=h)
        assert r.status_code == 422 and "invalid" in r.text and "<html" in r.text, (form, r.text[:300])
    assert client.post("/skip", data={"pair_id": str(2**64)}, headers=h).status_code == 422
    assert count_labels(db) == 0 and sql(db, "select count(*) from skips") == [(0,)]


def test_hostile_sign_in_input_is_refused_cleanly(app):
    client, _, _, _ = app
    value = re.search(r'name="login_csrf" value="([^"]+)"', client.get("/").text).group(1)
    for token in ("%ED%A0%80", "%FF%FE", "x" * 201, "%00", "%F0%9F%92%A9"):  # surrogate, bad UTF-8, long, NUL, emoji
        r = client.post("/login", content=f"token={token}&login_csrf={value}".encode(), headers=FORM)
        assert r.status_code in (401, 422) and "Sign in" in r.text, token
    assert client.get("/api/next", headers={"authorization": b"Bearer \xff\xfe\x80"}).status_code == 401


# --- the page -------------------------------------------------------------------------------------


def test_a_repeated_form_post_goes_on_to_the_next_pair(app):
    """A double key press posts the same pair twice: the first label stands and the second post
    lands on the next pair, not on a raw JSON 409."""
    client, tokens, db, _ = app
    sign_in(client, tokens["ann"])
    page = client.get("/label").text
    form = {
        "pair_id": re.search(r'name="pair_id" value="(\d+)"', page).group(1),
        "choice": "left",
        "csrf": form_token(page),
    }
    assert client.post("/label", data=form, follow_redirects=False).status_code == 303
    again = client.post("/label", data={**form, "choice": "right"})
    assert again.status_code == 200 and "you labelled <strong>1</strong>" in again.text
    assert "detail" not in again.text and sql(db, "select choice from labels") in ([("a",)], [("b",)])


def test_form_errors_are_pages_with_a_way_back(app):
    client, tokens, _, _ = app
    sign_in(client, tokens["ann"])
    page = client.get("/label").text
    r = client.post("/label", data={"pair_id": 10**6, "choice": "left", "csrf": form_token(page)})
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
    assert 'href="/label"' in r.text and "no pair 1000000" in r.text


def test_texts_are_bidi_isolated_and_wrap(tmp_path):
    db = make_project(tmp_path, n_prompts=1, answers=("abc\u202edef", "x" * 5000))
    token = store.add_annotator(store.connect(str(db)), "ev\u202eil")
    page = TestClient(create_app(str(db))).get("/label", headers=bearer(token)).text
    assert '<bdi id="name">ev\u202eil</bdi>' in page
    assert page.count('class="text" dir="auto"') == 3  # the prompt and both answers
    css = TestClient(create_app(str(db))).get("/static/app.css").text
    assert "overflow-wrap:anywhere" in css and "unicode-bidi:isolate" in css and "minmax(0,1fr)" in css


# --- export ---------------------------------------------------------------------------------------


def test_export_majority_vote_in_the_reward_format(app, tmp_path, capsys):
    from rlhf.config import DataConfig, DataSource
    from rlhf.data.formats import normalize_preference
    from rlhf.data.prepare import prepare_splits

    client, tokens, db, engine = app
    out = tmp_path / "prefs.jsonl"
    assert main(["label", "export", "--db", str(db), "--out", str(out)]) == 0  # empty project
    assert "wrote 0 preference pairs" in capsys.readouterr().out and out.read_text() == ""
    pairs = []
    h = bearer(tokens["ann"])
    while (nxt := served(client, tokens["ann"])) is not None:
        pairs.append(nxt)
        client.post("/api/labels", json={"pair_id": nxt["pair_id"], "choice": "left", "strength": 3}, headers=h)
        if len(pairs) == 4:
            break  # partly labelled
    texts = dict(sql(db, "select id, text from candidates"))
    side = {p["pair_id"]: "a" if texts[store.pair(engine, p["pair_id"])["a_id"]] == p["left"] else "b" for p in pairs}
    other = {"a": "b", "b": "a"}
    put_label(engine, pairs[0]["pair_id"], "ben", other[side[pairs[0]["pair_id"]]], 1)  # 1 vs 1: a tie
    put_label(engine, pairs[1]["pair_id"], "ben", "both_bad")  # left + both bad: left wins (was a tie)
    assert main(["label", "export", "--db", str(db), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert "wrote 4 preference pairs" in said and "(3 with a clear preference, 1 ties)" in said
    assert "left out: 2 unlabelled" in said
    by_pair = {r["provenance"]["pair_id"]: r for r in rows}
    assert by_pair[pairs[0]["pair_id"]]["tie"] is True
    for p in pairs[1:3]:
        clear = by_pair[p["pair_id"]]
        assert clear["tie"] is False and clear["chosen"] == p["left"] and clear["rejected"] == p["right"]
        assert clear["margin"] == pytest.approx(1.0)  # strength 3 -> 0.5 x (3 - 1)
    assert by_pair[pairs[1]["pair_id"]]["provenance"]["votes"] == {side[pairs[1]["pair_id"]]: 1, "both_bad": 1}
    clear = by_pair[pairs[2]["pair_id"]]
    assert clear["provenance"]["annotators"] == ["ann"] and clear["provenance"]["chosen_source"] in ("m1", "m2")
    # the reward stage reads the export as it is: 3 clear pairs and 1 tie
    cfg = DataConfig(sources=[DataSource(path=str(out))], validation_fraction=0.0, bad_rows="error")
    got = prepare_splits(cfg, normalize_preference).train
    assert len(got) == 4 and sum(p["tie"] for p in got) == 1
    assert main(["label", "export", "--db", str(db), "--out", str(out), "--ties", "drop"]) == 0
    assert len(out.read_text().splitlines()) == 3
    assert "left out: 2 unlabelled, 1 ties dropped" in capsys.readouterr().out


def test_export_leaves_out_mostly_both_bad_and_too_few_labels(tmp_path, capsys):
    db = make_project(tmp_path, n_prompts=4, overlap=3)
    engine = store.connect(str(db))
    for name, choice in (("ann", "both_bad"), ("ben", "both_bad"), ("cat", "a")):
        put_label(engine, 1, name, choice)
    put_label(engine, 2, "ann", "b", 2)
    put_label(engine, 2, "ben", "b", 2)
    put_label(engine, 3, "ann", "a", 2)  # one label: too few for --min-labels 2
    out = tmp_path / "prefs.jsonl"
    assert main(["label", "export", "--db", str(db), "--out", str(out), "--min-labels", "2"]) == 0
    said = capsys.readouterr().out
    assert [json.loads(line)["provenance"]["pair_id"] for line in out.read_text().splitlines()] == [2]
    assert "wrote 1 preference pairs" in said and "(1 with a clear preference, 0 ties)" in said
    assert "left out: 1 unlabelled, 1 too few labels, 1 both bad" in said


def test_export_to_a_directory_is_a_clear_error(app, tmp_path, capsys):
    _, _, db, engine = app
    put_label(engine, 1, "ann", "a", 2)
    target = tmp_path / "exports"
    target.mkdir()
    assert main(["label", "export", "--db", str(db), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"--out {target} is a directory" in err and "Traceback" not in err
    blocked = tmp_path / "afile"
    blocked.write_text("x")
    assert main(["label", "export", "--db", str(db), "--out", str(blocked / "prefs.jsonl")]) == 2
    assert f"cannot write the export to {blocked / 'prefs.jsonl'}" in capsys.readouterr().err
    assert [p.name for p in (*tmp_path.rglob("*.tmp"), *tmp_path.rglob("*.partial"))] == [] and list(
        target.iterdir()
    ) == []


def test_cli_errors_are_clear(tmp_path, capsys):
    db = make_project(tmp_path)
    assert main(["label", "add-annotator", "ann", "--db", str(db)]) == 0
    assert main(["label", "add-annotator", "ann", "--db", str(db)]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["label", "stats", "--db", str(tmp_path / "none.sqlite")]) == 2
    assert "no labelling database" in capsys.readouterr().err
    assert main(["label", "init", "--db", str(db), "--candidates", str(tmp_path / "candidates.jsonl")]) == 2
    assert "exists" in capsys.readouterr().err


def test_a_project_made_before_sessions_and_leases_gets_their_tables(tmp_path):
    db = make_project(tmp_path, n_prompts=1)
    sql(db, "drop table sessions")
    sql(db, "drop table assignments")
    token = store.add_annotator(store.connect(str(db)), "ann")
    client = TestClient(create_app(str(db)), headers=ORIGIN)
    assert sign_in(client, token).status_code == 303 and served(client, token) is not None


def test_init_from_two_policies_with_active_sampling(sft_dir, reward_dir, demo_assets, tmp_path, capsys):
    db = tmp_path / "labels.sqlite"
    assert (
        main(
            [
                "label",
                "init",
                "--db",
                str(db),
                "--prompts",
                str(demo_assets / "data/heldout_prompts.jsonl"),
                "--policy",
                str(sft_dir),
                "--policy-b",
                str(demo_assets / "base"),
                "--samples",
                "2",
                "--reward-model",
                str(reward_dir),
                "--max-new-tokens",
                "16",
            ]
        )
        == 0
    )
    assert "24 prompts" in capsys.readouterr().out
    with sqlite3.connect(db) as c:
        sources = {r[0] for r in c.execute("select distinct source from candidates")}
        prios = [r[0] for r in c.execute("select priority from pairs order by priority")]
        settings = json.loads(c.execute("select settings from candidates limit 1").fetchone()[0])
    assert sources == {str(sft_dir), str(demo_assets / "base")}
    assert len(prios) >= 20 and all(0 <= p <= 0.5 for p in prios)  # |P(a > b) - 1/2|
    assert settings["max_new_tokens"] == 16
    token = store.add_annotator(store.connect(str(db)), "ann")
    first = TestClient(create_app(str(db))).get("/api/next", headers=bearer(token)).json()["pair"]["pair_id"]
    with sqlite3.connect(db) as c:
        least_certain = c.execute("select id from pairs order by priority, id limit 1").fetchone()[0]
    assert first == least_certain


@pytest.mark.slow
def test_reward_stage_trains_on_the_export(demo_assets, sft_dir, tmp_path):
    """Candidates from the demo's preference pairs, labelled through the API as the annotator
    stand-in judged them, exported, and trained on by the reward stage with no conversion."""
    from rlhf.config import GenerationSettings, RewardRecipe
    from rlhf.stages.reward import run_reward

    prefs = [json.loads(line) for line in (demo_assets / "data/preferences.jsonl").read_text().splitlines()[:160]]
    cands = tmp_path / "cands.jsonl"
    cands.write_text(
        "".join(
            json.dumps({"prompt": p["prompt"], "response": r, "model": m}) + "\n"
            for i, p in enumerate(prefs)
            for r, m in ((p["chosen"], f"c{i}"), (p["rejected"], f"r{i}"))
        )
    )
    db = tmp_path / "labels.sqlite"
    # one pair per distinct prompt in the file: candidates are grouped by prompt, paired two by two
    project.init_project(
        str(db),
        prompts_path=None,
        policy=None,
        policy_b=None,
        samples=2,
        candidates_path=str(cands),
        overlap=1,
        reward_model=None,
        gen=GenerationSettings(),
    )
    engine = store.connect(str(db))
    token = store.add_annotator(engine, "ann")
    client = TestClient(create_app(str(db)))
    h = bearer(token)
    chosen_texts = {p["chosen"] for p in prefs}
    n = 0
    while (nxt := client.get("/api/next", headers=h).json()["pair"]) is not None:
        choice = "left" if nxt["left"] in chosen_texts else "right"
        assert (
            client.post(
                "/api/labels", json={"pair_id": nxt["pair_id"], "choice": choice, "strength": 2}, headers=h
            ).status_code
            == 201
        )
        n += 1
    out = tmp_path / "prefs.jsonl"
    assert project.export(engine, out)["written"] == n and n >= 60
    recipe = load_recipe(
        RewardRecipe,
        REPO / "recipes/demo/reward.yaml",
        [
            f"model.name_or_path={sft_dir}",
            f"data.sources.0.path={out}",
            "data.bad_rows=error",
            "demo_assets=null",
            f"output_dir={tmp_path / 'run'}",
            "tracking.wandb=false",
            "train.num_epochs=1",
            "train.micro_batch_size=8",
            "train.eval_steps=4",
            "train.save_steps=4",
        ],
    )
    done = run_reward(recipe)
    m = json.loads((done / "rlhf_manifest.json").read_text())
    assert m["stage"] == "reward" and m["metrics"]["validation"]["pairs"] >= 5


def test_items_to_label_pair_samples_and_drop_identical_answers():
    # One policy: samples two by two; an odd last sample has no partner.
    assert project.items_to_label(["a", "b", "c", "d", "e"], two_policies=False) == ([(0, 1), (2, 3)], 0)
    # Two policies (A's samples, then B's): A's i-th against B's i-th; identical answers are dropped.
    assert project.items_to_label(["a", "b", "a", "c"], two_policies=True) == ([(1, 3)], 1)
    assert project.items_to_label(["x", "x"], two_policies=False) == ([], 1)
    assert project.items_to_label(["x"], two_policies=False) == ([], 0)
