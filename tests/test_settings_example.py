"""extensions/llava/settings.example.json: loads the way webui reads settings and covers every setting."""

import ast
from pathlib import Path

import yaml

EXTENSION_DIR = Path(__file__).resolve().parent.parent / "extensions" / "llava"


def _script_params() -> dict:
    """The extension's ``params`` literal, read without importing script.py (it needs webui's modules)."""
    tree = ast.parse((EXTENSION_DIR / "script.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "params" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("script.py has no params literal")


def test_settings_example_loads_with_yaml_safe_load_and_names_every_setting():
    settings = yaml.safe_load((EXTENSION_DIR / "settings.example.json").read_text(encoding="utf-8"))
    params = _script_params()
    expected = {f"llava-{name}" for name in params if name not in ("display_name", "is_tab")}
    assert expected == {key for key in settings if key.startswith("llava-")}
    assert "llava" in settings["default_extensions"]
    for name in params:
        key = f"llava-{name}"
        if key in settings:
            # Same type as the default, so webui (which does not coerce YAML values) passes it through.
            assert isinstance(settings[key], type(params[name])), key
