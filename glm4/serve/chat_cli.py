"""`glm4 chat`: a terminal chat with streaming output, multi-line input and tools.

Commands: /reset (new conversation), /system [TEXT] (show or set the system prompt; starts over),
/tools [FILE|off] (show, load an OpenAI tools JSON list, or drop the tools), /image PATH (attach a picture to
your next message; vision checkpoints; /image alone lists them, /image off drops them), /help, /exit.
Multi-line input: a line of three double quotes starts and ends a block, or end a line with a backslash.
Ctrl-C stops a generation (the partial reply is kept) and clears a half-typed input; Ctrl-D exits.
A tool call is shown as `-> name(arguments)` and you type its result (empty: skip the result); with
`glm4 chat --agent` the agent's tools run it and the result is shown as `<- ...`.
`--image PATH` (repeatable) attaches pictures to the first message; without --model it picks the shipped vision
model (glm4/assets/vision), which answers questions about simple pictures, greedily unless --temperature is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from glm4.serve import DTYPE_HELP

HELP = __doc__.split("\n\n", 1)[1]


class ChatSession:
    """One conversation over an LLM: messages, system prompt and tools; `reply()` streams events."""

    def __init__(self, llm, system: str | None = None, tools: list[dict] | None = None, params=None):
        self.llm, self.system, self.tools, self.params = llm, system, tools, params
        self.messages: list[dict] = []
        self.images: list[str] = []  # picture paths for the next user message

    def takes_images(self) -> bool:
        from glm4.engine.chat import chat_layer_for

        return chat_layer_for(self.llm)[0].media is not None

    def attach(self, path: str) -> None:
        """Attach a picture to the next user message (ValueError: not a picture, or a text-only model)."""
        from glm4.media.image import load_image

        if not self.takes_images():
            raise ValueError("this model does not take images (`glm4 chat --image PATH` starts the shipped vision "
                             "model)")
        p = str(Path(path).expanduser().resolve())
        load_image(p)  # MediaError (a ValueError) now rather than at the next message
        self.images.append(p)

    def user_message(self, text: str) -> dict:
        """The next user message: `text`, with the attached pictures first (then they are used up)."""
        if not self.images:
            return {"role": "user", "content": text}
        parts = [{"type": "image", "image": p} for p in self.images] + [{"type": "text", "text": text}]
        self.images = []
        return {"role": "user", "content": parts}

    def reset(self) -> None:
        self.messages = []

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def reply(self) -> Iterator[dict]:
        """Stream the assistant's reply to the conversation so far; on completion (or when the consumer
        stops early) the reply, partial or whole, is appended to the conversation."""
        from glm4.engine.chat import chat_stream

        text, calls, done = [], {}, False
        try:
            for ev in chat_stream(self.llm, self.conversation(), tools=self.tools,
                                  tool_choice="auto" if self.tools else "none", params=self.params):
                if ev["type"] == "done":
                    done = True
                    result = ev["result"]
                    self.messages.append(result.message())
                elif ev["type"] == "content":
                    text.append(ev["text"])
                elif ev["type"] == "tool_call" and "id" in ev:
                    calls[ev["index"]] = {"id": ev["id"], "type": "function",
                                          "function": {"name": ev["name"], "arguments": ""}}
                elif ev["type"] == "tool_call":
                    calls[ev["index"]]["function"]["arguments"] += ev["arguments"]
                yield ev
        finally:
            if not done and (text or calls):  # stopped: keep what was said (complete calls only)
                kept = [c for c in calls.values() if _is_json(c["function"]["arguments"])]
                msg: dict = {"role": "assistant", "content": "".join(text) or None}
                if kept:
                    msg["tool_calls"] = kept
                if msg["content"] is not None or kept:
                    self.messages.append(msg)


def _is_json(s: str) -> bool:
    try:
        json.loads(s)
        return True
    except ValueError:
        return False


def load_tools(path: str) -> list[dict]:
    """An OpenAI `tools` list from a JSON file (a list, or {"tools": [...]}); bare functions are wrapped."""
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if isinstance(data, dict):
        data = data.get("tools", [data])
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list of tools")
    tools = []
    for i, t in enumerate(data):
        if isinstance(t, dict) and "function" not in t and "name" in t:
            t = {"type": "function", "function": t}
        if not isinstance(t, dict) or not isinstance(t.get("function"), dict) or not t["function"].get("name"):
            raise ValueError(f"{path}: tool {i} needs function.name")
        tools.append({"type": "function", **t})
    return tools


ToolRunner = Callable[[dict], str]  # an OpenAI tool call -> its result as the model should read it


class Repl:
    """The read-eval-print loop; `read(prompt) -> str` raises EOFError at the end, KeyboardInterrupt on Ctrl-C.
    `run_tool` (the hook `glm4 chat --agent` fills) executes tool calls; without it the user types results.
    `max_tool_rounds` bounds the calls the model may chain in one turn (10, as GLM-4's demo)."""

    def __init__(self, session: ChatSession, read: Callable[[str], str], out: TextIO,
                 run_tool: ToolRunner | None = None, max_tool_rounds: int = 10):
        self.s, self.read, self.out = session, read, out
        self.run_tool, self.max_tool_rounds = run_tool, max_tool_rounds

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def read_message(self) -> str | None:
        """One user input (multi-line aware); None at end of input."""
        try:
            line = self.read("you> ")
        except EOFError:
            return None
        if line.strip() == '"""':
            lines = []
            while True:
                try:
                    nxt = self.read("... ")
                except EOFError:
                    break
                if nxt.strip() == '"""':
                    break
                lines.append(nxt)
            return "\n".join(lines)
        lines = [line]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            try:
                lines.append(self.read("... "))
            except EOFError:
                break
        return "\n".join(lines)

    def command(self, line: str) -> bool:
        """Run a /command; False to quit."""
        cmd, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if cmd in ("/exit", "/quit"):
            return False
        if cmd == "/reset":
            self.s.reset()
            self.say("(conversation cleared)")
        elif cmd == "/system":
            if arg:
                self.s.system = arg
                self.s.reset()
                self.say("(system prompt set; conversation cleared)")
            else:
                self.say(f"(system prompt: {self.s.system!r})")
        elif cmd == "/tools":
            if not arg:
                names = [t["function"]["name"] for t in self.s.tools or []]
                self.say(f"(tools: {', '.join(names) or 'none'})")
            elif arg in ("off", "none"):
                self.s.tools = None
                self.say("(tools removed)")
            else:
                try:
                    self.s.tools = load_tools(arg)
                except ValueError as e:
                    self.say(f"error: {e}")
                else:
                    self.say(f"(tools: {', '.join(t['function']['name'] for t in self.s.tools)})")
        elif cmd == "/image":
            if not arg:
                self.say(f"(images for the next message: {', '.join(self.s.images) or 'none'})")
            elif arg in ("off", "none"):
                self.s.images = []
                self.say("(images removed)")
            else:
                try:
                    self.s.attach(arg)
                except ValueError as e:
                    self.say(f"error: {e}")
                else:
                    self.say(f"(image attached to your next message: {self.s.images[-1]})")
        elif cmd == "/help":
            self.say(HELP)
        else:
            self.say(f"unknown command {cmd!r}; /help lists them")
        return True

    def respond(self) -> None:
        """Stream one reply; Ctrl-C stops it. Tool calls get their results (run, or asked for), then the model
        continues."""
        for _ in range(self.max_tool_rounds + 1):
            self.say("glm> ", end="")
            calls, gen = [], self.s.reply()
            try:
                with _ctrl_c_as_flag() as stop:
                    for ev in gen:
                        if stop.is_set():  # Ctrl-C: checked between tokens, never inside an engine step
                            raise KeyboardInterrupt
                        self._show(ev)
                        if ev["type"] == "done":
                            calls = ev["result"].tool_calls
            except KeyboardInterrupt:
                gen.close()  # aborts the request in the engine
                self.say(" [stopped]")
                return
            except ValueError as e:  # ChatError, or the engine refusing the prompt (too long)
                self.say(f"\nerror: {e}")
                if self.s.messages and self.s.messages[-1]["role"] == "user":
                    self.s.messages.pop()
                return
            self.say()
            if not calls:
                return
            for c in calls:
                self.say(f"  -> {c['function']['name']}({_pretty_args(c['function']['arguments'])})")
                result = self._tool_result(c)
                if result is None:
                    return
                self.s.messages.append({"role": "tool", "tool_call_id": c["id"], "content": result})
        self.say(f"(stopped after {self.max_tool_rounds} rounds of tool calls)")

    def _tool_result(self, call: dict) -> str | None:
        """The call's result: run by the hook, or typed by the user (None: skip, the turn ends)."""
        if self.run_tool is not None:
            try:
                with _ctrl_c_as_flag():  # a running tool finishes (it has its own timeout)
                    result = self.run_tool(call)
            except Exception as e:  # noqa: BLE001 - a failing hook is the tool's error, not the chat's end
                result = f"Error: {type(e).__name__}: {e}"
            shown = result if len(result) <= 400 else result[:400] + f"... [{len(result) - 400} more characters]"
            self.say("  <- " + shown.replace("\n", "\n     "))
            return result
        try:
            result = self.read(f"  result of {call['function']['name']}> ")
        except (EOFError, KeyboardInterrupt):
            self.say()
            return None
        return result if result.strip() else None

    def _show(self, ev: dict) -> None:
        if ev["type"] == "content":
            self.say(ev["text"], end="")
        elif ev["type"] == "reasoning":
            self.say(f"\x1b[2m{ev['text']}\x1b[0m", end="")  # thinking, dimmed
        elif ev["type"] == "done" and ev["result"].finish_reason == "length":
            self.say(" [cut: max tokens]", end="")

    def run(self) -> int:
        self.say("glm4 chat: /help for commands, Ctrl-D to quit")
        while True:
            try:
                text = self.read_message()
            except KeyboardInterrupt:
                self.say("\n(input cleared; Ctrl-D or /exit quits)")
                continue
            if text is None:
                self.say()
                return 0
            if not text.strip():
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return 0
                continue
            self.s.messages.append(self.s.user_message(text))
            self.respond()


@contextlib.contextmanager
def _ctrl_c_as_flag():
    """While generating, SIGINT sets a flag instead of raising inside the engine (main thread only)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    old = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, old)


def _pretty_args(args: str) -> str:
    try:
        return json.dumps(json.loads(args), ensure_ascii=False)
    except ValueError:
        return args


def build_parser(prog: str = "glm4 chat") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Terminal chat with a GLM-4 checkpoint",
                                 epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="checkpoint folder (default: the shipped model; with --image, the shipped vision model)")
    ap.add_argument("--lora", action="append", metavar="NAME=PATH",
                    help="chat with this PEFT LoRA adapter on the base --model (one); --model ADAPTER_DIR also works")
    ap.add_argument("--system", default=None, help="system prompt")
    ap.add_argument("--tools", default=None, help="JSON file with an OpenAI tools list")
    ap.add_argument("--image", action="append", default=[], metavar="PATH",
                    help="a picture for the first message (vision checkpoints; repeatable)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="sampling temperature (default 0.8; 0, greedy, for the shipped vision model)")
    ap.add_argument("--top-p", type=float, default=0.8)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help=DTYPE_HELP)
    ap.add_argument("--quantization", default=None, choices=["int8", "int6", "int4"], help="weight-only quantization at load")
    ap.add_argument("--quant-gemm", default="auto", choices=["auto", "float32", "bfloat16", "int8"],
                    help="prefill GEMM of quantized weights: auto = bf16 for int4 / int6 on CPUs with native bf16 "
                         "(~1.5x), else int8 (int8 activations, llama.cpp's precision: ~2x); float32 = exact to the "
                         "stored weights")
    ap.add_argument("--activations", default=None, choices=["auto", "exact", "int16", "int8"],
                    help="activations of the integer CPU kernels: auto (the default: int8 for AVX2's kernels of up to "
                         "5-bit codes and AVX-512's q6_K one in such models, int16 for the others), int8 = llama.cpp's "
                         "precision for AVX2's 4- / 6-bit and K-quant kernels and AVX-512's q6_K (faster decode), "
                         "int16, exact = fp32's result")
    ap.add_argument("--kv-cache-dtype", default=None, choices=["auto", "int8", "bfloat16", "float16", "float32"],
                    help="KV cache storage: auto = the model's dtype; int8 = per-token-per-head int8 + fp32 scales "
                         "(about half the bytes of bf16, a quarter of fp32)")
    return ap


def build_session(args: argparse.Namespace, tools: list[dict] | None = None) -> ChatSession:
    """The model and session the arguments describe; ValueError/OSError/TypeError/CheckpointError for bad ones."""
    from glm4.engine.llm import LLM
    from glm4.engine.lora import model_and_adapters
    from glm4.engine.sampling_params import SamplingParams

    model, lora = model_and_adapters(args.model, args.lora)
    from glm4.assets import VISION_MODEL

    # pictures and no --model: the shipped model that sees (when this install has it)
    vision_default = model is None and bool(args.image) and not lora and (VISION_MODEL / "config.json").is_file()
    if vision_default:
        model = str(VISION_MODEL)
    temperature = args.temperature if args.temperature is not None else 0.0 if vision_default else 0.8
    if len(lora) > 1:
        raise ValueError("glm4 chat talks to one LoRA adapter; serve several with glm4 serve --lora ...")
    engine_args = {k: v for k, v in (("max_model_len", args.max_model_len), ("device", args.device),
                                     ("dtype", args.dtype), ("kv_cache_dtype", args.kv_cache_dtype),
                                     ("quantization", args.quantization), ("quant_gemm", args.quant_gemm),
                                     ("activations", args.activations), ("lora", lora or None)) if v is not None}
    llm = LLM(model, **engine_args)
    from glm4.engine.chat import chat_layer_for

    chat_layer_for(llm)  # fails now, not at the first message, for a checkpoint without a tokenizer
    params = SamplingParams(temperature=temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            lora=next(iter(lora), None))
    session = ChatSession(llm, args.system, tools, params)
    for path in args.image:
        try:
            session.attach(path)
        except ValueError as e:
            raise ValueError(f"--image: {e}") from None
    return session


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from glm4.weights import CheckpointError

    try:
        tools = load_tools(args.tools) if args.tools else None
        session = build_session(args, tools)
    except (OSError, ValueError, TypeError, CheckpointError) as e:
        print(f"glm4 chat: {e}", file=sys.stderr)
        return 2
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    return Repl(session, input, sys.stdout).run()


if __name__ == "__main__":
    raise SystemExit(main())
