"""A simulated phone for the GUI agent: screens drawn with PIL, widgets that react to taps, typing and swipes.

    phone = SimulatedPhone()
    phone.launch("Settings"); phone.tap(*to_pixels(phone.locate("Wi-Fi"), phone.size))
    phone.state["wifi"]                       # False: the toggle flipped
    phone.screenshot()                        # a PIL image of what is on the screen now

Apps: Home (a grid of app icons), Settings (toggle rows; "About phone" below the fold, reached by swiping up;
it shows the version), Notes (a list; "New note" opens an editor with a Title field and Save; a long press
deletes a note), Shop (needs a sign-in a person must do: `sign_in()` is what a take-over callback calls;
then "Buy" on an item places an order). Each screen is a list of widgets built from the state; the same list
draws the screenshot and answers hit tests, so what the model sees is what a tap hits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

APPS = ("Settings", "Notes", "Shop")
SETTINGS_ROWS = ("Wi-Fi", "Bluetooth", "Airplane mode", "Dark mode", "Location", "Battery saver", "Do not disturb",
                 "Auto-rotate", "About phone")
VISIBLE_ROWS = 6
VERSION = "Version 4.0.2"


@dataclass
class Widget:
    kind: str  # button | field | label | toggle
    label: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels
    on_tap: Callable[[], None] | None = None
    on_long_press: Callable[[], None] | None = None

    def hit(self, x: int, y: int) -> bool:
        x0, y0, x1, y1 = self.box
        return x0 <= x <= x1 and y0 <= y <= y1


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # an old Pillow or no FreeType: the bitmap font
        return ImageFont.load_default()


class SimulatedPhone:
    """A Device (see device.py) with a few apps; `log` records every input, `state` the apps' data."""

    def __init__(self, size: tuple[int, int] = (540, 1080)):
        self.size = size
        self.state = {"wifi": True, "bluetooth": False, "dark": False, "notes": ["Groceries"], "signed_in": False,
                      "orders": []}
        self.app = "Home"
        self.screen = "home"
        self.history: list[tuple[str, str]] = []  # (app, screen) to go Back to
        self.scroll = 0
        self.draft = ""
        self.focused: str | None = None
        self.log: list[tuple] = []
        self.waited = 0.0
        self._title, self._small = _font(36), _font(26)

    # ---- the Device interface

    def current_app(self) -> str:
        return self.app

    def screenshot(self) -> Image.Image:
        w, h = self.size
        dark = self.state["dark"]
        img = Image.new("RGB", self.size, (30, 30, 34) if dark else (245, 245, 248))
        d = ImageDraw.Draw(img)
        fg = (235, 235, 235) if dark else (20, 20, 24)
        d.rectangle((0, 0, w, 90), fill=(60, 90, 200))
        d.text((24, 24), self.app if self.screen == self.app.lower() or self.app == "Home" else self.screen.title(),
               fill=(255, 255, 255), font=self._title)
        for wd in self.widgets():
            x0, y0, x1, y1 = wd.box
            if wd.kind == "button":
                d.rounded_rectangle(wd.box, radius=14, fill=(70, 130, 230), outline=(40, 80, 160), width=2)
                d.text((x0 + 20, y0 + (y1 - y0) // 2 - 14), wd.label, fill=(255, 255, 255), font=self._small)
            elif wd.kind == "field":
                d.rectangle(wd.box, fill=(255, 255, 255), outline=(70, 130, 230) if self.focused else (150, 150, 150),
                            width=3)
                shown = self.draft or wd.label
                d.text((x0 + 16, y0 + 18), shown, fill=(20, 20, 24) if self.draft else (150, 150, 150), font=self._small)
            elif wd.kind == "toggle":
                on = wd.label.endswith("ON")
                d.text((x0 + 16, y0 + 24), wd.label.rsplit(":", 1)[0], fill=fg, font=self._small)
                d.rounded_rectangle((x1 - 110, y0 + 20, x1 - 20, y0 + 66), radius=22,
                                    fill=(60, 180, 90) if on else (170, 170, 170))
                knob = x1 - 66 if on else x1 - 110
                d.ellipse((knob, y0 + 20, knob + 46, y0 + 66), fill=(255, 255, 255))
                d.line((x0, y1, x1, y1), fill=(200, 200, 200), width=1)
            else:
                d.text((x0 + 16, y0 + 16), wd.label, fill=fg, font=self._small)
        return img

    def tap(self, x: int, y: int) -> None:
        self.log.append(("tap", x, y))
        for wd in self.widgets():
            if wd.hit(x, y):
                if wd.kind == "field":
                    self.focused = wd.label
                elif wd.on_tap:
                    wd.on_tap()
                return

    def double_tap(self, x: int, y: int) -> None:
        self.tap(x, y)
        self.tap(x, y)

    def long_press(self, x: int, y: int) -> None:
        self.log.append(("long_press", x, y))
        for wd in self.widgets():
            if wd.hit(x, y) and wd.on_long_press:
                wd.on_long_press()
                return

    def swipe(self, x1: int, y1: int, x2: int, y2: int) -> None:
        self.log.append(("swipe", x1, y1, x2, y2))
        if self.screen == "settings":  # a swipe up (finger moves up) scrolls the list down
            rows = round((y1 - y2) / 120)
            self.scroll = max(0, min(len(SETTINGS_ROWS) - VISIBLE_ROWS, self.scroll + rows))

    def type_text(self, text: str) -> None:
        self.log.append(("type", text))
        if self.focused is not None:
            self.draft = text  # AutoGLM's Type clears the field first

    def back(self) -> None:
        self.log.append(("back",))
        if self.history:
            self.app, self.screen = self.history.pop()
            self.focused = None

    def home(self) -> None:
        self.log.append(("home",))
        self.history, self.app, self.screen, self.focused = [], "Home", "home", None

    def launch(self, app: str) -> bool:
        self.log.append(("launch", app))
        match = next((a for a in APPS if a.lower() == app.strip().lower()), None)
        if match is None:
            return False
        self.history, self.app, self.screen, self.scroll, self.focused = [], match, match.lower(), 0, None
        return True

    def wait(self, seconds: float) -> None:
        self.waited += seconds  # simulated time: nothing to wait for

    # ---- what a person does (the take-over hook)

    def sign_in(self) -> None:
        self.state["signed_in"] = True

    # ---- layout

    def _go(self, screen: str) -> Callable[[], None]:
        def go() -> None:
            self.history.append((self.app, self.screen))
            self.screen = screen
            if screen == "editor":
                self.draft, self.focused = "", None
        return go

    def _open(self, app: str) -> Callable[[], None]:
        return lambda: self.launch(app)

    def widgets(self) -> list[Widget]:
        w = self.size[0]
        s = self.state
        if self.screen == "home":
            return [Widget("button", a, (40 + (i % 2) * 250, 160 + (i // 2) * 200, 240 + (i % 2) * 250,
                                         320 + (i // 2) * 200), self._open(a)) for i, a in enumerate(APPS)]
        if self.screen == "settings":
            keys = {"Wi-Fi": "wifi", "Bluetooth": "bluetooth", "Dark mode": "dark"}
            out = []
            for i, row in enumerate(SETTINGS_ROWS[self.scroll:self.scroll + VISIBLE_ROWS]):
                box = (0, 110 + i * 120, w, 110 + (i + 1) * 120)
                if row == "About phone":
                    out.append(Widget("button", row, (20, box[1] + 10, w - 20, box[3] - 10), self._go("about")))
                elif row in keys:
                    key = keys[row]
                    out.append(Widget("toggle", f"{row}: {'ON' if s[key] else 'OFF'}", box,
                                      lambda key=key: s.__setitem__(key, not s[key])))
                else:
                    out.append(Widget("label", row, box))
            return out
        if self.screen == "about":
            return [Widget("label", VERSION, (20, 130, w - 20, 200)), Widget("label", "Model: glm-sim", (20, 210, w - 20, 280))]
        if self.screen == "notes":
            out = [Widget("button", "New note", (20, 120, w - 20, 200), self._go("editor"))]
            for i, title in enumerate(s["notes"]):
                out.append(Widget("label", title, (20, 230 + i * 90, w - 20, 310 + i * 90),
                                  on_long_press=lambda t=title: s["notes"].remove(t)))
            return out
        if self.screen == "editor":
            return [Widget("field", "Title", (20, 130, w - 20, 220)),
                    Widget("button", "Save", (20, 260, w - 20, 340), self._save_note)]
        if self.screen == "shop":
            if not s["signed_in"]:
                return [Widget("label", "Sign in required", (20, 130, w - 20, 200)),
                        Widget("label", "A person must sign in", (20, 210, w - 20, 280))]
            return [Widget("label", "Coffee beans - 30", (20, 130, w - 20, 200)),
                    Widget("button", "Buy", (20, 220, w - 20, 300), self._buy)]
        if self.screen == "ordered":
            return [Widget("label", f"Order placed: {len(s['orders'])}", (20, 130, w - 20, 200))]
        return []

    def _save_note(self) -> None:
        if self.draft:
            self.state["notes"].append(self.draft)
        self.back()

    def _buy(self) -> None:
        self.state["orders"].append("Coffee beans")
        self._go("ordered")()

    # ---- for tests and scripted models: where a labelled widget is, in AutoGLM's 0..1000 coordinates

    def locate(self, label: str) -> list[int]:
        for wd in self.widgets():
            if wd.label == label or wd.label.split(":")[0] == label:
                x0, y0, x1, y1 = wd.box
                return [int((x0 + x1) / 2 / self.size[0] * 1000), int((y0 + y1) / 2 / self.size[1] * 1000)]
        raise KeyError(f"no {label!r} on the {self.screen} screen: {[wd.label for wd in self.widgets()]}")

    def texts(self) -> list[str]:
        return [wd.label for wd in self.widgets()]
