"""Helpers from webui modules/utils.py @1dcde41d that chat code and extensions call."""
from pathlib import Path

from modules import shared
from modules.logging_colors import logger

JINJA_EXTENSIONS = ('.jinja', '.jinja2')
YAML_EXTENSIONS = ('.yaml', '.yml')
TEMPLATE_EXTENSIONS = JINJA_EXTENSIONS + YAML_EXTENSIONS  # utils.py:251-252


def gradio(*keys):
    # utils.py:11-15: component lists for Gradio event wiring, e.g. gradio('interface_state').
    if len(keys) == 1 and type(keys[0]) in [list, tuple]:
        keys = keys[0]

    return [shared.gradio[k] for k in keys]


def check_model_loaded():
    # utils.py:88-98
    if shared.model_name == 'None' or shared.model is None:
        message = 'No model is loaded. Please select one in the Model tab.'
        logger.error(message)
        return False, message

    return True, None


def resolve_model_path(model_name_or_path):
    # utils.py:101-116: an existing path wins over '<model_dir>/<name>'.
    candidate = Path(model_name_or_path)
    if candidate.exists():
        return candidate

    return Path(shared.args.model_dir) / model_name_or_path


def get_available_extensions():
    # utils.py:264-276: user_data extensions first, then ./extensions ones they do not shadow.
    user_names = sorted({p.parent.name for p in (shared.user_data_dir / 'extensions').glob('*/script.py')})
    system_names = sorted({p.parent.name for p in Path('extensions').glob('*/script.py')} - set(user_names))
    return user_names + system_names
