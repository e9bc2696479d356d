// The chat page: conversations kept in localStorage, a streamed reply rendered as it comes (reasoning in a
// <details>, content as Markdown, tool calls with a box for each result), settings and the tools editor.
//
// A conversation is {id, title, updated, messages}; messages are OpenAI's (user / assistant / tool) plus what the
// page shows only: an assistant's `reasoning` and `stopped`. The system prompt and sampling settings are the
// page's, sent with every request.
"use strict";

const STORE = { conversations: "glm4.conversations", current: "glm4.current", settings: "glm4.settings" };
const SETTINGS = ["model", "system", "temperature", "top_p", "max_tokens", "thinking_budget", "tools", "tool_choice"];
const NUMBERS = ["temperature", "top_p", "max_tokens", "thinking_budget"];  // sent when set, else the server's defaults
const EXAMPLE_TOOLS = [{
  type: "function",
  function: {
    name: "get_weather", description: "Current weather of a city",
    parameters: { type: "object", properties: { city: { type: "string" }, unit: { enum: ["c", "f"] } },
      required: ["city"] },
  },
}];

const $ = (id) => document.getElementById(id);
const load = (key, fallback) => {
  try {
    return JSON.parse(localStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
};
const save = (key, value) => localStorage.setItem(key, JSON.stringify(value));

let conversations = load(STORE.conversations, []);
let current = conversations.find((c) => c.id === localStorage.getItem(STORE.current)) || null;
let inFlight = null;  // {controller, conversation} while a reply streams

// ------------------------------------------------------------------------------------------ conversations

function saveConversations() {
  save(STORE.conversations, conversations);
  localStorage.setItem(STORE.current, current ? current.id : "");
}

function newConversation() {
  stop();
  current = null;
  saveConversations();
  renderAll();
  $("input").focus();
}

function renderConversationList() {
  const list = $("conversations");
  list.replaceChildren();
  for (const conv of [...conversations].sort((a, b) => b.updated - a.updated)) {
    const li = document.createElement("li");
    li.dataset.id = conv.id;
    li.classList.toggle("current", conv === current);
    const open = document.createElement("button");
    open.className = "open";
    open.textContent = conv.title || "New chat";
    open.title = conv.title;
    open.addEventListener("click", () => {
      stop();
      current = conv;
      saveConversations();
      renderAll();
    });
    const del = document.createElement("button");
    del.className = "delete";
    del.textContent = "×";
    del.title = "Delete this conversation";
    del.addEventListener("click", () => {
      if (inFlight?.conversation === conv) stop();
      conversations = conversations.filter((c) => c !== conv);
      if (current === conv) current = null;
      saveConversations();
      renderAll();
    });
    li.append(open, del);
    list.appendChild(li);
  }
}

// ------------------------------------------------------------------------------------------ messages

function element(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function answered(conv, callId) {
  return conv.messages.some((m) => m.role === "tool" && m.tool_call_id === callId);
}

function toolCallNode(conv, msg, call) {
  const box = element("div", "tool-call");
  box.dataset.id = call.id;
  box.appendChild(element("div", "tool-name", "Tool call · " + call.function.name));
  let args = call.function.arguments;
  try {
    args = JSON.stringify(JSON.parse(args), null, 2);
  } catch { /* still streaming, or not JSON: shown as it is */ }
  box.appendChild(element("pre", "tool-args", args));
  if (!inFlight && !msg.stopped && !answered(conv, call.id)) {
    const form = element("form", "tool-result-form");
    const input = element("textarea");
    input.rows = 2;
    input.placeholder = `Result of ${call.function.name} (sent back as a tool message)`;
    const send = element("button", null, "Send result");
    send.type = "submit";
    form.append(input, send);
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      conv.messages.push({ role: "tool", tool_call_id: call.id, name: call.function.name, content: input.value });
      conv.updated = Date.now();
      saveConversations();
      if (msg.tool_calls.every((c) => answered(conv, c.id))) complete(conv);
      else renderMessages();
    });
    box.appendChild(form);
  }
  return box;
}

// fill `node` with message `msg`; called again on every streamed delta (the <details> keeps its open state)
function renderMessage(conv, msg, node) {
  node.className = "msg " + msg.role;
  if (!node.firstChild) {
    const label = { user: "You", assistant: "Assistant", tool: "Tool result" }[msg.role];
    node.appendChild(element("div", "role", msg.role === "tool" ? `${label} · ${msg.name || ""}` : label));
  }
  if (msg.role === "tool") {
    if (node.childNodes.length === 1) node.appendChild(element("pre", "tool-output", msg.content));
    return;
  }
  if (msg.reasoning) {
    let details = node.querySelector("details.reasoning");
    if (!details) {
      details = element("details", "reasoning");
      details.open = msg === inFlight?.message;
      details.append(element("summary", null, "Reasoning"), element("div", "md"));
      node.insertBefore(details, node.childNodes[1] || null);
    }
    details.querySelector(".md").replaceChildren(renderMarkdown(msg.reasoning));
  }
  let body = node.querySelector(":scope > .body");
  if (!body) body = node.appendChild(element("div", "body md"));
  body.replaceChildren(renderMarkdown(msg.content || ""));
  node.querySelectorAll(":scope > .tool-call, :scope > .note").forEach((n) => n.remove());
  for (const call of msg.tool_calls || []) node.appendChild(toolCallNode(conv, msg, call));
  if (msg.stopped) node.appendChild(element("div", "note", "stopped"));
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren();
  if (!current || !current.messages.length) {
    box.appendChild(element("div", "empty", "Ask anything. Conversations stay in this browser."));
    return;
  }
  for (const msg of current.messages) {
    const node = element("div");
    renderMessage(current, msg, node);
    box.appendChild(node);
  }
  box.scrollTop = box.scrollHeight;
}

function renderAll() {
  renderConversationList();
  renderMessages();
  const busy = Boolean(inFlight);
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

function showError(text) {
  $("error").textContent = text || "";
  $("error").hidden = !text;
}

// ------------------------------------------------------------------------------------------ settings

function settings() {
  const out = {};
  for (const k of SETTINGS) out[k] = $(k).value;
  return out;
}

function restoreSettings() {
  const s = load(STORE.settings, {});
  for (const k of SETTINGS) if (typeof s[k] === "string" && k !== "model") $(k).value = s[k];
  checkTools();
}

function checkTools() {
  const result = validateTools($("tools").value);
  $("tools-error").textContent = result.error || "";
  $("tools").classList.toggle("invalid", Boolean(result.error));
  return result;
}

async function loadModels() {
  try {
    const body = await (await api("v1/models")).json();
    const select = $("model");
    select.replaceChildren(...body.data.map((m) => element("option", null, m.id)));
    const wanted = load(STORE.settings, {}).model;
    if (body.data.some((m) => m.id === wanted)) select.value = wanted;
  } catch (e) {
    showError("could not list models: " + e.message);
  }
}

// ------------------------------------------------------------------------------------------ sending

function apiMessages(conv, system) {
  const out = system.trim() ? [{ role: "system", content: system }] : [];
  for (const m of conv.messages) {
    if (m.role === "user") out.push({ role: "user", content: m.content });
    else if (m.role === "tool") out.push({ role: "tool", tool_call_id: m.tool_call_id, content: m.content });
    else {
      // a call cut short by the stop button has no complete arguments: it is not sent back
      const calls = (m.tool_calls || []).filter((c) => answered(conv, c.id));
      out.push(calls.length ? { role: "assistant", content: m.content || null, tool_calls: calls.map(
        (c) => ({ id: c.id, type: "function", function: { name: c.function.name, arguments: c.function.arguments } }),
      ) } : { role: "assistant", content: m.content || "" });
    }
  }
  return out;
}

function requestBody(conv) {
  const s = settings();
  const body = { model: s.model, messages: apiMessages(conv, s.system), stream: true,
    stream_options: { include_usage: true } };
  for (const k of NUMBERS) {
    if (s[k] !== "") body[k] = Number(s[k]);
  }
  const tools = checkTools();
  if (tools.error) throw new APIError(0, tools.error);
  if (tools.tools) Object.assign(body, { tools: tools.tools, tool_choice: s.tool_choice });
  return body;
}

function fold(msg, delta) {  // one OpenAI delta into the assistant message
  if (delta.content) msg.content += delta.content;
  if (delta.reasoning_content) msg.reasoning = (msg.reasoning || "") + delta.reasoning_content;
  for (const tc of delta.tool_calls || []) {
    msg.tool_calls = msg.tool_calls || [];
    const call = msg.tool_calls[tc.index] ||= { id: tc.id, type: "function", function: { name: "", arguments: "" } };
    if (tc.id) call.id = tc.id;
    if (tc.function?.name) call.function.name = tc.function.name;
    if (tc.function?.arguments) call.function.arguments += tc.function.arguments;
  }
}

// ask the server for the next assistant message of `conv`, streaming it into the page
async function complete(conv) {
  showError("");
  let body;
  try {
    body = requestBody(conv);
  } catch (e) {
    showError(e.message);
    return;
  }
  const message = { role: "assistant", content: "" };
  conv.messages.push(message);
  conv.updated = Date.now();
  inFlight = { controller: new AbortController(), conversation: conv, message };
  renderAll();
  const node = $("messages").lastElementChild;
  const started = performance.now();
  let usage = null;
  let pending = false;
  const redraw = () => {  // at most once a frame, however fast the deltas come
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      if (current === conv) {
        renderMessage(conv, message, node);
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    });
  };
  $("status").textContent = "generating…";
  try {
    const response = await api("v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: inFlight.controller.signal,
    });
    for await (const chunk of sseChunks(response)) {
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      fold(message, choice.delta || {});
      if (choice.finish_reason) message.finish_reason = choice.finish_reason;
      redraw();
    }
  } catch (e) {
    if (e.name === "AbortError") message.stopped = true;
    else showError(e.message);
  }
  if (!message.content && !message.reasoning && !message.tool_calls && !message.stopped) {
    conv.messages.pop();  // nothing came back (an error): no empty bubble
  }
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  $("status").textContent = message.stopped ? "stopped"
    : usage ? `${usage.completion_tokens} tokens · ${seconds} s` : "";
  inFlight = null;
  conv.updated = Date.now();
  saveConversations();
  renderAll();
}

function stop() {
  if (inFlight) inFlight.controller.abort();  // the server sees the connection close and aborts the request
}

function send() {
  const text = $("input").value;
  if (!text.trim() || inFlight) return;
  if (checkTools().error) {
    showError(checkTools().error);
    return;
  }
  if (!current) {
    current = { id: crypto.randomUUID?.() || String(Date.now()) + Math.random(), title: "", updated: 0, messages: [] };
    conversations.push(current);
  }
  current.messages.push({ role: "user", content: text });
  if (!current.title) current.title = text.trim().split("\n")[0].slice(0, 48);
  $("input").value = "";
  complete(current);
}

// ------------------------------------------------------------------------------------------ wiring

function main() {
  restoreSettings();
  for (const k of SETTINGS) $(k).addEventListener("change", () => save(STORE.settings, settings()));
  $("tools").addEventListener("input", checkTools);
  $("tools-example").addEventListener("click", () => {
    $("tools").value = JSON.stringify(EXAMPLE_TOOLS, null, 2);
    checkTools();
    save(STORE.settings, settings());
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newConversation);
  $("toggle-settings").addEventListener("click", () => {  // a narrow screen shows the panel over the chat
    const narrow = matchMedia("(max-width: 900px)").matches;
    document.body.classList.toggle(narrow ? "settings-over" : "no-settings");
  });
  renderAll();
  loadModels().then(() => document.body.dataset.ready = "1");
}

main();
