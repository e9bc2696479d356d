"""`simple_browser` over a local folder of documents: offline search and open, GLM-4's command syntax.

    b = SimpleBrowser("docs/")
    b.command('search("paged attention")')   # numbered results: 【0†title†path】 + a snippet
    b.command("mclick([0, 2])")              # those results' text
    b.command('open_url("guide/intro.md")')  # a document by path (or file:// URL) inside the folder

The command is GLM-4's built-in call body: one call of search(query, recency_days=None), mclick(ids) or
open_url(url), parsed with `ast` and `literal_eval` (never evaluated). Documents are the folder's
.txt/.md/.rst/.html/.json/.csv/.py files; HTML is reduced to its text. Ranking is BM25 over words.
"""

from __future__ import annotations

import ast
import html
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .observation import Observation

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".html", ".htm", ".json", ".csv", ".py", ".yaml", ".yml"}
WORD = re.compile(r"\w+", re.UNICODE)
MAX_DOC_BYTES = 2 << 20
MAX_OPEN_CHARS = 8000


@dataclass
class Document:
    path: str  # relative to the folder
    title: str
    text: str
    mtime: float


def _html_text(raw: str) -> tuple[str, str | None]:
    title = re.search(r"<title[^>]*>(.*?)</title>", raw, re.I | re.S)
    body = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", raw, flags=re.I | re.S)
    body = re.sub(r"<[^>]+>", " ", body)
    return html.unescape(re.sub(r"[ \t]+", " ", body)).strip(), (html.unescape(title.group(1).strip()) if title else None)


def _terms(text: str) -> list[str]:
    # CJK text has no spaces: index its characters one by one alongside whole words
    out = []
    for w in WORD.findall(text.lower()):
        out += list(w) if any("\u4e00" <= c <= "\u9fff" for c in w) else [w]
    return out


class SimpleBrowser:
    """Search and open the documents of one folder, remembering the last results for mclick."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise FileNotFoundError(f"simple_browser: {folder} is not a folder")
        self.docs: list[Document] = []
        for p in sorted(self.folder.rglob("*")):
            if p.suffix.lower() in TEXT_SUFFIXES and p.is_file() and p.stat().st_size <= MAX_DOC_BYTES:
                if not p.resolve().is_relative_to(self.folder):
                    continue  # a symlink out of the folder
                raw = p.read_text(encoding="utf-8", errors="replace")
                text, title = _html_text(raw) if p.suffix.lower() in (".html", ".htm") else (raw, None)
                if title is None:
                    first = next((ln.strip("# ").strip() for ln in text.splitlines() if ln.strip()), p.stem)
                    title = first[:80]
                self.docs.append(Document(str(p.relative_to(self.folder)), title, text, p.stat().st_mtime))
        self._tf = [Counter(_terms(d.title + "\n" + d.text)) for d in self.docs]
        self._df = Counter(t for tf in self._tf for t in tf)
        self._avg = sum(sum(tf.values()) for tf in self._tf) / max(1, len(self._tf))
        self.results: list[int] = []  # document index of each numbered result

    # ---- the three functions of GLM-4's simple_browser

    def search(self, query: str, recency_days: int | None = None, top_k: int = 5) -> Observation:
        terms = _terms(query)
        if not terms:
            return Observation(error="search needs some words to look for")
        n = len(self.docs)
        now = time.time()
        scores = []
        for i, tf in enumerate(self._tf):
            if recency_days is not None and now - self.docs[i].mtime > recency_days * 86400:
                continue
            length = sum(tf.values())
            s = 0.0
            for t in set(terms):
                if tf[t]:
                    idf = math.log(1 + (n - self._df[t] + 0.5) / (self._df[t] + 0.5))
                    s += idf * tf[t] * 2.2 / (tf[t] + 1.2 * (0.25 + 0.75 * length / max(1.0, self._avg)))
            if s > 0:
                scores.append((s, i))
        scores.sort(key=lambda x: -x[0])
        self.results = [i for _, i in scores[:top_k]]
        if not self.results:
            return Observation(f"no documents match {query!r}")
        lines = []
        for rid, i in enumerate(self.results):
            d = self.docs[i]
            lines.append(f"【{rid}†{d.title}†{d.path}】\n{self._snippet(d.text, terms)}")
        return Observation("\n\n".join(lines))

    def mclick(self, ids: list[int]) -> Observation:
        out, bad = [], []
        for rid in ids:
            if isinstance(rid, int) and 0 <= rid < len(self.results):
                d = self.docs[self.results[rid]]
                out.append(f"【{rid}†{d.title}†{d.path}】\n{d.text[:MAX_OPEN_CHARS]}")
            else:
                bad.append(rid)
        if not out:
            return Observation(error=f"no such result id(s) {bad}: search first, then mclick its numbers")
        note = f"\n\n(no result with id {bad})" if bad else ""
        return Observation("\n\n".join(out) + note)

    def open_url(self, url: str) -> Observation:
        path = re.sub(r"^file://", "", str(url)).lstrip("/")
        for d in self.docs:
            if d.path == path or d.path == str(url):
                return Observation(f"【{d.title}†{d.path}】\n{d.text[:MAX_OPEN_CHARS]}")
        return Observation(error=f"{url!r}: not a document of this offline browser (no internet access)")

    # ---- the raw command of a built-in call

    def command(self, body: str) -> Observation:
        """Run one `search(...)` / `mclick(...)` / `open_url(...)` call written by the model."""
        try:
            tree = ast.parse(body.strip(), mode="eval")
        except SyntaxError:
            return Observation(error=f"not a browser command: {body.strip()[:200]!r} "
                                     "(use search(\"words\"), mclick([ids]) or open_url(\"path\"))")
        call = tree.body
        fns = {"search": self.search, "mclick": self.mclick, "open_url": self.open_url}
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in fns):
            return Observation(error="a browser command is one call of search, mclick or open_url")
        try:
            args = [ast.literal_eval(a) for a in call.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg}
            return fns[call.func.id](*args, **kwargs)
        except (ValueError, TypeError, SyntaxError) as e:
            return Observation(error=f"bad arguments to {call.func.id}: {e}")

    @staticmethod
    def _snippet(text: str, terms: list[str], width: int = 200) -> str:
        low = text.lower()
        pos = min((p for p in (low.find(t) for t in terms) if p >= 0), default=0)
        start = max(0, pos - width // 3)
        return " ".join(text[start:start + width].split())
