// The page's side of the server's OpenAI API: requests with the API key (asked for when the server answers 401,
// then kept in localStorage), the server-sent events of a streamed chat completion, and the tools editor's check.
//
//   const r = await api("v1/models");                        // a Response, the key added (asked for on 401)
//   for await (const chunk of sseChunks(r)) ...               // each `data:` JSON of a stream, up to [DONE]
//   validateTools(text) -> {tools} | {error}                  // the editor's JSON, checked before it is sent
"use strict";

(function (global) {
  const KEY_STORE = "glm4.apiKey";

  class APIError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function askKey(message) {  // resolves with the key typed, or null when the user cancels
    const dialog = document.getElementById("key-dialog");
    const input = document.getElementById("key-input");
    document.getElementById("key-message").textContent = message;
    input.value = "";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => {
        resolve(dialog.returnValue === "save" && input.value.trim() ? input.value.trim() : null);
      }, { once: true });
      dialog.showModal();
      input.focus();
    });
  }

  async function errorMessage(response) {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      return body.error?.message || body.error || text;
    } catch {
      return text || `${response.status} ${response.statusText}`;
    }
  }

  // fetch `path` (relative to the page) with the stored key; on 401 ask for a key and try again
  async function api(path, options = {}) {
    for (;;) {
      const key = localStorage.getItem(KEY_STORE);
      const headers = { ...(options.headers || {}) };
      if (key) headers.Authorization = "Bearer " + key;
      const response = await fetch(path, { ...options, headers });
      if (response.status !== 401) {
        if (!response.ok) throw new APIError(response.status, await errorMessage(response));
        return response;
      }
      const reason = await errorMessage(response);
      const typed = await askKey(key ? `The server refused the key: ${reason}` : "This server needs an API key.");
      if (typed === null) throw new APIError(401, "no API key: " + reason);
      localStorage.setItem(KEY_STORE, typed);
    }
  }

  // each JSON `data:` payload of a text/event-stream response, until [DONE]; an in-band error event throws
  async function* sseChunks(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new APIError(chunk.error.code || 500, chunk.error.message || String(chunk.error));
        yield chunk;
      }
    }
  }

  const TOOL_NAME = /^[A-Za-z0-9_-]{1,64}$/;
  const isObject = (v) => typeof v === "object" && v !== null && !Array.isArray(v);

  // the tools editor's text -> {tools: [...] | null} or {error: "one line saying what is wrong"}
  function validateTools(text) {
    if (!text.trim()) return { tools: null };
    let tools;
    try {
      tools = JSON.parse(text);
    } catch (e) {
      return { error: "tools: not valid JSON (" + e.message + ")" };
    }
    if (!Array.isArray(tools)) return { error: "tools: expected a JSON list of tools, [{...}, ...]" };
    const names = new Set();
    for (const [i, tool] of tools.entries()) {
      const at = `tools[${i}]`;
      if (!isObject(tool)) return { error: `${at}: expected an object` };
      if (tool.type !== "function") return { error: `${at}.type: expected "function"` };
      const fn = tool.function;
      if (!isObject(fn)) return { error: `${at}.function: expected an object with a name` };
      if (typeof fn.name !== "string" || !TOOL_NAME.test(fn.name)) {
        return { error: `${at}.function.name: 1-64 letters, digits, _ or -` };
      }
      if (names.has(fn.name)) return { error: `${at}.function.name: "${fn.name}" is given twice` };
      names.add(fn.name);
      if (fn.description !== undefined && typeof fn.description !== "string") {
        return { error: `${at}.function.description: expected a string` };
      }
      if (fn.parameters !== undefined) {
        if (!isObject(fn.parameters)) return { error: `${at}.function.parameters: expected a JSON schema object` };
        if (fn.parameters.type !== undefined && fn.parameters.type !== "object") {
          return { error: `${at}.function.parameters.type: expected "object"` };
        }
      }
    }
    return { tools: tools.length ? tools : null };
  }

  global.APIError = APIError;
  global.api = api;
  global.sseChunks = sseChunks;
  global.validateTools = validateTools;
})(window);
