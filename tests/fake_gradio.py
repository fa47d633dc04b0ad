"""A recording stand-in for the part of Gradio the extension's panel uses, to check its wiring without a browser.

Components keep a value and record their event listeners (handler, inputs, outputs); :func:`fire` runs one
event as Gradio does: each listener's handler gets its inputs' current values and its outputs take what it
returns. As in webui's Gradio build (seen in Chromium), a value set by a handler fires no change event: a test
fires the events the browser would. The real wiring is exercised in tests/integration/test_browser.py.
"""

from __future__ import annotations

import types
from collections import defaultdict


class Component:
    """A Gradio component or State: ``value``, ``elem_id`` and the listeners of each event."""

    def __init__(self, *args, value=None, elem_id: str | None = None, **kwargs):
        # Gradio calls a callable value when the page loads.
        self.value = value() if callable(value) else value
        self.elem_id = elem_id
        self.listeners: dict[str, list[tuple]] = defaultdict(list)
        created.append(self)

    def _listen(event: str):
        def add(self, fn, inputs=None, outputs=None, **kwargs):
            self.listeners[event].append((fn, _as_list(inputs), _as_list(outputs)))

        return add

    click = _listen("click")
    change = _listen("change")
    upload = _listen("upload")
    select = _listen("select")
    submit = _listen("submit")


class _Layout:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


created: list[Component] = []


def _as_list(components):
    if components is None:
        return []
    return list(components) if isinstance(components, (list, tuple)) else [components]


def module() -> types.ModuleType:
    """A fresh ``gradio`` module (put it in ``sys.modules``); :data:`created` starts empty."""
    created.clear()
    gradio = types.ModuleType("gradio")
    for name in ("Markdown", "UploadButton", "Checkbox", "Button", "State", "Radio", "MultimodalTextbox", "File"):
        setattr(gradio, name, type(name, (Component,), {}))
    for name in ("Accordion", "Row", "Column", "Blocks", "Tab"):
        setattr(gradio, name, type(name, (_Layout,), {}))
    return gradio


def by_id(elem_id: str) -> Component:
    (component,) = [c for c in created if c.elem_id == elem_id]
    return component


def fire(component: Component, event: str) -> None:
    """Run every listener of ``component``'s ``event`` in the order they were added."""
    for fn, inputs, outputs in component.listeners[event]:
        if fn is None:
            continue
        result = fn(*[source.value for source in inputs])
        if len(outputs) == 1:
            result = (result,)
        for target, value in zip(outputs, result or ()):
            target.value = value
