"""Serving a trained controller: :class:`Controller` (Python), ``serve.py`` (a requests file with an SLO
report, or an HTTP endpoint: :mod:`serving.http`).

>>> from serving import Controller
>>> controller = Controller.from_run("runs/MultiKnob-v0/grpo/<timestamp>")
>>> answer = controller(image=pixels, question="how many circles?", budget="60ms")
>>> answer.answer, answer.knobs, answer.predicted_ms, answer.measured_ms
"""

from serving.controller import Answer, Controller, ControllerError, Request, parse_request_budget

__all__ = ["Answer", "Controller", "ControllerError", "Request", "parse_request_budget"]
