"""Shared pytest setup: import paths, a pinned torch environment and the tiny LLaVA checkpoints."""

import os
import sys
from pathlib import Path

# Nothing in the suite may reach a model hub; set before transformers is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
EXTENSION_DIR = REPO_ROOT / "extensions" / "llava"

# Project modules import each other as top-level names (`import llava_pipeline`), as webui's script.py
# arranges at run time; test helpers such as `tiny_llava` live next to this file.
for import_dir in (TESTS_DIR, EXTENSION_DIR):
    if str(import_dir) in sys.path:
        sys.path.remove(str(import_dir))
    sys.path.insert(0, str(import_dir))

import pytest  # noqa: E402
import torch  # noqa: E402

import tiny_llava  # noqa: E402

torch.set_default_dtype(torch.float32)
torch.manual_seed(0)
# The suite targets 2-core CI machines; more threads only add contention for these tiny shapes.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> tiny_llava.TinyCheckpoints:
    """One seeded tiny random LLaVA written in every supported on-disk format (see tests/tiny_llava.py)."""
    return tiny_llava.write_tiny_checkpoints(tmp_path_factory.mktemp("tiny_llava"), seed=0)


@pytest.fixture(scope="session")
def tiny_next_checkpoints(tmp_path_factory):
    """Seeded tiny LLaVA-NeXT (llava-hf and original 1.6) and Llava-family variants (tests/tiny_llava_next.py)."""
    import tiny_llava_next

    return tiny_llava_next.write_tiny_next_checkpoints(tmp_path_factory.mktemp("tiny_llava_next"), seed=0)


@pytest.fixture(scope="session")
def tiny_family_checkpoints(tmp_path_factory):
    """Seeded tiny VipLLaVA, Pixtral (llava-hf form) and Mistral 3 checkpoints (tests/tiny_families.py)."""
    import tiny_families

    return tiny_families.write_tiny_family_checkpoints(tmp_path_factory.mktemp("tiny_families"), seed=0)


def _auto_registry():
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING._extra_content, AutoModelForCausalLM._model_mapping._extra_content


# Captured before any test runs: the extension's setup() (also from module-scoped fixtures) registers the
# LLaVA loader in transformers' process-wide auto mappings.
_PRISTINE_REGISTRY = tuple(dict(mapping) for mapping in _auto_registry())


@pytest.fixture(autouse=True)
def restore_transformers_registry():
    """Put transformers' auto mappings back to stock after every test, so tests never depend on order."""
    yield
    for mapping, pristine in zip(_auto_registry(), _PRISTINE_REGISTRY):
        mapping.clear()
        mapping.update(pristine)
