"""The GUI agent: AutoGLM's action grammar (parsed with ast; eval-like payloads refused), the simulated phone,
and a scripted model driving it through tasks (this tests the loop and the device, not a model), with the
confirmation and take-over hooks; then one run over a real vision checkpoint's chat API."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from glm4.agent import ScriptedModel
from glm4.agent.gui import ACTIONS, ActionError, GUIAgent, SimulatedPhone, parse_action, split_reply, to_pixels
from glm4.agent.gui.simulated import VERSION

# ---- the grammar


@pytest.mark.parametrize("text, name, args", [
    ('do(action="Tap", element=[500, 80])', "Tap", {"element": [500, 80]}),
    ('do(action="Tap", element=[0, 1000], message="pay 30")', "Tap", {"element": [0, 1000], "message": "pay 30"}),
    ('do(action="Type", text="line one\nline \\"two\\"")', "Type", {"text": 'line one\nline "two"'}),
    ('do(action="Swipe", start=[500, 800], end=[500, 200])', "Swipe", {"start": [500, 800], "end": [500, 200]}),
    ('do(action="Long Press", element=[1, 2])', "Long Press", {"element": [1, 2]}),
    ('do(action="Double Tap", element=[3, 4])', "Double Tap", {"element": [3, 4]}),
    ('do(action="Launch", app="Settings")', "Launch", {"app": "Settings"}),
    ('do(action="Back")', "Back", {}),
    ('do(action="Home")', "Home", {}),
    ('do(action="Wait", duration="2 seconds")', "Wait", {"duration": 2.0}),
    ('do(action="Take_over", message="log in")', "Take_over", {"message": "log in"}),
    ('do(action="Note", message="price 30")', "Note", {"message": "price 30"}),
    ("finish(message='done, 北京')", "finish", {"message": "done, 北京"}),
])
def test_actions_parse(text, name, args):
    action = parse_action(text)
    assert (action.name, action.args) == (name, args)
    assert parse_action(str(action)).args == action.args  # the printed form parses back


def test_every_action_of_the_space_is_known():
    assert {"Launch", "Tap", "Type", "Type_Name", "Swipe", "Back", "Home", "Double Tap", "Long Press", "Wait",
            "Take_over", "Note", "Call_API", "Interact"} == set(ACTIONS)


def test_split_reply():
    assert split_reply('<think>the toggle is on</think>\n<answer>do(action="Back")</answer>') == (
        "the toggle is on", 'do(action="Back")')
    assert split_reply("I will go back.\ndo(action=\"Back\")") == ("I will go back.", 'do(action="Back")')
    assert split_reply("<think>x</think><answer>finish(message=\"ok\")") == ("x", 'finish(message="ok")')
    assert split_reply("no action at all") == ("no action at all", "")


ATTACKS = {
    "import in a value": "do(action=__import__('os').system('touch {canary}'))",
    "call in a message": "finish(message=open('/etc/passwd').read())",
    "eval": "eval(\"__import__('os').system('touch {canary}')\")",
    "exec": "exec('import os')",
    "bare import": "__import__('os').system('touch {canary}')",
    "two statements": 'do(action="Back"); __import__("os").system("touch {canary}")',
    "statement after a newline": 'do(action="Back")\n__import__("os").system("touch {canary}")',
    "attribute call": 'os.do(action="Back")',
    "dunder walk": 'do.__class__.__bases__[0].__subclasses__()',
    "lambda": "(lambda: __import__('os'))()",
    "kwargs splat": 'do(**{"action": "Back"})',
    "positional": 'do("Back")',
    "name as value": "do(action=Back)",
    "f-string": 'do(action=f"{__import__(\'os\').getcwd()}")',
    "comprehension": 'do(action="Tap", element=[x for x in (1, 2)])',
    "arithmetic": 'do(action="Tap", element=[10 ** 100, 5])',
    "walrus": 'do(action=(a := "Back"))',
    "nested call": 'do(action="Launch", app=str(1))',
    "huge nesting": "do(action=" + "[" * 5000 + "]" * 5000 + ")",
    "huge text": 'do(action="Type", text="' + "x" * 10000 + '")',
    "unknown action": 'do(action="Reboot")',
    "unknown field": 'do(action="Back", shell="rm -rf /")',
    "off-screen": 'do(action="Tap", element=[1001, 5])',
    "negative": 'do(action="Tap", element=[-1, 5])',
    "floats": 'do(action="Tap", element=[1.5, 5])',
    "booleans": 'do(action="Tap", element=[True, 5])',
    "three coordinates": 'do(action="Tap", element=[1, 2, 3])',
    "missing field": 'do(action="Launch")',
    "non-string app": 'do(action="Launch", app=["Settings"])',
    "endless wait": 'do(action="Wait", duration=1e9)',
    "finish extra": 'finish(message="ok", code="import os")',
    "bytes": "do(action=b'Back')",
    "empty": "",
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_eval_like_payloads_are_refused(name, tmp_path):
    canary = tmp_path / "pwned"
    with pytest.raises(ActionError):
        parse_action(ATTACKS[name].replace("{canary}", str(canary)))
    assert not canary.exists()


# ---- the simulated phone


def test_the_phone_draws_what_a_tap_hits():
    phone = SimulatedPhone()
    home = phone.screenshot()
    assert home.size == phone.size and phone.current_app() == "Home"
    assert phone.launch("settings") and phone.current_app() == "Settings"
    before = phone.screenshot()
    phone.tap(*to_pixels(phone.locate("Wi-Fi"), phone.size))
    assert phone.state["wifi"] is False and "Wi-Fi: OFF" in phone.texts()
    after = phone.screenshot()
    assert before.tobytes() != after.tobytes() and home.tobytes() != before.tobytes()
    assert "About phone" not in phone.texts()
    phone.swipe(270, 900, 270, 500)  # finger up: the list scrolls down
    assert "About phone" in phone.texts()
    assert not phone.launch("Calculator")


# ---- a scripted model drives the phone


def act(phone, fmt, label=None):
    """A model step that looks at the phone (as a vision model would read the screenshot) and answers."""
    def step(messages, tools, choice):
        where = phone.locate(label) if label else None
        return f"<think>step on {phone.current_app()}</think><answer>{fmt.format(where=where)}</answer>"
    return step


def images_of(request):
    return [p for m in request["messages"] if isinstance(m["content"], list) for p in m["content"]
            if p.get("type") == "image_url"]


def test_turn_wifi_off_and_only_the_newest_screenshot_is_sent():
    phone = SimulatedPhone()
    shots = []
    model = ScriptedModel([
        act(phone, 'do(action="Launch", app="Settings")'),
        act(phone, 'do(action="Tap", element={where})', "Wi-Fi"),
        act(phone, 'finish(message="Wi-Fi is off")'),
    ])
    orig = phone.screenshot
    phone.screenshot = lambda: shots.append(orig()) or shots[-1]
    r = GUIAgent(model, phone).run("Turn Wi-Fi off")
    assert r.answer == "Wi-Fi is off" and phone.state["wifi"] is False
    assert [e.kind for e in r.events if e.kind != "reply"] == ["thought", "call", "observation"] * 2 + ["thought", "call", "answer"]
    for i, req in enumerate(model.requests):
        (img,) = images_of(req)  # one screenshot per request: the newest
        png = base64.b64decode(img["image_url"]["url"].split(",", 1)[1])
        assert Image.open(io.BytesIO(png)).tobytes() == shots[i].tobytes()
    last = model.requests[-1]["messages"]
    assert last[0]["role"] == "system" and "do(action=\"Tap\"" in last[0]["content"]
    assert last[1]["content"].startswith("Turn Wi-Fi off\n\n** Screen Info **\n{\"current_app\": \"Home\"}")
    assert isinstance(last[1]["content"], str)  # the older turn kept its text, lost its image
    assert "Last action: do(action='Tap', element=" in last[-1]["content"][0]["text"]
    assert '"current_app": "Settings"' in last[-1]["content"][0]["text"]


def test_write_a_note_with_typing_and_delete_one_with_a_long_press():
    phone = SimulatedPhone()
    model = ScriptedModel([
        act(phone, 'do(action="Launch", app="Notes")'),
        act(phone, 'do(action="Tap", element={where})', "New note"),
        act(phone, 'do(action="Tap", element={where})', "Title"),
        act(phone, 'do(action="Type", text="milk")'),
        act(phone, 'do(action="Tap", element={where})', "Save"),
        act(phone, 'do(action="Long Press", element={where})', "Groceries"),
        act(phone, 'finish(message="saved milk, deleted Groceries")'),
    ])
    r = GUIAgent(model, phone).run("Add a note 'milk' and delete 'Groceries'")
    assert r.answer.startswith("saved milk") and phone.state["notes"] == ["milk"]


def test_swipe_to_find_the_version():
    phone = SimulatedPhone()
    model = ScriptedModel([
        act(phone, 'do(action="Launch", app="Settings")'),
        act(phone, 'do(action="Swipe", start=[500, 850], end=[500, 350])'),
        act(phone, 'do(action="Tap", element={where})', "About phone"),
        lambda m, t, c: f'<answer>finish(message="{phone.texts()[0]}")</answer>',
    ])
    r = GUIAgent(model, phone).run("What version is the phone?")
    assert r.answer == VERSION and phone.screen == "about"


def shop_script(phone):
    return [
        act(phone, 'do(action="Launch", app="Shop")'),
        act(phone, 'do(action="Take_over", message="please sign in")'),
        act(phone, 'do(action="Tap", element={where}, message="buy coffee beans for 30")', "Buy"),
        act(phone, 'finish(message="ordered")'),
    ]


def test_take_over_and_confirmation_hooks():
    phone, asked, took = SimulatedPhone(), [], []
    agent = GUIAgent(ScriptedModel(shop_script(phone)), phone, confirm=lambda why: asked.append(why) or True,
                     take_over=lambda why: took.append(why) or phone.sign_in())
    r = agent.run("Buy coffee beans")
    assert r.answer == "ordered" and phone.state["orders"] == ["Coffee beans"]
    assert took == ["please sign in"] and asked == ["buy coffee beans for 30"]


def test_a_declined_confirmation_or_no_take_over_hook_stops_the_run():
    phone = SimulatedPhone()
    r = GUIAgent(ScriptedModel(shop_script(phone)), phone, confirm=lambda why: False, take_over=lambda why: phone.sign_in()).run("Buy")
    assert r.answer is None and phone.state["orders"] == []
    assert r.events[-1].kind == "error" and "declined" in r.events[-1].data["text"]
    phone = SimulatedPhone()
    r = GUIAgent(ScriptedModel(shop_script(phone)), phone).run("Buy")  # no hooks at all
    assert r.events[-1].kind == "error" and "a person must take over" in r.events[-1].data["text"]
    phone = SimulatedPhone()
    phone.sign_in()
    phone.launch("Shop")
    r = GUIAgent(ScriptedModel(shop_script(phone)[2:]), phone).run("Buy")  # a sensitive tap with no confirm hook
    assert "declined" in r.events[-1].data["text"] and phone.state["orders"] == []


def test_bad_actions_are_said_to_the_model_and_too_many_end_the_run():
    phone = SimulatedPhone()
    model = ScriptedModel([
        "<answer>__import__('os').system('id')</answer>",
        'do(action="Launch", app="Calculator")',
        'do(action="Launch", app="Settings")',
        'finish(message="opened settings")',
    ])
    r = GUIAgent(model, phone).run("Open settings")
    assert r.answer == "opened settings"
    second, third = model.requests[1]["messages"][-1], model.requests[2]["messages"][-1]
    assert "not a valid action (the action must be a call of do(...) or finish(...))" in second["content"][0]["text"]
    assert "no app named 'Calculator'" in third["content"][0]["text"]
    r = GUIAgent(ScriptedModel(["nonsense"] * 5), SimulatedPhone(), max_errors=3).run("x")
    assert r.events[-1].kind == "error" and "3 invalid or failed actions in a row" in r.events[-1].data["text"]
    r = GUIAgent(ScriptedModel(['do(action="Home")'] * 3), SimulatedPhone(), max_steps=3).run("x")
    assert r.events[-1].data["text"] == "the task was not finished within 3 steps"


# ---- a real vision checkpoint through glm4's chat API


def test_gui_agent_over_a_vision_checkpoints_chat_api(tmp_path_factory):
    pytest.importorskip("transformers")
    from vision_checkpoint import write_checkpoint

    from glm4.agent import LLMChat
    from glm4.engine.llm import LLM
    from glm4.engine.sampling_params import SamplingParams

    llm = LLM(str(write_checkpoint(tmp_path_factory.mktemp("gui") / "v")), kv_cache_tokens=4096)
    model = LLMChat(llm, params=SamplingParams(max_tokens=12, temperature=0.0))
    r = GUIAgent(model, SimulatedPhone(size=(112, 224)), max_steps=2, max_errors=5).run("Open settings")
    replies = [e for e in r.events if e.kind == "reply"]
    assert len(replies) == 2  # both screenshots went through the vision chat path; random weights, no valid action
    assert not any(e.kind == "error" and "model call failed" in e.data["text"] for e in r.events), r.events


# ---- glm4 agent --gui


@pytest.mark.parametrize("answer, rc", [("y", 0), ("n", 1)])
def test_cli_gui_run_asks_the_user(answer, rc, monkeypatch, capsys):
    from glm4.agent import agent_cli

    prompts = []
    monkeypatch.setattr("builtins.input", lambda p: prompts.append(p) or answer)
    buy = [500, 240]  # the centre of the shop's Buy button on the 540x1080 phone
    model = ScriptedModel(['do(action="Launch", app="Shop")', 'do(action="Take_over", message="sign in")',
                           f'do(action="Tap", element={buy}, message="pay 30")', 'finish(message="ordered")'])
    args = agent_cli.build_parser().parse_args(["Buy coffee", "--gui", "--plain", "--max-rounds", "6"])
    assert agent_cli.run_gui(args, model) == rc
    out = capsys.readouterr().out
    if answer == "y":
        assert prompts == ["take over (sign in): sign in on the simulated phone? [y/N] ", "confirm: pay 30? [y/N] "]
        assert "answer: ordered" in out
    else:  # not signed in: no Buy button, the tap hits nothing; the sensitive tap is declined and the run stops
        assert "the user declined the sensitive action: pay 30" in out
