"""The GUI agent: AutoGLM's action space on a device, and a simulated phone to test it without one.

    from glm4.agent.gui import GUIAgent, SimulatedPhone, parse_action
    agent = GUIAgent(model, SimulatedPhone(), confirm=lambda why: input(f"{why}? [y/N] ") == "y")
    agent.run("Turn Wi-Fi off").answer

Layout: actions (the do()/finish() grammar, parsed with ast), device (the Device protocol, 0..1000 ->
pixels), simulated (SimulatedPhone, screens drawn with PIL), agent (GUIAgent: the screenshot loop).
"""

from .actions import ACTIONS, Action, ActionError, parse_action, split_reply
from .agent import GUIAgent, png_data_url
from .device import Device, to_pixels
from .simulated import SimulatedPhone

__all__ = ["ACTIONS", "Action", "ActionError", "Device", "GUIAgent", "SimulatedPhone", "parse_action", "png_data_url",
           "split_reply", "to_pixels"]
