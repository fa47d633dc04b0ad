"""``load_model_HF`` / ``load_tokenizer`` as in webui modules/transformers_loader.py @1dcde41d.

The ``from_pretrained`` keyword arguments are the real ones (key ``torch_dtype``, not ``dtype``),
so a class registered with ``AutoModelForCausalLM.register`` can be tested through the same call.
"""
from pathlib import Path

from modules import shared
from modules.logging_colors import logger


class LogprobProcessor:
    """transformers_loader.py:64-82: records the top ``logprobs`` candidates of every generated position.

    A logits processor of the request (``state['logits_processor']``), so it runs before the ones
    extensions append in ``logits_processor_modifier``. Each candidate id is turned into text with
    ``get_reply_from_output_ids([id])``, which raises for an id the tokenizer has no token for; inside
    ``generate`` that ends the reply ("Failed in generation callback" when streaming).
    """

    def __init__(self, logprobs=None):
        self.logprobs = logprobs
        self.token_alternatives = {}
        self.token_alternatives_history = []

    def __call__(self, input_ids, logits):
        import torch.nn.functional as F

        from modules.text_generation import get_reply_from_output_ids

        if self.logprobs is not None:
            log_probabilities = F.log_softmax(logits, dim=1)
            top_values, top_indices = log_probabilities.topk(self.logprobs)
            top_tokens = [get_reply_from_output_ids([token]) for token in top_indices[0]]
            self.token_alternatives = dict(zip(top_tokens, (float(value) for value in top_values[0])))
            self.token_alternatives_history.append(self.token_alternatives)

        return logits


def load_tokenizer(model_name, tokenizer_dir=None):
    from transformers import AutoTokenizer

    path = Path(tokenizer_dir) if tokenizer_dir else Path(shared.args.model_dir) / model_name
    if not path.exists():
        return None

    return AutoTokenizer.from_pretrained(
        path,
        trust_remote_code=shared.original_args.trust_remote_code,
        use_fast=not shared.args.no_use_fast,
    )


def load_model_HF(model_name):
    import torch
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        BitsAndBytesConfig
    )

    # webui also sets torch._dynamo.config.disable = True here (:106), for the whole process, so
    # torch.compile is a no-op under webui; not copied, to keep the test process unchanged.

    path = Path(shared.args.model_dir) / model_name
    params = {
        'low_cpu_mem_usage': True,
        'attn_implementation': shared.args.attn_implementation,
    }
    if shared.original_args.trust_remote_code:
        params['trust_remote_code'] = True
    if shared.args.force_safetensors:
        params['force_safetensors'] = True

    # :120, before any model class is chosen: an unknown model_type fails here.
    config = AutoConfig.from_pretrained(path, trust_remote_code=shared.original_args.trust_remote_code)

    # :122-131: --bf16, else the config's dtype if half precision, else float16; never float32 here.
    if shared.args.bf16:
        params['torch_dtype'] = torch.bfloat16
    else:
        dtype = getattr(config, 'torch_dtype', None) or getattr(getattr(config, 'text_config', None), 'torch_dtype', None)
        params['torch_dtype'] = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16

    # :133-140
    if 'chatglm' in model_name.lower():
        loader_class = AutoModel
    elif config.to_dict().get('is_encoder_decoder', False):
        loader_class = AutoModelForSeq2SeqLM
        shared.is_seq2seq = True
    else:
        loader_class = AutoModelForCausalLM

    default_loading = not any([shared.args.cpu, shared.args.load_in_8bit, shared.args.load_in_4bit,
                               shared.args.disk, shared.args.cpu_memory is not None])
    # Note: cpu_memory defaults to 0, not None (shared.py:118), so ``default_loading`` is always
    # False in webui too and the branch below is the one that runs (:143-149, :166-214).
    if default_loading:
        params['device_map'] = 'auto'
        logger.info(f'TRANSFORMERS_PARAMS={params}')
        model = loader_class.from_pretrained(path, **params)
        device = getattr(model, 'device', None)
        if device is not None and not getattr(model, 'is_loaded_in_4bit', False):
            model = model.to(device)
        return model

    if not shared.args.cpu and not torch.cuda.is_available():
        logger.warning('No GPU has been detected. Falling back to CPU mode.')
        shared.args.cpu = True  # :167-169

    if shared.args.cpu:
        params['torch_dtype'] = torch.float32  # :171-172: no device_map
    else:
        params['device_map'] = 'auto'
        max_memory = get_max_memory_dict()
        if max_memory:
            params['max_memory'] = max_memory
        if shared.args.load_in_4bit:
            compute_dtype = getattr(torch, shared.args.compute_dtype) if shared.args.compute_dtype in ('bfloat16', 'float16', 'float32') else None
            params['quantization_config'] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_compute_dtype=compute_dtype,
                bnb_4bit_quant_type=shared.args.quant_type,
                bnb_4bit_use_double_quant=shared.args.use_double_quant,
                llm_int8_enable_fp32_cpu_offload=True,
            )
        elif shared.args.load_in_8bit:
            # :190-206 also builds an explicit device_map via init_empty_weights when max_memory is set.
            if shared.args.gpu_split:
                params['quantization_config'] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True)
            else:
                params['quantization_config'] = BitsAndBytesConfig(load_in_8bit=True)
        if shared.args.disk:
            params['offload_folder'] = str(Path(shared.args.disk_cache_dir))

    logger.info(f'TRANSFORMERS_PARAMS={params}')
    return loader_class.from_pretrained(path, **params)


def get_max_memory_dict():
    max_memory = {}
    if shared.args.cpu_memory > 0:
        max_memory['cpu'] = f'{shared.args.cpu_memory}GiB'
    if shared.args.gpu_split:
        for i, memory in enumerate(shared.args.gpu_split.split(',')):
            max_memory[i] = f'{memory}GiB'

    return max_memory or None
