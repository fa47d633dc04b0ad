"""setup() makes webui pick a working LLaVA instruction template for every LLaVA folder (shared.user_config),
without overriding a template the user configured, and fixes the one of a model loaded at startup."""

from __future__ import annotations

import json
import re
import shutil

import pytest

import llava_templates
from tiny_llava import LLAVA_15_HF_CHAT_TEMPLATE
from webui_llava_support import (  # noqa: F401 - fixtures
    image,
    instruct_prompt,
    last_prompt,
    loaded,
    make_harness,
    marked,
)

from modules import shared  # noqa: E402
from modules.models_settings import CUSTOM_TEMPLATE_NAME, get_model_metadata  # noqa: E402

EXPECTED = {
    "hf": llava_templates.adapt_chat_template(LLAVA_15_HF_CHAT_TEMPLATE, "<image>"),
    "hf5": llava_templates.adapt_chat_template(LLAVA_15_HF_CHAT_TEMPLATE, "<image>"),
    "v15": llava_templates.WEBUI_TEMPLATES["llava_v1"],
    "v0": llava_templates.WEBUI_TEMPLATES["llava_v0"],
}


def test_setup_registers_a_template_for_every_llava_folder(make_harness, tiny_checkpoints):
    make_harness("hf")
    registered = {pattern for pattern in shared.user_config}
    for name in ("hf", "hf5", "v0", "v15"):
        assert re.escape(name) + "$" in registered
    # hf_linear is a llava-hf folder without any chat template: nothing to adapt, webui's default applies.
    assert "hf_linear$" not in registered
    assert not any(re.match(pattern, "clip") or re.match(pattern, "clip_full") for pattern in registered)
    for name, template in EXPECTED.items():
        metadata = get_model_metadata(name)
        assert metadata["instruction_template"] == CUSTOM_TEMPLATE_NAME
        assert metadata["instruction_template_str"] == template, name
    # The model loaded at startup gets its template too (the settings are the UI and API default).
    assert shared.settings["instruction_template_str"] == EXPECTED["hf"]


def test_a_folder_name_is_matched_exactly(make_harness, tiny_checkpoints, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("llava-v1.5-7b", "llava-v1.5-7b-extra"):
        shutil.copytree(tiny_checkpoints.v15, models / name)
    (models / "llava-v1x5-7b").mkdir()
    (models / "llava-v1x5-7b" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    harness = make_harness("hf")
    shared.args.model_dir = str(models)
    shared.user_config = {}
    harness.extension._install_instruction_templates()
    assert set(shared.user_config) == {r"llava\-v1\.5\-7b$", r"llava\-v1\.5\-7b\-extra$"}
    assert get_model_metadata("llava-v1.5-7b")["instruction_template_str"] == llava_templates.WEBUI_TEMPLATES["llava_v1"]
    assert get_model_metadata("llava-v1x5-7b")["instruction_template"] != CUSTOM_TEMPLATE_NAME


def test_a_user_configured_template_wins(make_harness):
    harness = make_harness("hf")
    shared.user_config = {"v15$": {"instruction_template": "Vicuna-v1.1"}}
    templates = shared.user_data_dir / "instruction-templates"
    templates.mkdir(parents=True, exist_ok=True)
    (templates / "Vicuna-v1.1.jinja").write_text("MINE {{ messages }}")
    harness.extension._install_instruction_templates()
    assert shared.user_config["v15$"] == {"instruction_template": "Vicuna-v1.1"}
    assert r"v15$" in shared.user_config and r"hf$" in shared.user_config
    assert get_model_metadata("v15")["instruction_template_str"] == "MINE {{ messages }}"


@pytest.mark.parametrize("fmt", ["hf", "v15", "v0"])
def test_webui_renders_the_registered_template_into_the_prompt(fmt, make_harness, loaded):
    harness = make_harness(fmt)
    assert shared.settings["instruction_template_str"] == EXPECTED[fmt]
    harness.send("Hello there.", [image(56, 56)])
    placed = "<image>\nHello there." if fmt != "v0" else "Hello there.\n<image>"
    assert marked(last_prompt(harness)) == instruct_prompt(fmt, [(placed, None)])
    # webui derives its stop strings from the template: a reply ends where the next turn would begin.
    from modules.chat import get_stopping_strings

    expected_stops = {"hf": {" USER:", " ASSISTANT:"}, "v15": {" ASSISTANT:", "</s>"},
                      "v0": {"###Human:", "###Assistant:"}}[fmt]
    assert set(get_stopping_strings(harness.ui_state())) == expected_stops
