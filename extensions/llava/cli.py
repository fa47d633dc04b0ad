"""Ask a LLaVA checkpoint about images from the command line, without webui.

    python extensions/llava/cli.py --model PATH_OR_HUB_ID --image photo.jpg --prompt "What is in this picture?"

stdout gets only the reply; logs and errors go to stderr. Any bad input ends with one line on stderr
naming the culprit and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

logger = logging.getLogger("llava.cli")

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
URL_TIMEOUT_S = 30
MAX_URL_BYTES = 64 * 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="LLaVA checkpoint folder or hub id (default: %(default)s)")
    parser.add_argument("--image", action="append", default=[], help="image file or http(s) URL; repeat for several")
    parser.add_argument("--prompt", required=True, help="the question (or, with --raw, the whole prompt)")
    parser.add_argument(
        "--raw", action="store_true",
        help="use the prompt verbatim (BOS added as the tokenizer does); each <image> in it marks the next image "
             "(the checkpoint's own image token, such as Pixtral's [IMG], works too)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--device", default=None, help="language model device: cpu, cuda:0, auto (default: cuda:0 if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="language model dtype (auto: float16 on CUDA, float32 on the CPU)")
    parser.add_argument("--clip-bits", default="32", choices=["32", "16", "bf16"])
    parser.add_argument("--clip-device", default=None)
    parser.add_argument("--projector-bits", default="32", choices=["32", "16", "bf16"])
    parser.add_argument("--projector-device", default=None)
    parser.add_argument("--vision-tower", default=None, help="override the checkpoint's mm_vision_tower")
    parser.add_argument("--load-in-4bit", action="store_true", help="4-bit language model (bitsandbytes)")
    parser.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        reply = run(args)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line, never a traceback
        logger.debug("failure", exc_info=True)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        sys.stderr.write(f"error: {message}\n")
        return 2
    sys.stdout.write(reply + "\n")
    return 0


def run(args) -> str:
    import torch

    import llava_checkpoint
    from llava_pipeline import LlavaPipeline, VisionSettings
    from llava_prompt import TEMPLATES, place_images, render_conversation, split_on_marker

    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    model_dir = resolve_model(args.model)
    spec = llava_checkpoint.read_llava_spec(model_dir)
    if spec is None:
        raise ValueError(f"{args.model} is not a LLaVA checkpoint (its config.json has no LLaVA fields)")

    marker = spec.image_token_text or "<image>"
    markers = spec.image_markers  # <image>, and the checkpoint's own image token ([IMG])
    if args.raw:
        # Check the marker count now: a mismatch must not wait for the model to load.
        split_on_marker(args.prompt, len(args.image), markers)

    settings = VisionSettings(
        clip_bits=args.clip_bits, clip_device=args.clip_device, projector_bits=args.projector_bits,
        projector_device=args.projector_device, vision_tower=args.vision_tower,
    )
    # Decode images before loading anything heavy: a bad file fails fast.
    import llava_image_io

    images = [
        llava_image_io.load_image(read_image_source(src), name=f"image {i + 1} ({src})", max_pixels=settings.max_pixels)
        for i, src in enumerate(args.image)
    ]

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = llava_checkpoint.load_language_model(model_dir, **language_model_kwargs(args, torch))
    pipeline = LlavaPipeline.load(model_dir, settings, lm_hidden_size=model.config.hidden_size)
    logger.info("Vision: %s", pipeline.describe())

    if args.raw:
        prompt_text = args.prompt
    elif spec.format == "hf":
        prompt_text = render_hf_chat(model_dir, tokenizer, args.prompt, len(images), marker)
    else:
        template = TEMPLATES[spec.template]
        question = place_images(args.prompt, [marker] * len(images), spec.default_placement, marker)
        prompt_text = render_conversation(template, [(template.roles[0], question), (template.roles[1], None)])
    # BOS as the checkpoint's reference tokenizes this prompt (webui's path uses the same rule).
    prompt_text, add_bos = pipeline.reference_prompt(prompt_text, tokenizer)
    parts = split_on_marker(prompt_text, len(images), markers)
    prepared = pipeline.prepare(parts, images, tokenizer, model.get_input_embeddings(), add_bos=add_bos)

    if args.seed is not None:
        torch.manual_seed(args.seed)
    started = time.perf_counter()
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    output = model.generate(
        input_ids=prepared.input_ids,
        inputs_embeds=prepared.inputs_embeds,
        attention_mask=torch.ones_like(prepared.input_ids),
        max_new_tokens=args.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **sampling,
    )
    new_tokens = output[0, prepared.input_ids.shape[1]:]
    logger.info("Generated %d tokens in %.2f s", len(new_tokens), time.perf_counter() - started)
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def language_model_kwargs(args, torch) -> dict:
    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    if device != "auto":
        device_type = torch.device(device).type
        if device_type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available")
    else:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = torch.float16 if device_type == "cuda" else torch.float32
    kwargs = {"dtype": dtype, "device_map": device}
    if args.load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ValueError("--load-in-4bit needs the bitsandbytes package (pip install bitsandbytes)") from exc
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
    return kwargs


def resolve_model(name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"--model {name}: not a folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name))
    except Exception as exc:  # noqa: BLE001 - hub errors differ by version; one line for the user
        raise ValueError(f"--model {name}: no such folder, and the hub download failed ({type(exc).__name__})") from exc


def read_image_source(source: str):
    """A local path is returned as is; an http(s) URL is fetched (bounded in time and size) to bytes."""
    if not source.lower().startswith(("http://", "https://")):
        if not Path(source).is_file():
            raise ValueError(f"image {source}: no such file")
        return source
    import urllib.request

    try:
        with urllib.request.urlopen(source, timeout=URL_TIMEOUT_S) as response:  # noqa: S310 - CLI user's own URL
            data = response.read(MAX_URL_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"image {source}: download failed ({exc})") from exc
    if len(data) > MAX_URL_BYTES:
        raise ValueError(f"image {source}: larger than {MAX_URL_BYTES // (1024 * 1024)} MB")
    return data


def render_hf_chat(model_dir: Path, tokenizer, question: str, images: int, marker: str) -> str:
    """The checkpoint's own chat template (``chat_template.jinja`` / ``.json`` or the tokenizer's), given the
    message in the content shape it renders (llava_templates.content_shapes): image parts and a text part
    for a template that renders image parts, else the text with ``marker + "\\n"`` per image before it."""
    import llava_templates
    from llava_prompt import place_images

    template = llava_templates.checkpoint_chat_template(model_dir)
    if template is None:
        logger.warning("%s has no chat template; using the llava-1.5 prompt format", model_dir.name)
        return f"USER: {place_images(question, [marker] * images, 'before', marker)} ASSISTANT:"
    shapes = llava_templates.content_shapes(
        template, marker, bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "")
    if shapes is not None and shapes["user"] == "images":
        content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": question}]
    else:
        text = place_images(question, [marker] * images, "before", marker)
        content = text if shapes is not None and shapes["user"] == "string" else [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)


if __name__ == "__main__":
    sys.exit(main())
