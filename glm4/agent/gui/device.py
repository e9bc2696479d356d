"""The device a GUI agent drives: screenshots in, touches and keys out, in the device's own pixels.

A real phone implements this over ADB / HDC / XCTest; glm4.agent.gui.simulated.SimulatedPhone draws its
screens with PIL so the agent can be tested with no phone. The agent converts AutoGLM's relative 0..1000
coordinates to pixels with `to_pixels` before calling the device.
"""

from __future__ import annotations

from typing import Protocol

from PIL import Image


class Device(Protocol):
    size: tuple[int, int]  # (width, height) in pixels

    def screenshot(self) -> Image.Image: ...
    def current_app(self) -> str: ...
    def tap(self, x: int, y: int) -> None: ...
    def double_tap(self, x: int, y: int) -> None: ...
    def long_press(self, x: int, y: int) -> None: ...
    def swipe(self, x1: int, y1: int, x2: int, y2: int) -> None: ...
    def type_text(self, text: str) -> None: ...
    def back(self) -> None: ...
    def home(self) -> None: ...
    def launch(self, app: str) -> bool: ...  # False: no such app
    def wait(self, seconds: float) -> None: ...


def to_pixels(point: list[int], size: tuple[int, int]) -> tuple[int, int]:
    """Relative [x, y] (0..1000 each) -> pixel (x, y) on a screen of `size` (as AutoGLM converts them)."""
    w, h = size
    return min(w - 1, int(point[0] / 1000 * w)), min(h - 1, int(point[1] / 1000 * h))
