"""The labelling app in a real browser: headless Chromium (Debian's package) driven by Playwright.
Sign in, label with the mouse and with the keyboard, skip, watch the progress change, check the
database, and keep a screenshot of the page for a person to look at (tests/artifacts/)."""

from __future__ import annotations

import shutil
import sqlite3

import pytest

from conftest import REPO, free_port
from label_helpers import make_project
from rlhf.label import store
from test_label_load import start_server, stop

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (scripts/test.sh installs it as root)")]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def labels_of(db, name: str) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute("select l.choice, l.strength, l.comment, l.left_id from labels l join annotators a "
                         "on a.id = l.annotator_id where a.name = ? order by l.id", (name,)).fetchall()


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
