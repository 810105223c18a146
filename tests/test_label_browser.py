"""The labelling app in a real browser: headless Chromium (Debian's package) driven by Playwright.
Sign in, label with the mouse and with the keyboard, skip, watch the progress change, check the
database, and keep a screenshot of the page for a person to look at (tests/artifacts/). Then the
attacks and accidents a browser brings: forged posts and a forged sign-in from pages on another
port and another site, shortcuts with Ctrl/Cmd/Alt held, a double key press, a 200 KB unbroken
answer, and right-to-left override text."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import REPO, free_port
from label_helpers import make_project
from rlhf.label import store
from test_label_load import start_server, stop

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (scripts/test.sh installs it as root)"),
]
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def labels_of(db, name: str) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute(
            "select l.choice, l.strength, l.comment, l.left_id from labels l join annotators a "
            "on a.id = l.annotator_id where a.name = ? order by l.id",
            (name,),
        ).fetchall()


def test_sign_in_label_with_mouse_and_keyboard(tmp_path):
    from playwright.sync_api import sync_playwright

    db = make_project(tmp_path, n_prompts=5)
    token = store.add_annotator(store.connect(str(db)), "dana")
    port = free_port()
    server = start_server(db, port)
    shots = REPO / "tests" / "artifacts"
    shots.mkdir(exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"http://127.0.0.1:{port}/label")
            assert page.locator("input[name=token]").is_visible()  # 401 shows the sign-in form
            page.fill("input[name=token]", "wrong token")
            page.click("button.primary")
            assert "not valid" in page.content()
            page.fill("input[name=token]", token)
            page.click("button.primary")
            page.wait_for_selector("#left")
            assert "you labelled <strong>0</strong>" in page.inner_html("#progress")
            page.screenshot(path=str(shots / "label_page.png"), full_page=True)
            left_text = page.inner_text("#left").replace("Response A", "").strip()

            # 1. mouse: strength "much", a comment, then "A is better"
            page.check("input[name=strength][value='3']")
            page.fill("textarea[name=comment]", "A stays on topic")
            page.click("button[data-choice=left]")
            page.wait_for_selector("#progress strong:text('1')")
            # 2. keyboard: strength 1 then B
            page.keyboard.press("1")
            page.keyboard.press("b")
            page.wait_for_selector("#progress strong:text('2')")
            # 3. keyboard: tie, then skip one, then both bad
            page.keyboard.press("t")
            page.wait_for_selector("#progress strong:text('3')")
            page.keyboard.press("s")
            page.wait_for_selector("#left")
            page.keyboard.press("x")
            page.wait_for_selector("#done")  # 5 pairs: 4 labelled, 1 skipped -> all done
            assert page.inner_text("#done") == "4"
            page.screenshot(path=str(shots / "label_done.png"))
            browser.close()
    finally:
        stop(server)
    got = labels_of(db, "dana")
    assert [(c in ("a", "b"), s, m) for c, s, m, _ in got[:1]] == [(True, 3, "A stays on topic")]
    assert got[1][1] == 1 and got[1][0] in ("a", "b") and got[2][0] == "tie" and got[3][0] == "both_bad"
    with sqlite3.connect(db) as c:
        texts = dict(c.execute("select id, text from candidates").fetchall())
    assert texts[got[0][3]] == left_text  # the label records what was on the left
    assert (shots / "label_page.png").stat().st_size > 10_000


@contextmanager
def app_and_browser(db):
    """The app on a free port and a headless Chromium; yields (base url, browser)."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    server = start_server(db, port)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            try:
                yield f"http://127.0.0.1:{port}", browser
            finally:
                browser.close()
    finally:
        stop(server)


def signed_in_page(browser, url: str, token: str, **kw):
    page = browser.new_page(viewport={"width": 1280, "height": 800}, **kw)
    page.goto(f"{url}/")
    page.fill("input[name=token]", token)
    page.click("button.primary")
    page.wait_for_selector("#progress")
    return page


@contextmanager
def attacker_site(html: str, set_cookie: str | None = None):
    """Another web server on this machine (another port): serves one page, the attack."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            if set_cookie:
                self.send_header("Set-Cookie", set_cookie)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def auto_post(action: str, fields: dict[str, str]) -> str:
    inputs = "".join(f'<input type="hidden" name="{k}" value="{v}">' for k, v in fields.items())
    return (
        f'<html><body><form id="f" method="post" action="{action}">{inputs}</form>'
        '<script>document.getElementById("f").submit()</script></body></html>'
    )


def count(db, table: str) -> int:
    with sqlite3.connect(db) as c:
        return c.execute(f"select count(*) from {table}").fetchone()[0]  # noqa: S608 (fixed names)


def held_pair(db, name: str) -> int:
    with sqlite3.connect(db) as c:
        return c.execute(
            "select s.pair_id from assignments s join annotators a on a.id = s.annotator_id where a.name = ?", (name,)
        ).fetchone()[0]


def test_forged_posts_from_another_port_change_nothing(tmp_path):
    """The victim is signed in; a page on the same host at another port (same site, so even
    SameSite=Strict cookies go along) auto-submits the app's forms. Nothing may be written."""
    db = make_project(tmp_path, n_prompts=3)
    token = store.add_annotator(store.connect(str(db)), "dana")
    with app_and_browser(db) as (url, browser):
        victim = signed_in_page(browser, url, token)
        pair_id = held_pair(db, "dana")  # the attacker even knows which pair she holds
        for action, fields in (
            ("/label", {"pair_id": pair_id, "choice": "left", "strength": "3"}),
            ("/skip", {"pair_id": pair_id}),
            ("/logout", {}),
        ):
            with attacker_site(auto_post(f"{url}{action}", fields)) as port:
                victim.goto(f"http://127.0.0.1:{port}/")
                victim.wait_for_url(f"{url}{action}")
                victim.wait_for_load_state()
                assert "another site" in victim.content(), action
        assert count(db, "labels") == 0 and count(db, "skips") == 0
        victim.goto(f"{url}/label")  # and she is still signed in (the forged sign-out did nothing)
        assert victim.inner_text("#name") == "dana"


def test_a_forged_sign_in_does_not_switch_the_victims_account(tmp_path):
    """Login CSRF: a page signs the victim's browser in as the attacker, whose labels the victim
    would then make. From another site, and from another port on the same host, where the attacker
    can even plant the sign-in form's cookie (cookies are not separated by port)."""
    db = make_project(tmp_path, n_prompts=3)
    engine = store.connect(str(db))
    dana, mallory = store.add_annotator(engine, "dana"), store.add_annotator(engine, "mallory")
    planted = "A" * 32
    with app_and_browser(db) as (url, browser):
        for host, cookie in (("localhost", None), ("127.0.0.1", f"rlhf_login={planted}; Path=/")):
            for signed_in in (False, True):
                ctx = browser.new_context()
                victim = ctx.new_page()
                if signed_in:
                    victim.goto(f"{url}/")
                    victim.fill("input[name=token]", dana)
                    victim.click("button.primary")
                    victim.wait_for_selector("#progress")
                attack = auto_post(f"{url}/login", {"token": mallory, "login_csrf": planted})
                with attacker_site(attack, set_cookie=cookie) as port:
                    victim.goto(f"http://{host}:{port}/")
                    victim.wait_for_url(f"{url}/**")  # the forged post went out (and whatever answer came back)
                    victim.wait_for_load_state()
                victim.goto(f"{url}/label")
                who = victim.inner_text("#progress").split(" · ")[0] if victim.locator("#progress").count() else None
                assert who == ("dana" if signed_in else None), (host, signed_in, who)
                ctx.close()


def test_shortcuts_ignore_modifiers_and_a_double_press_posts_once(tmp_path):
    db = make_project(tmp_path, n_prompts=4)
    token = store.add_annotator(store.connect(str(db)), "dana")
    with app_and_browser(db) as (url, browser):
        page = signed_in_page(browser, url, token)
        first = held_pair(db, "dana")
        for combo in ("Control+a", "Control+b", "Alt+t", "Meta+x", "Control+s", "Shift+Control+A"):
            page.keyboard.press(combo)
        page.wait_for_timeout(700)  # time enough for a post to have gone out
        assert count(db, "labels") == 0 and count(db, "skips") == 0
        assert page.url == f"{url}/label" and held_pair(db, "dana") == first
        # a double key press: one label, and the next pair, not a JSON error
        page.keyboard.press("b")
        page.keyboard.press("b")
        page.wait_for_selector("#progress strong:text('1')")
        page.wait_for_timeout(300)
        assert count(db, "labels") == 1 and '"detail"' not in page.content()
        # the buttons, clicked twice in a row, too
        page.evaluate("() => { const b = document.querySelector('button[data-choice=tie]'); b.click(); b.click(); }")
        page.wait_for_selector("#progress strong:text('2')")
        page.wait_for_timeout(300)
        assert count(db, "labels") == 2 and '"detail"' not in page.content()


def test_a_200kb_answer_and_rtl_override_keep_the_layout(tmp_path):
    long = "y" * 200_000  # no space to break at
    db = make_project(tmp_path, n_prompts=1, answers=(long, "abc \u202edetrever si txet siht fed"))
    token = store.add_annotator(store.connect(str(db)), "eve\u202elive")
    with app_and_browser(db) as (url, browser):
        page = signed_in_page(browser, url, token)
        page.screenshot(path="/tmp/label_200kb_rtl.png")
        shots = REPO / "tests" / "artifacts"
        shots.mkdir(exist_ok=True)
        page.screenshot(path=str(shots / "label_200kb_rtl.png"))
        facts = page.evaluate("""() => {
          const box = s => document.querySelector(s).getBoundingClientRect();
          const textAfter = (el, needle) => {
            const walk = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
            for (let n; (n = walk.nextNode()); ) {
              const i = n.data.indexOf(needle);
              if (i >= 0) { const r = document.createRange(); r.setStart(n, i); r.setEnd(n, i + needle.length);
                            return r.getBoundingClientRect(); }
            }
          };
          const prog = document.querySelector('#progress');
          return {page: document.documentElement.scrollWidth, view: window.innerWidth,
                  left: box('#left'), right: box('#right'), form: box('#label-form'),
                  strong: box('#progress strong'), open: textAfter(prog, 'pairs open'),
                  labelled: textAfter(prog, 'you labelled'), name: box('#name'),
                  bidi: [...document.querySelectorAll('.text, bdi')].map(e => getComputedStyle(e).unicodeBidi)};
        }""")
    assert facts["page"] <= facts["view"], facts  # no sideways scrolling of the page
    assert facts["left"]["right"] <= facts["right"]["left"] <= facts["view"] / 2 + 50  # two columns, side by side
    assert facts["right"]["right"] <= facts["view"]
    assert facts["form"]["top"] < 1.5 * 800  # the answers scroll in their boxes; the buttons stay near
    # the override in the name does not reorder the rest of the line: it reads left to right
    assert facts["name"]["right"] <= facts["labelled"]["left"] < facts["strong"]["left"] < facts["open"]["left"]
    assert set(facts["bidi"]) == {"isolate"} and len(facts["bidi"]) >= 4
