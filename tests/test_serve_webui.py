"""The chat page of `glm4 serve` (GET /, glm4/serve/web/) in a real headless Chromium, Debian's `chromium` driven by
Playwright (`executable_path`, never Playwright's own browser download), against real servers on 127.0.0.1.

Every page runs with all requests routed through a check: anything not for 127.0.0.1 is blocked and recorded, and
each test asserts none was attempted (the page works offline). The OpenAI route of the same server is the oracle
for what the page shows: at temperature 0 the same conversation gives the same reply.

Set GLM4_WEBUI_SCREENSHOTS=docs/screenshots to refresh the README's screenshots (else they go to a temp folder).
The browser tests skip, saying why, without chromium (`apt-get install chromium`) or playwright (the dev extra).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import jsonschema
import openai
import pytest
import torch
from test_serve_util import ServerThread, engine_idle, make_checkpoint

torch.set_num_threads(1)

KEY = "sk-webui-test"
MODEL = "tiny-glm4"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# as the machine's probe ran it: no background networking, so Chromium itself calls nowhere
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
QUESTION = "What's the weather in Paris?"


def _serve(folder: Path, name: str, **kw) -> ServerThread:
    from glm4.serve.app import build_state, create_app

    st = build_state(str(folder), model_name=name, kv_cache_tokens=8192, **kw)
    srv = ServerThread(create_app(st)).start()
    srv.state = st
    return srv


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("webui") / "tiny")


@pytest.fixture(scope="module")
def server(ckpt):
    srv = _serve(ckpt, MODEL)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def key_server(ckpt):
    srv = _serve(ckpt, MODEL, api_key=KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory):
    """glm4_moe with GLM-4.7's own template: with thinking on, the prompt opens `<think>`, so even a random model's
    reply starts as thinking."""
    folder = make_checkpoint(tmp_path_factory.mktemp("webui") / "moe47", seed=2, model_type="glm4_moe")
    shutil.copy(TEMPLATES / "GLM-4.7.jinja", folder / "chat_template.jinja")
    srv = _serve(folder, "tiny-moe")
    assert srv.state.chat.fmt.name == "glm47"
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra has it)")
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it as root)")
    with sync_api.sync_playwright() as pw:
        # (Playwright gives each launch a new empty profile directory of its own)
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("GLM4_WEBUI_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Page:
    """A fresh browser context (empty localStorage) on one server, recording what it asks for and what fails."""

    def __init__(self, browser, srv: ServerThread):
        self.srv = srv
        self.context = browser.new_context(viewport={"width": 1100, "height": 760}, device_scale_factor=1)
        self.external, self.chat_bodies, self.errors, self.dialogs = [], [], [], []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", self._console)
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("request", self._request)

    def _route(self, route):
        if urlparse(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            self.external.append(route.request.url)
            route.abort()

    def _console(self, msg):
        if "Content Security Policy" in msg.text or (msg.type == "error" and "Failed to load resource" not in msg.text):
            self.errors.append(msg.text)

    def _request(self, req):
        if req.url.endswith("/v1/chat/completions"):
            self.chat_bodies.append(req.post_data_json)

    def open(self, wait_ready: bool = True):
        self.page.goto(self.srv.url + "/")
        if wait_ready:
            self.page.wait_for_selector("body[data-ready]")
        return self.page

    def stored(self) -> list[dict]:
        return self.page.evaluate("JSON.parse(localStorage.getItem('glm4.conversations') || '[]')")

    def check_clean(self):
        assert self.external == [], f"the page asked for outside resources: {self.external}"
        assert self.errors == [], self.errors
        assert self.dialogs == []

    def close(self):
        self.context.close()


@pytest.fixture
def web(browser):
    made = []

    def open_page(srv) -> Page:
        made.append(Page(browser, srv))
        return made[-1]

    yield open_page
    for p in made:
        p.close()


def _pace(monkeypatch, st, seconds: float):
    """Slow the engine to `seconds` a step, so a reply is still streaming when the page looks at it."""
    step = st.engine.engine.step
    monkeypatch.setattr(st.engine.engine, "step", lambda: (time.sleep(seconds), step())[1])


def _oracle(srv, messages, key="x", **kw):
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)
    return c.chat.completions.create(model=srv.state.model_name, messages=messages, temperature=0, **kw)


def _settings(page, **values):
    for k, v in values.items():
        page.fill(f"#{k}", str(v))
        page.dispatch_event(f"#{k}", "change")


def _send(page, text: str):
    page.fill("#input", text)
    page.press("#input", "Enter")


def _wait_done(page, timeout=60_000):
    page.wait_for_selector("#send:not([hidden])", timeout=timeout)
    page.wait_for_selector("#stop[hidden]", state="attached", timeout=timeout)


# ------------------------------------------------------------------------------------------ the routes


def test_page_and_files_served_without_key(key_server):
    """GET / and /web/* need no key (they hold no data); the API behind them still does."""
    r = httpx.get(key_server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    for name, kind in [("app.js", "text/javascript"), ("api.js", "text/javascript"), ("markdown.js", "text/javascript"),
                       ("style.css", "text/css")]:
        f = httpx.get(key_server.url + "/web/" + name)
        assert f.status_code == 200 and f.headers["content-type"].startswith(kind), name
        assert f.headers["x-content-type-options"] == "nosniff"
        assert "http://" not in f.text and "https://" not in f.text  # no CDN, no web fonts
    for bad in ["/web/nope.js", "/web/..%2Fwebui.py", "/web/..%2F..%2Fapp.py", "/web/index"]:
        r = httpx.get(key_server.url + bad)
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error", bad
    assert httpx.get(key_server.url + "/v1/models").status_code == 401


# ------------------------------------------------------------------------------------------ the Markdown renderer

MARKDOWN = [
    ("plain <b>not bold</b> & more", "<p>plain &lt;b&gt;not bold&lt;/b&gt; &amp; more</p>"),
    ("<img src=x onerror=alert(1)>", "<p>&lt;img src=x onerror=alert(1)&gt;</p>"),
    ("```html\n<script>alert(1)</script>\n```\nafter",
     '<pre data-lang="html"><code class="language-html">&lt;script&gt;alert(1)&lt;/script&gt;</code></pre><p>after</p>'),
    ("```\nunclosed fence <i>", "<pre><code>unclosed fence &lt;i&gt;</code></pre>"),
    ("**bold** and *it* and `co<de>` and ~~old~~",
     "<p><strong>bold</strong> and <em>it</em> and <code>co&lt;de&gt;</code> and <del>old</del></p>"),
    ("a snake_case_name and 2 * 3 * 4", "<p>a snake_case_name and 2 * 3 * 4</p>"),
    ("`**not bold**`", "<p><code>**not bold**</code></p>"),
    ("line one\nline two\n\nnext", "<p>line one<br>line two</p><p>next</p>"),
    ("# Title <x>\n## Sub", "<h1>Title &lt;x&gt;</h1><h2>Sub</h2>"),
    ("- one\n- two **b**\n  - nested", "<ul><li>one</li><li>two <strong>b</strong><ul><li>nested</li></ul></li></ul>"),
    ("3. c\n4. d", '<ol start="3"><li>c</li><li>d</li></ol>'),
    ("> quoted *x*", "<blockquote><p>quoted <em>x</em></p></blockquote>"),
    ("---", "<hr>"),
    ("[docs](https://example.com/a?b=1&c=2)",
     '<p><a href="https://example.com/a?b=1&amp;c=2" target="_blank" rel="noopener noreferrer nofollow">docs</a></p>'),
    ("[x](javascript:alert`1`) [y](data:text/html;base64,PHN2Zz4=) [z](/v1/models)",
     "<p>[x](javascript:alert`1`) [y](data:text/html;base64,PHN2Zz4=) [z](/v1/models)</p>"),
    ('[<img src=x onerror=alert(1)>](https://e.x/"onmouseover=alert(1))',
     # (the quote ends the bare URL: it never reaches an attribute)
     '<p>[&lt;img src=x onerror=alert(1)&gt;](<a href="https://e.x/" target="_blank" '
     'rel="noopener noreferrer nofollow">https://e.x/</a>"onmouseover=alert(1))</p>'),
    ("see https://example.org/x.", '<p>see <a href="https://example.org/x" target="_blank" '
     'rel="noopener noreferrer nofollow">https://example.org/x</a>.</p>'),
]


def test_markdown_renderer(browser, server, web):
    """The page's renderer on fixed strings: HTML in model text stays text, code fences become <pre><code>, only
    http(s)/mailto links get an href. Then an XSS attempt goes through the whole page as a stored reply."""
    p = web(server)
    page = p.open()
    got = page.evaluate("cases => cases.map(markdownToHTML)", [src for src, _ in MARKDOWN])
    for (src, want), html in zip(MARKDOWN, got):
        assert html == want, src
    # a stored conversation whose reply tries script injection: rendered as text, nothing runs
    evil = [{"id": "c1", "title": "evil", "updated": 1, "messages": [
        {"role": "user", "content": "<img src=x onerror=\"document.title='pwned'\">"},
        {"role": "assistant", "content": "<script>document.title='pwned'</script>\n\n```js\n</code></pre>"
                                         "<img src=x onerror=\"document.title='pwned'\">\n```",
         "reasoning": "<svg onload=\"document.title='pwned'\">"}]}]
    page.evaluate("c => { localStorage.setItem('glm4.conversations', JSON.stringify(c));"
                  " localStorage.setItem('glm4.current', 'c1'); }", evil)
    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert page.locator(".msg.assistant pre code").inner_text().startswith("</code></pre><img")
    assert page.locator("#messages img, #messages script, #messages svg").count() == 0
    assert page.title() == "glm4 chat"
    p.check_clean()


# ------------------------------------------------------------------------------------------ chatting


def test_streamed_reply_settings_and_conversations(browser, server, web, monkeypatch, shots):
    """A message sent from the page streams back (text visible while the reply is still running), with the page's
    system prompt and sampling settings in the request; the reply is the API's own at temperature 0; the
    conversation survives a reload, and the list switches and deletes conversations."""
    p = web(server)
    page = p.open()
    assert page.locator("#model option").all_inner_texts() == [MODEL]
    assert page.locator(".empty").is_visible()
    page.screenshot(path=str(shots / "webui-empty.png"))
    _settings(page, system="You are terse.", temperature=0, top_p=0.9, max_tokens=24)
    _pace(monkeypatch, server.state, 0.05)
    _send(page, QUESTION)
    # streamed: some text is on the page while the stop button still shows (the reply is not finished)
    page.wait_for_function("() => document.querySelector('.msg.assistant .body')?.textContent.length > 0"
                           " && !document.getElementById('stop').hidden", timeout=30_000)
    _wait_done(page)
    monkeypatch.undo()
    body = p.chat_bodies[0]
    assert body["stream"] is True and body["model"] == MODEL
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0, 0.9, 24)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": QUESTION}]
    assert body["messages"] == messages and "tools" not in body
    want = _oracle(server, messages, top_p=0.9, max_tokens=24).choices[0].message.content
    conv = p.stored()
    assert len(conv) == 1 and conv[0]["title"] == QUESTION
    assert conv[0]["messages"][1] == {"role": "assistant", "content": want, "finish_reason": "length"}
    assert page.locator("#status").inner_text().startswith("24 tokens")
    # a second turn sends the whole conversation back
    _send(page, "And in Rome?")
    _wait_done(page)
    assert p.chat_bodies[1]["messages"] == messages + [{"role": "assistant", "content": want},
                                                       {"role": "user", "content": "And in Rome?"}]
    # reload: the conversation and the settings are still there
    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert page.locator(".msg").count() == 4 and page.locator(".msg.user").nth(1).inner_text().endswith("And in Rome?")
    assert page.input_value("#system") == "You are terse." and page.input_value("#max_tokens") == "24"
    # a new conversation, then back to the first through the list, then delete the first
    page.click("#new-chat")
    assert page.locator(".empty").is_visible()
    _send(page, "Hello")
    _wait_done(page)
    assert page.locator("#conversations li").all_inner_texts() == ["Hello\n×", f"{QUESTION}\n×"]
    page.locator("#conversations li", has_text=QUESTION).locator(".open").click()
    assert page.locator(".msg").count() == 4
    page.locator("#conversations li", has_text=QUESTION).locator(".delete").click()
    assert [c["title"] for c in p.stored()] == ["Hello"]
    assert page.locator("#conversations li").count() == 1 and page.locator(".empty").is_visible()
    assert engine_idle(server.state)
    p.check_clean()


def test_stop_button_aborts_the_request(browser, server, web, monkeypatch):
    """Stop aborts the fetch; the server sees the stream close, aborts the engine request and frees its KV blocks;
    the page keeps what had come, marked as stopped."""
    st = server.state
    messages = [{"role": "user", "content": QUESTION}]
    full = _oracle(server, messages, max_tokens=200)
    assert full.choices[0].finish_reason == "length"  # the reply would run all 200 tokens: Stop is what ends it
    assert engine_idle(st)
    aborted = st.metrics.counter("requests_aborted_total")
    p = web(server)
    page = p.open()
    _settings(page, temperature=0, max_tokens=200)
    _pace(monkeypatch, st, 0.05)
    _send(page, QUESTION)
    page.wait_for_function("() => document.querySelector('.msg.assistant .body')?.textContent.length > 0")
    bm = st.engine.engine.block_manager
    assert st.engine.num_pending == 1 and bm.num_free_blocks < bm.num_blocks  # running, holding KV blocks
    page.click("#stop")
    _wait_done(page, timeout=10_000)
    assert engine_idle(st)
    assert st.metrics.counter("requests_aborted_total") == aborted + 1
    monkeypatch.undo()
    msg = p.stored()[0]["messages"][1]
    assert msg["stopped"] is True and msg.get("finish_reason") is None
    assert msg["content"] and full.choices[0].message.content.startswith(msg["content"])
    assert page.locator(".msg.assistant .note").inner_text() == "stopped"
    assert page.locator("#status").inner_text() == "stopped"
    p.check_clean()


def test_reasoning_shown_in_details(browser, thinking_server, web, shots, monkeypatch):
    """On a thinking format (GLM-4.7's template) the reply's reasoning_content streams into a collapsible <details>
    (open while it streams); the answer after it is Markdown. Reasoning and answer are the API's own at
    temperature 0."""
    p = web(thinking_server)
    page = p.open()
    _settings(page, temperature=0, max_tokens=40, thinking_budget=12)
    question = "Why does this print 3?\n\n```python\nprint(len('<a>'))\n```"
    _pace(monkeypatch, thinking_server.state, 0.05)
    _send(page, question)
    page.wait_for_function("() => document.querySelector('.msg.assistant details.reasoning[open] .md')"
                           "?.textContent.length > 0 && !document.getElementById('stop').hidden", timeout=30_000)
    _wait_done(page)
    monkeypatch.undo()
    want = _oracle(thinking_server, [{"role": "user", "content": question}], max_tokens=40,
                   extra_body={"thinking_budget": 12}).choices[0].message
    msg = p.stored()[0]["messages"][1]
    assert msg["reasoning"] == want.model_extra["reasoning_content"] and msg["reasoning"]
    assert msg["content"] == (want.content or "")
    details = page.locator(".msg.assistant details.reasoning")
    assert details.locator("summary").inner_text() == "Reasoning"
    assert not details.evaluate("d => d.open")  # collapsed once the reply is done; a click opens it
    details.locator("summary").click()
    assert details.evaluate("d => d.open") and details.locator(".md").inner_text().strip()
    assert page.locator(".msg.user pre code.language-python").inner_text() == "print(len('<a>'))"
    page.screenshot(path=str(shots / "webui-conversation.png"))
    p.check_clean()


def test_tool_call_and_result(browser, server, web, shots):
    """The tools editor refuses invalid JSON before anything is sent; with tool_choice required the model's call is
    shown (its arguments valid for the schema), the result typed in goes back as a tool message answering it."""
    p = web(server)
    page = p.open()
    _settings(page, temperature=0, max_tokens=60)
    page.fill("#tools", '[{"type": "function", "function": {"name": "get weather"}}]')
    assert "function.name" in page.inner_text("#tools-error")
    page.fill("#tools", "[{not json")
    assert "not valid JSON" in page.inner_text("#tools-error")
    _send(page, QUESTION)
    assert "not valid JSON" in page.inner_text("#error") and p.chat_bodies == []  # nothing sent
    page.fill("#tools", json.dumps([WEATHER], indent=2))
    assert page.inner_text("#tools-error") == ""
    page.select_option("#tool_choice", "required")
    page.dispatch_event("#tool_choice", "change")
    _send(page, QUESTION)
    page.wait_for_selector(".tool-result-form textarea")
    body = p.chat_bodies[0]
    assert body["tools"] == [WEATHER] and body["tool_choice"] == "required"
    msg = p.stored()[0]["messages"][1]
    calls = msg["tool_calls"]
    assert calls and msg["finish_reason"] == "tool_calls"
    want = _oracle(server, [{"role": "user", "content": QUESTION}], max_tokens=60, tools=[WEATHER],
                   tool_choice="required").choices[0].message.tool_calls
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        (w.function.name, json.loads(w.function.arguments)) for w in want]
    shown = page.locator(".tool-call")
    assert shown.count() == len(calls)
    for i, call in enumerate(calls):
        args = json.loads(call["function"]["arguments"])
        jsonschema.validate(args, WEATHER["function"]["parameters"])
        assert shown.nth(i).locator(".tool-name").inner_text() == "Tool call · get_weather"
        assert json.loads(shown.nth(i).locator(".tool-args").inner_text()) == args
    page.fill(".tool-result-form textarea", '{"temp": 21}')
    page.screenshot(path=str(shots / "webui-tool-call.png"))
    page.select_option("#tool_choice", "auto")
    page.dispatch_event("#tool_choice", "change")
    # one result per call; the last one sends the conversation back for the model's next message
    results = [json.dumps({"temp": 21 + i}) for i in range(len(calls))]
    for i, result in enumerate(results):
        assert len(p.chat_bodies) == 1
        page.fill(".tool-result-form textarea", result)
        page.click(".tool-result-form button")
        page.wait_for_function(f"() => document.querySelectorAll('.msg.tool').length === {i + 1}")
    _wait_done(page)
    assert page.locator(".msg").count() == 2 + len(calls) + 1
    sent = p.chat_bodies[1]["messages"]
    assert sent[1] == {"role": "assistant", "content": msg.get("content") or None,
                       "tool_calls": [{"id": c["id"], "type": "function", "function": c["function"]} for c in calls]}
    assert sent[2:] == [{"role": "tool", "tool_call_id": c["id"], "content": r} for c, r in zip(calls, results)]
    assert p.chat_bodies[1]["tool_choice"] == "auto"
    assert page.locator(".msg.tool .tool-output").all_inner_texts() == results
    assert page.locator(".msg.tool .role").first.inner_text() == "Tool result · get_weather"
    p.check_clean()


def test_server_errors_shown(browser, server, web):
    """A request the server refuses (400) shows its one-line message on the page; no empty reply is kept, and the
    conversation goes on once the setting is fixed. On a narrow screen the settings open over the chat."""
    p = web(server)
    page = p.open()
    _settings(page, temperature=7)  # (the input's max is 2, but typed values still go: the server is the judge)
    _send(page, QUESTION)
    page.wait_for_selector("#error:not([hidden])")
    assert "temperature" in page.inner_text("#error")
    assert [m["role"] for m in p.stored()[0]["messages"]] == ["user"] and page.locator(".msg.assistant").count() == 0
    _settings(page, temperature=0, max_tokens=3)
    _send(page, "again")
    _wait_done(page)
    assert page.locator("#error").is_hidden() and page.locator(".msg.assistant").count() == 1
    page.set_viewport_size({"width": 600, "height": 700})
    assert page.locator("#settings").is_hidden()
    page.click("#toggle-settings")
    assert page.locator("#settings").is_visible()
    p.check_clean()


def test_api_key_asked_on_401(browser, key_server, web):
    """A server with --api-key: the page asks for the key when the API answers 401, asks again when the key is
    refused, keeps the accepted one in localStorage, and then chats."""
    p = web(key_server)
    page = p.open(wait_ready=False)
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible")
    assert page.inner_text("#key-message") == "This server needs an API key."
    page.fill("#key-input", "sk-wrong")
    page.click("#key-save")
    page.wait_for_function("() => document.getElementById('key-message').textContent.startsWith('The server refused')")
    assert dialog.is_visible()
    page.fill("#key-input", KEY)
    page.click("#key-save")
    page.wait_for_selector("body[data-ready]")
    assert not dialog.is_visible() and page.locator("#model option").all_inner_texts() == [MODEL]
    assert page.evaluate("localStorage.getItem('glm4.apiKey')") == KEY
    _settings(page, max_tokens=4)
    _send(page, QUESTION)
    _wait_done(page)
    assert p.stored()[0]["messages"][1]["content"]
    page.reload()  # the kept key: no question this time
    page.wait_for_selector("body[data-ready]")
    assert not dialog.is_visible()
    # cancelling the question: a one-line error on the page, no reply
    page.evaluate("localStorage.removeItem('glm4.apiKey')")
    _send(page, "again")
    dialog.wait_for(state="visible")
    page.click("#key-cancel")
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error").startswith("no API key")
    assert len(p.stored()[0]["messages"]) == 3  # the user's message stays, no empty reply
    p.check_clean()
