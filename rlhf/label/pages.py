"""Server-rendered HTML for the labelling app: Jinja2 with autoescaping, one stylesheet and one
small script (keyboard shortcuts), no build step. Every model text and prompt goes through
autoescaping, so a `<script>` in a prompt is shown as text. The stylesheet and script are served as
files (/static/...), never inline, so the Content-Security-Policy can forbid inline code.

Hostile or just awkward text is contained: long unbroken text wraps anywhere and sits in scroll
boxes (the layout never grows past the window), and every text from the database is
bidi-isolated (dir="auto", <bdi>), so a right-to-left override cannot reorder the page around it.
Every form carries the session's CSRF token."""

from __future__ import annotations

from jinja2 import Environment

env = Environment(autoescape=True)

CSS = """body{font:17px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2430}
header{background:#1d2430;color:#fff;padding:.7rem 1.5rem;display:flex;justify-content:space-between;align-items:center}
header form{margin:0} main{max-width:1200px;margin:1.5rem auto;padding:0 1.5rem}
.prompt{background:#fff;border-left:5px solid #4a6cf7;padding:1rem 1.25rem;border-radius:6px;margin-bottom:1.2rem;
 max-height:40vh;overflow:auto}
.turn{margin:.2rem 0}.role{font-size:.8rem;text-transform:uppercase;color:#6b7280;letter-spacing:.05em}
.pair{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:1.2rem}
.resp{background:#fff;border-radius:6px;padding:1rem 1.25rem;min-height:8rem;max-height:65vh;overflow:auto;min-width:0;
 box-shadow:0 1px 3px #0002}
.resp h3{margin:0 0 .5rem;font-size:1rem;color:#4a6cf7}
.text{white-space:pre-wrap;overflow-wrap:anywhere;word-break:break-word;unicode-bidi:isolate}
bdi{unicode-bidi:isolate;overflow-wrap:anywhere}
.controls{margin-top:1.2rem;background:#fff;border-radius:6px;padding:1rem 1.25rem;box-shadow:0 1px 3px #0002}
.choices{display:flex;gap:.6rem;flex-wrap:wrap;margin:.6rem 0} .strength{margin-left:.8rem}
button{font:inherit;padding:.6rem 1.1rem;border-radius:6px;border:1px solid #c5cad3;background:#fff;cursor:pointer}
button.primary{background:#4a6cf7;color:#fff;border-color:#4a6cf7} button:hover{filter:brightness(.95)}
body.sending button{opacity:.6;cursor:progress}
kbd{font:.8rem monospace;background:#eef0f4;border:1px solid #c5cad3;border-radius:3px;padding:0 .3rem;margin-left:.3rem}
button.primary kbd{background:#ffffff26;color:#fff;border-color:#ffffffaa}
textarea{width:100%;font:inherit;border:1px solid #c5cad3;border-radius:6px;padding:.4rem;box-sizing:border-box}
input.token{font:inherit;padding:.5rem;max-width:100%}
.muted{color:#6b7280}.error{color:#b91c1c} table{border-collapse:collapse;background:#fff}
td,th{padding:.4rem .8rem;border-bottom:1px solid #e5e7eb;text-align:left}
@media (max-width:800px){.pair{grid-template-columns:minmax(0,1fr)}}
"""

# Shortcuts never fire with Ctrl/Cmd/Alt held (Ctrl+A selects text, Ctrl+T opens a tab) nor on key
# repeat, and a page posts at most once: a second key press before the next page arrives is ignored
# instead of posting the same pair again.
JS = """(() => {
  const form = document.getElementById("label-form");
  if (!form) return;
  const skipForm = document.getElementById("skip-form");
  let sent = false;
  function send(f) { if (sent) return; sent = true; document.body.classList.add("sending"); f.submit(); }
  function choose(c) { document.getElementById("choice").value = c; send(form); }
  document.querySelectorAll("[data-choice]").forEach(b => b.addEventListener("click", () => choose(b.dataset.choice)));
  document.getElementById("skip").addEventListener("click", () => send(skipForm));
  window.addEventListener("pageshow", e => { if (e.persisted) { sent = false; document.body.classList.remove("sending"); } });
  document.addEventListener("keydown", e => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat || e.isComposing) return;
    if (e.target.tagName === "TEXTAREA") return;
    const k = e.key.toLowerCase();
    const keys = form.dataset.mode === "single" ? {g: "good", b: "bad"} : {a: "left", b: "right", t: "tie", x: "both_bad"};
    const strength = document.querySelector(`input[name=strength][value="${k}"]`);
    if (k in keys) choose(keys[k]);
    else if (k === "s") send(skipForm);
    else if (strength) strength.checked = true;
  });
})();
"""

BASE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{{ title }}</title>
<link rel="stylesheet" href="/static/app.css"></head>
<body><header><strong>rlhf · preference labelling</strong>{{ header|safe }}</header>
<main>{{ body|safe }}</main></body></html>"""

LOGIN = """<h2>Sign in</h2><p class="muted">Paste the access token you were given.</p>
{% if error %}<p class="error">{{ error }}</p>{% endif %}
<form method="post" action="/login"><input type="hidden" name="login_csrf" value="{{ login_csrf }}">
<input name="token" type="password" size="50" autofocus class="token" aria-label="access token" autocomplete="off">
<button class="primary">Sign in</button></form>"""

LABEL = """<p class="muted" id="progress"><bdi id="name">{{ name }}</bdi> · you labelled <strong>{{ done }}</strong> · {{ open }} pairs open</p>
<div class="prompt">{% for turn in prompt %}<div class="turn"><div class="role"><bdi>{{ turn.role }}</bdi></div><div class="text" dir="auto">{{ turn.content }}</div></div>{% endfor %}</div>
<div class="pair"><div class="resp" id="left"><h3>Response A</h3><div class="text" dir="auto">{{ left }}</div></div>
<div class="resp" id="right"><h3>Response B</h3><div class="text" dir="auto">{{ right }}</div></div></div>
<form method="post" action="/label" id="label-form" class="controls">
<input type="hidden" name="csrf" value="{{ csrf or '' }}">
<input type="hidden" name="pair_id" value="{{ pair_id }}"><input type="hidden" name="choice" id="choice">
<div><span class="muted">How much better?</span>
{% for v, t in [(1, "slightly"), (2, "clearly"), (3, "much")] %}<label class="strength"><input type="radio" name="strength"
 value="{{ v }}" {% if v == 2 %}checked{% endif %}> {{ t }}<kbd>{{ v }}</kbd></label>{% endfor %}</div>
<div class="choices"><button type="button" class="primary" data-choice="left">A is better<kbd>A</kbd></button>
<button type="button" class="primary" data-choice="right">B is better<kbd>B</kbd></button>
<button type="button" data-choice="tie">Tie<kbd>T</kbd></button>
<button type="button" data-choice="both_bad">Both bad<kbd>X</kbd></button>
<button type="button" id="skip">Skip<kbd>S</kbd></button></div>
<textarea name="comment" rows="2" maxlength="2000" placeholder="Comment (optional)"></textarea></form>
<form method="post" action="/skip" id="skip-form"><input type="hidden" name="csrf" value="{{ csrf or '' }}">
<input type="hidden" name="pair_id" value="{{ pair_id }}"></form>
<script src="/static/label.js"></script>"""

# One response judged on its own (KTO data): good or bad, no strength.
LABEL_SINGLE = """<p class="muted" id="progress"><bdi id="name">{{ name }}</bdi> · you judged <strong>{{ done }}</strong> · {{ open }} responses open</p>
<div class="prompt">{% for turn in prompt %}<div class="turn"><div class="role"><bdi>{{ turn.role }}</bdi></div><div class="text" dir="auto">{{ turn.content }}</div></div>{% endfor %}</div>
<div class="resp" id="response"><h3>Response</h3><div class="text" dir="auto">{{ response }}</div></div>
<form method="post" action="/label" id="label-form" class="controls" data-mode="single">
<input type="hidden" name="csrf" value="{{ csrf or '' }}">
<input type="hidden" name="pair_id" value="{{ pair_id }}"><input type="hidden" name="choice" id="choice">
<div class="muted">Is this a good answer to the prompt?</div>
<div class="choices"><button type="button" class="primary" data-choice="good">Good<kbd>G</kbd></button>
<button type="button" class="primary" data-choice="bad">Bad<kbd>B</kbd></button>
<button type="button" id="skip">Skip<kbd>S</kbd></button></div>
<textarea name="comment" rows="2" maxlength="2000" placeholder="Comment (optional)"></textarea></form>
<form method="post" action="/skip" id="skip-form"><input type="hidden" name="csrf" value="{{ csrf or '' }}">
<input type="hidden" name="pair_id" value="{{ pair_id }}"></form>
<script src="/static/label.js"></script>"""

DONE = """<h2>All done</h2><p>You labelled <strong id="done">{{ done }}</strong> pairs. Nothing is waiting for you now;
come back later or ask for more.</p>"""

MESSAGE = """<p class="error" id="message">{{ message }}</p><p><a href="/label">Back to labelling</a></p>"""

ADMIN = """<h2>Project statistics</h2><p>{{ s.labels }} labels on {{ s.labelled_pairs }} of {{ s.pairs }} pairs ·
tie rate {{ "%.2f"|format(s.tie_rate) }} · both-bad rate {{ "%.2f"|format(s.both_bad_rate) }}</p>
<p>Agreement on {{ s.overlapping_pairs }} pairs labelled more than once: raw {{ "%.2f"|format(s.raw_agreement) }},
Fleiss' kappa {{ "%.2f"|format(s.fleiss_kappa) }}, mean Cohen's kappa {{ "%.2f"|format(s.cohen_kappa_mean) }}</p>
<table><tr><th>annotator</th><th>labels</th><th>per hour</th></tr>
{% for name, a in s.annotators.items() %}<tr><td><bdi>{{ name }}</bdi></td><td>{{ a.labels }}</td>
<td>{{ "%.0f"|format(a.per_hour) if a.per_hour else "-" }}</td></tr>{% endfor %}</table>"""

LOGOUT = """<form method="post" action="/logout"><input type="hidden" name="csrf" value="{{ csrf or '' }}">
<button>Sign out</button></form>"""


def render(body: str, title: str, csrf: str | None = None, **values) -> str:
    """A page; with `csrf` (a signed-in browser session) the header has the sign-out form."""
    inner = env.from_string(body).render(csrf=csrf, **values)
    header = env.from_string(LOGOUT).render(csrf=csrf) if csrf else ""
    return env.from_string(BASE).render(title=title, body=inner, header=header)
