// A small, safe Markdown renderer for model text: it builds DOM nodes and puts every piece of text in a text node,
// so nothing the model writes is ever parsed as HTML (no innerHTML anywhere). Links keep an href only for
// http(s) and mailto; anything else stays text.
//
//   renderMarkdown("**hi** `x`")  -> a DocumentFragment      markdownToHTML(text) -> its HTML (for tests)
//
// Blocks: ``` / ~~~ fences (an unclosed fence runs to the end, as a streamed reply is cut mid-block), # headings,
// > quotes, - * + and 1. lists, --- rules, paragraphs (a single newline is a line break).
// Inline: `code`, **bold** / __bold__, *italic* / _italic_, ~~strike~~, [text](url), bare http(s) URLs.
"use strict";

(function (global) {
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}> ?(.*)$/;
  const BULLET = /^( {0,6})([-*+])\s+(.*)$/;
  const ORDERED = /^( {0,6})(\d{1,9})[.)]\s+(.*)$/;
  const SAFE_URL = /^(https?:\/\/|mailto:)[^\s<>"']+$/i;

  function el(tag, parent, cls) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (parent) parent.appendChild(node);
    return node;
  }

  // ---------------------------------------------------------------------------------------- inline

  // one alternative per inline construct; the first to match at the leftmost position wins
  const INLINE = new RegExp([
    "(`+)([^`]|[^`][\\s\\S]*?[^`])\\1(?!`)",           // 1,2: code span
    "\\[([^\\]\\n]+)\\]\\(([^()\\s]+)\\)",              // 3,4: link
    "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*",               // 5: bold
    "__(?=\\S)([\\s\\S]*?\\S)__",                       // 6: bold
    "\\*(?=[^\\s*])([\\s\\S]*?[^\\s*])\\*",             // 7: italic
    "\\b_(?=[^\\s_])([\\s\\S]*?[^\\s_])_\\b",           // 8: italic
    "~~(?=\\S)([\\s\\S]*?\\S)~~",                       // 9: strike
    "(https?:\\/\\/[^\\s<>\"'()\\[\\]]*[^\\s<>\"'()\\[\\].,;:!?])",  // 10: bare URL
  ].join("|"), "g");

  function link(parent, label, url, bare) {
    if (!SAFE_URL.test(url)) {  // javascript:, data:, relative paths...: shown as the text it is
      parent.appendChild(document.createTextNode(`[${label}](${url})`));
      return;
    }
    const a = el("a", parent);
    a.href = url;
    a.target = "_blank";
    a.rel = "noopener noreferrer nofollow";
    if (bare) a.textContent = label;  // a bare URL is its own label: not parsed again
    else inline(label, a);
  }

  function inline(text, parent) {
    let last = 0;
    INLINE.lastIndex = 0;
    for (let m; (m = INLINE.exec(text)) !== null;) {
      if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
      last = INLINE.lastIndex;
      const next = INLINE.lastIndex;  // recursion below reuses the regex: restore the position afterwards
      if (m[2] !== undefined) {
        const code = m[2].length > 2 && m[2][0] === " " && m[2].slice(-1) === " " ? m[2].slice(1, -1) : m[2];
        el("code", parent).textContent = code;
      } else if (m[3] !== undefined) link(parent, m[3], m[4]);
      else if (m[5] !== undefined || m[6] !== undefined) inline(m[5] ?? m[6], el("strong", parent));
      else if (m[7] !== undefined || m[8] !== undefined) inline(m[7] ?? m[8], el("em", parent));
      else if (m[9] !== undefined) inline(m[9], el("del", parent));
      else link(parent, m[10], m[10], true);
      INLINE.lastIndex = next;
    }
    if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
  }

  function inlineLines(lines, parent) {  // lines of one paragraph: single newlines become <br>
    lines.forEach((line, i) => {
      if (i) el("br", parent);
      inline(line, parent);
    });
  }

  // ---------------------------------------------------------------------------------------- blocks

  function codeBlock(lines, lang, parent) {
    const pre = el("pre", parent);
    const code = el("code", pre);
    if (lang) {
      code.className = "language-" + lang;
      pre.dataset.lang = lang;
    }
    code.textContent = lines.join("\n");
  }

  function list(lines, i, parent) {  // returns the index after the list
    const ordered = ORDERED.test(lines[i]);
    const item = ordered ? ORDERED : BULLET;
    const node = el(ordered ? "ol" : "ul", parent);
    if (ordered) {
      const start = parseInt(lines[i].match(ORDERED)[2], 10);
      if (start !== 1) node.start = start;
    }
    const indent = lines[i].match(item)[1].length;
    let li = null;
    let body = [];
    const flush = () => {
      if (li) blocks(body, li, true);
      body = [];
    };
    while (i < lines.length) {
      const line = lines[i];
      const m = line.match(item);
      if (m && m[1].length === indent) {
        flush();
        li = el("li", node);
        body.push(m[3]);
      } else if (line.trim() === "") {
        if (i + 1 < lines.length && /^\s+\S/.test(lines[i + 1])) body.push("");
        else break;
      } else if (/^\s/.test(line) || (!BULLET.test(line) && !ORDERED.test(line) && !startsBlock(line))) {
        body.push(line.replace(/^ {1,4}/, ""));  // continuation or nested content, one indent level removed
      } else break;
      i++;
    }
    flush();
    return i;
  }

  function startsBlock(line) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line);
  }

  function blocks(lines, parent, tight) {
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (line.trim() === "") {
        i++;
      } else if ((m = line.match(FENCE))) {
        const close = new RegExp("^ {0,3}" + m[1][0] + "{" + m[1].length + ",}\\s*$");
        const body = [];
        for (i++; i < lines.length && !close.test(lines[i]); i++) body.push(lines[i]);
        i++;  // the closing fence (or past the end)
        codeBlock(body, m[2], parent);
      } else if (RULE.test(line)) {
        el("hr", parent);
        i++;
      } else if ((m = line.match(HEADING))) {
        inline(m[2], el("h" + m[1].length, parent));
        i++;
      } else if (QUOTE.test(line)) {
        const body = [];
        for (; i < lines.length && (m = lines[i].match(QUOTE)); i++) body.push(m[1]);
        blocks(body, el("blockquote", parent));
      } else if (BULLET.test(line) || ORDERED.test(line)) {
        i = list(lines, i, parent);
      } else {
        const para = [];
        for (; i < lines.length && lines[i].trim() !== "" && !startsBlock(lines[i])
          && !(para.length && (BULLET.test(lines[i]) || ORDERED.test(lines[i]))); i++) para.push(lines[i]);
        // a list item's first paragraph sits in the <li> itself (a tight list); later ones get their <p>
        inlineLines(para, tight && !parent.childNodes.length ? parent : el("p", parent));
      }
    }
  }

  function renderMarkdown(text) {
    const frag = document.createDocumentFragment();
    blocks(String(text ?? "").replace(/\r\n?/g, "\n").split("\n"), frag);
    return frag;
  }

  function markdownToHTML(text) {
    const div = document.createElement("div");
    div.appendChild(renderMarkdown(text));
    return div.innerHTML;  // serializing our own nodes: text is escaped by the serializer
  }

  global.renderMarkdown = renderMarkdown;
  global.markdownToHTML = markdownToHTML;
})(window);
