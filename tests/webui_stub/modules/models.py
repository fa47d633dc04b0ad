"""Model load/unload bookkeeping from webui modules/models.py @1dcde41d (Transformers loader only).

No extension hook runs on load or unload: ``unload_model`` just drops ``shared.model`` and
``shared.tokenizer`` and collects garbage (models.py:134-155). With ``--idle-timeout`` the model
is reloaded lazily by ``encode()`` / ``generate_reply`` (models.py:15-19).
"""
import gc
import time

from modules import shared
from modules.logging_colors import logger

last_generation_time = time.time()


def load_model_if_idle_unloaded():
    global last_generation_time
    if shared.args.idle_timeout > 0 and shared.model is None and shared.model_name not in [None, 'None']:
        shared.model, shared.tokenizer = load_model(shared.model_name)
        last_generation_time = time.time()


def load_model(model_name, loader=None):
    from modules.models_settings import get_model_metadata
    from modules.transformers_loader import load_model_HF, load_tokenizer

    shared.is_seq2seq = False
    shared.model_name = model_name
    metadata = get_model_metadata(model_name)
    loader = loader or shared.args.loader or metadata['loader']
    if loader != 'Transformers':
        raise ValueError(f'the webui stand-in only implements the Transformers loader, not {loader!r}')

    shared.args.loader = loader
    if shared.args.ctx_size == 0:
        shared.args.ctx_size = 8192  # models.py:51-52

    model = load_model_HF(model_name)
    tokenizer = load_tokenizer(model_name)

    # models.py:66: model metadata (instruction_template_str, truncation_length, ...) becomes the
    # default for the UI and the API.
    shared.settings.update({k: v for k, v in metadata.items() if k in shared.settings})
    shared.is_multimodal = False  # models.py:73-75: never set for Transformers
    logger.info(f'Loaded "{model_name}"')
    return model, tokenizer


def unload_model(keep_model_name=False):
    if shared.model is None:
        return

    shared.model = shared.tokenizer = None
    shared.lora_names = []
    gc.collect()  # clear_torch_cache (torch_utils.py:25-36) also empties the CUDA cache
    if not keep_model_name:
        shared.model_name = 'None'
