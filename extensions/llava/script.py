"""text-generation-webui hooks: LLaVA image chat for the Transformers loader.

webui loads the language model (only the LLaMA/Mistral part of a LLaVA checkpoint, registered in
``setup()``); this extension loads the vision tower and projector on their own devices, encodes the
images of a request and splices their embeddings into the prompt in ``tokenizer_modifier``, the one
hook whose ``inputs_embeds`` reach ``model.generate``.

Request flow (details in README.md):
* ``custom_generate_chat_prompt`` collects the images of the chat (UI attachments or OpenAI API
  messages), writes each one into its message as an unforgeable slot (``llava_chat``) and lets webui
  build and truncate the prompt, with ``custom_tokenized_length`` counting image positions exactly.
* ``tokenizer_modifier`` turns the slots into embeddings (cached by image content) and returns
  ``input_ids`` as long as ``inputs_embeds``. Paths that bypass the chat-prompt hook (impersonate,
  /v1/completions) are handled there from webui's own ``<__media__>`` markers or the request's messages.
* Problems (bad image, images out of context, a non-LLaVA model) are logged and shown above the reply.
  API requests with an image that cannot be used fail with HTTP 400 (``llava_api`` checks them before
  webui answers, and turns an error inside a started stream into an error event).

Per-request data lives in ``state`` (deep-copyable strings only); module globals hold only the loaded
vision modules, caches and settings, shared by all users like ``shared.model`` is.
"""

from __future__ import annotations

import html
import re
import sys
import threading
import time
import weakref
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    # Sibling modules are imported as top-level names, so that both install locations work
    # (`extensions/llava` as a package, `user_data/extensions/llava/script.py` by file path).
    sys.path.insert(0, str(_HERE))

from modules import shared  # noqa: E402
from modules.logging_colors import logger  # noqa: E402

import llava_api  # noqa: E402
import llava_chat  # noqa: E402
import llava_image_io  # noqa: E402
from llava_cache import BoundedLRU  # noqa: E402
from llava_chat import MEDIA_MARKER  # noqa: E402

params = {
    "display_name": "LLaVA",
    "is_tab": False,
    # Vision tower (CLIP) and projector: bits 32 | 16 | bf16, device e.g. "cuda:0" or "cpu" ("" = auto).
    "clip_bits": 32,
    "clip_device": "",
    "projector_bits": 32,
    "projector_device": "",
    # Default of the "Embed all images, not only the last one" checkbox.
    "add_all_images_to_prompt": False,
    # Folder or hub id replacing the checkpoint's mm_vision_tower ("" = as the checkpoint says).
    "vision_tower": "",
    # Where an image goes when its message has no <image>: auto (v0 after the text, v1+ before), before, after.
    "image_placement": "auto",
    # Image embedding cache, MB.
    "cache_mb": 256,
    # Limits per request.
    "max_image_pixels": 50_000_000,
    "max_images_per_request": 16,
    # Rotate photos by their EXIF orientation (the reference implementations do not).
    "exif_transpose": False,
    # Replay the vision tower as a captured CUDA graph when it runs on CUDA (same results, faster).
    "cuda_graphs": True,
}

SETTING_TYPES = {
    "clip_bits": (int, str), "clip_device": (str, type(None)), "projector_bits": (int, str),
    "projector_device": (str, type(None)), "add_all_images_to_prompt": (bool,), "vision_tower": (str, type(None)),
    "image_placement": (str,), "cache_mb": (int, float), "max_image_pixels": (int,),
    "max_images_per_request": (int,), "exif_transpose": (bool,), "cuda_graphs": (bool,),
}

NOTICES = "llava_notices"  # state key: list of messages shown above the reply
IMAGES = "llava_images"  # state key: [[name, data URL, content key], ...] the slots of this request point into


# ---------------------------------------------------------------------------------------------- vision


class _Vision:
    """The vision modules of the loaded model; rebuilt when the model or the vision settings change
    and dropped when webui unloads the model (webui has no unload callback: identity check per hook
    plus a finalizer on the model object)."""

    def __init__(self):
        self._lock = threading.RLock()
        self.pipeline = None
        self.status = "No model loaded."
        self.problem = None  # a message for chats when the loaded model cannot see images
        self._key = None
        self._model_ref = None

    def current(self):
        """The pipeline for ``shared.model``, loading it on first use; None when it cannot see images."""
        model = shared.model
        if model is None:
            self.drop("No model loaded.")
            return None
        key = (shared.model_name, id(model), _settings_key())
        with self._lock:
            if self._model_ref is not None and self._model_ref() is model and key == self._key:
                return self.pipeline
            self.drop("")
            self._key, self._model_ref = key, weakref.ref(model)
            weakref.finalize(model, self.drop, "Model unloaded.")
            self.pipeline = self._load(model)
            return self.pipeline

    def drop(self, status: str) -> None:
        with self._lock:
            if self.pipeline is not None:
                self.pipeline.unload()
                logger.info("llava: vision modules unloaded")
            self.pipeline, self._key, self._model_ref, self.problem = None, None, None, None
            if status:
                self.status = status

    def _load(self, model):
        import llava_checkpoint
        from llava_pipeline import LlavaPipeline

        name = shared.model_name
        model_dir = Path(shared.args.model_dir) / name
        try:
            spec = llava_checkpoint.read_llava_spec(model_dir)
        except Exception as exc:  # noqa: BLE001 - a broken config must not break text chat
            spec, error = None, exc
        else:
            error = None
        if spec is not None and hasattr(model, "register_forward_hook"):
            # Usually done by the loader already; this covers a model loaded before setup() gave it the source.
            llava_checkpoint.mask_ids_past_tokenizer(model, _tokenizer_size)
        if spec is None:
            self.status = f"{name} is not a LLaVA checkpoint: vision inactive."
            if error is not None:
                self.status = f"{name}: cannot read its LLaVA config ({error}): vision inactive."
            logger.info("llava: %s", self.status)
            return None
        loader = getattr(shared.args, "loader", None)
        if (loader and loader != "Transformers") or not hasattr(model, "get_input_embeddings"):
            self.problem = (
                f"{name} is a LLaVA checkpoint, but the {loader or 'current'} loader ignores image embeddings: "
                "the model cannot see images. Load it with the Transformers loader."
            )
            self.status = self.problem
            logger.warning("llava: %s", self.problem)
            return None
        try:
            settings = _vision_settings()
            started = time.perf_counter()
            pipeline = LlavaPipeline.load(
                model_dir, settings, models_dir=shared.args.model_dir,
                lm_hidden_size=model.get_input_embeddings().weight.shape[1],
            )
        except Exception as exc:  # noqa: BLE001 - shown in the UI and chats; text chat keeps working
            self.problem = f"the vision part of {name} could not be loaded: {_first_line(exc)}"
            self.status = self.problem
            logger.error("llava: %s", self.problem, exc_info=not isinstance(exc, ValueError))
            return None
        self.status = f"Vision active: {pipeline.describe()} (loaded in {time.perf_counter() - started:.1f} s)."
        logger.info("llava: %s", self.status)
        return pipeline


_vision = _Vision()
_MAX_SIZE_ENTRIES = 4096
_sizes: BoundedLRU[tuple[int, int]] = BoundedLRU(_MAX_SIZE_ENTRIES, cost=lambda size: 1)  # content hash -> (w, h)

# Pictures the prompt hook decoded, handed to the splice of the same request (which needs a new image
# again moments later: its embedding is not cached yet, and a photo takes tens of ms to decode).
_fresh_decodes = BoundedLRU(24_000_000, cost=lambda image: image.width * image.height)  # about 72 MB of RGB
# tokenizer_modifier -> logits_processor_modifier hand-off; both run in the request's thread, one after
# the other, so a thread-local never crosses requests or users.
_request_local = threading.local()


class _TokenizerSize:
    """``len(shared.tokenizer)``: ids at or past it have no token (llava_checkpoint.mask_ids_past_tokenizer).
    Asked on every forward, so remembered per tokenizer object (``len()`` of a tokenizer costs ~0.1 ms)."""

    def __init__(self):
        self._known = (None, 0)  # (weak reference to a tokenizer, its len()), replaced as one tuple

    def __call__(self) -> int | None:
        tokenizer = shared.tokenizer
        if tokenizer is None:
            return None
        reference, size = self._known
        if reference is not None and reference() is tokenizer:
            return size
        size = len(tokenizer)
        try:
            self._known = (weakref.ref(tokenizer), size)
        except TypeError:  # no weak references to this object: ask it every time
            pass
        return size


_tokenizer_size = _TokenizerSize()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Settings that change the loaded vision modules (the others are read per request).
VISION_SETTINGS = ("clip_bits", "clip_device", "projector_bits", "projector_device", "vision_tower", "cache_mb",
                   "max_image_pixels", "exif_transpose", "cuda_graphs")


def _settings_key() -> tuple:
    return tuple((name, str(params.get(name))) for name in VISION_SETTINGS)


def _vision_settings():
    from llava_pipeline import VisionSettings

    for name, types in SETTING_TYPES.items():
        if not isinstance(params.get(name), types):
            raise ValueError(f"setting llava-{name} has the wrong type: {params.get(name)!r}")
    default_device = "cpu" if getattr(shared.args, "cpu", False) else None
    return VisionSettings(
        clip_bits=str(params["clip_bits"]),
        clip_device=params["clip_device"] or default_device,
        projector_bits=str(params["projector_bits"]),
        projector_device=params["projector_device"] or default_device,
        vision_tower=params["vision_tower"] or None,
        cache_mb=float(params["cache_mb"]),
        max_pixels=int(params["max_image_pixels"]),
        exif_transpose=bool(params["exif_transpose"]),
        cuda_graphs=bool(params["cuda_graphs"]),
    )


def _placement(pipeline) -> str:
    placement = str(params.get("image_placement", "auto")).lower()
    if placement in ("before", "after"):
        return placement
    return pipeline.spec.default_placement


def _notify(state, message: str) -> None:
    """Log a problem and queue it for display above this request's reply."""
    logger.warning("llava: %s", message)
    notices = state.setdefault(NOTICES, [])
    if message not in notices:
        notices.append(message)


# ---------------------------------------------------------------------------------------------- images


def _check_image(pipeline, name: str, source: str) -> tuple[str, tuple[int, int]]:
    """Decode an image once to validate it and learn its size; later turns hit the size table.

    Returns ``(content key, (width, height))``; the key is also the embedding-cache key, computed here
    once per image and request (hashing a large data URL is not free)."""
    key = _source_key(source)
    size = _sizes.get(key)
    if size is not None:
        return key, size
    image = pipeline.load_image(source, name=name)
    _sizes.put(key, image.size)
    _fresh_decodes.put(key, image)
    return key, image.size


def _decode_for_splice(pipeline, name: str, source: str, key: str):
    """The decoded image for a cache miss: the one ``_check_image`` just decoded, else decode now."""
    image = _fresh_decodes.pop(key)
    return image if image is not None else pipeline.load_image(source, name=name)


def _source_key(source) -> str:
    return llava_image_io.source_digest(source) + f":{params.get('exif_transpose')}:{params.get('max_image_pixels')}"


NOT_INLINE = "only inline (data: URL) images are accepted; send the image data, not a link"


def _usable_source(state, name: str, source) -> bool:
    """Only inline data is accepted: a path or URL from a request is never opened or fetched."""
    if isinstance(source, str) and source.startswith("data:"):
        return True
    _notify(state, f"{name}: {NOT_INLINE}; it was not shown to the model")
    return False


def _ui_row_images(metadata: dict, row: int) -> list[tuple[str, str]]:
    attachments = (metadata.get(f"user_{row}") or {}).get("attachments") or []
    return [
        (str(a.get("name") or f"image {a.get('image_id', '?')}"), a.get("image_data", ""))
        for a in attachments if isinstance(a, dict) and a.get("type") == "image"
    ]


def _api_user_messages(state) -> list[tuple[str, list[str]]]:
    """(processed text, image URLs) per user message of an API chat request, oldest first."""
    messages = state.get("messages") or (state.get("history") or {}).get("messages") or []
    return [
        (llava_chat.api_processed_text(m.get("content")), llava_chat.api_image_urls(m.get("content")))
        for m in messages if isinstance(m, dict) and m.get("role") == "user"
    ]


# ---------------------------------------------------------------------------------------------- hooks


PIPELINE_LOGGERS = ("llava_checkpoint", "llava_vision", "llava_pipeline", "llava_preprocess", "llava_image_io",
                    "llava_prompt", "llava_next", "llava_cache", "llava_autoload", "llava_family", "llava_plan",
                    "llava_pixtral", "llava_templates", "llava_api")


def _route_pipeline_logs() -> None:
    """The pipeline modules log through `logging` (they run without webui too); webui only shows its
    own logger, so hand their records to its handlers."""
    import logging

    for name in PIPELINE_LOGGERS:
        pipeline_logger = logging.getLogger(name)
        pipeline_logger.handlers = list(logger.handlers)
        pipeline_logger.setLevel(logging.INFO)
        pipeline_logger.propagate = not logger.handlers


def setup():
    """Register the text-only LLaVA loader, provide instruction templates, load vision for a model
    that webui loaded at startup."""
    _route_pipeline_logs()
    try:
        import llava_checkpoint

        llava_checkpoint.register_with_transformers(tokenizer_size=_tokenizer_size)
    except Exception:  # noqa: BLE001 - without it LLaVA folders do not load; say so, keep webui running
        logger.exception("llava: could not register the LLaVA loader with transformers")
    _install_instruction_templates()
    _install_api_guard()
    _vision.current()


def _install_api_guard() -> None:
    """Check the images of API requests before webui answers them (see llava_api). webui starts its API
    right after the extensions' setup(), so the guard is in place before the first request."""
    if not (getattr(shared.args, "api", False) or getattr(shared.args, "public_api", False)):
        return
    try:
        from modules.api import script as api_script

        how = llava_api.install(api_script.app, llava_api.GuardHooks(active=_guard_active, check_image=_guard_check))
    except Exception:  # noqa: BLE001 - without it the hooks still refuse bad images, only less cleanly
        logger.exception("llava: could not install the API image check")
        return
    logger.info("llava: API image check installed %s", how)


def _guard_active(headers: dict, kind: str) -> bool:
    """Check this API request's images? Not when webui will refuse it anyway (its Host-header and API
    key checks, modules/api/script.py), so that a stranger's request costs no decoding and learns
    nothing; not when the loaded model cannot see images."""
    args = shared.args
    if not (getattr(args, "listen", False) or getattr(args, "public_api", False)):
        if headers.get("host", "").split(":")[0] not in ("localhost", "127.0.0.1"):
            return False
    key = getattr(args, "api_key", "")
    if key:
        given = headers.get("x-api-key") if kind == "anthropic" else headers.get("authorization")
        if given != (key if kind == "anthropic" else f"Bearer {key}"):
            return False
    return _vision.current() is not None


def _guard_check(name: str, url: str) -> None:
    """Raise ValueError naming the image and the reason unless the hooks will be able to use it. The
    decoded size (and the picture, for the splice) are kept by content, so this costs no second decode."""
    if not url.startswith("data:"):
        raise llava_api.ImageProblem(f"{name}: {NOT_INLINE}")
    pipeline = _vision.current()
    if pipeline is not None:
        _check_image(pipeline, name, url)


def _install_instruction_templates() -> None:
    """Make webui pick a working LLaVA template for every LLaVA folder, unless the user configured one."""
    import re

    import llava_checkpoint
    import llava_templates

    models_dir = Path(shared.args.model_dir)
    user_config = getattr(shared, "user_config", None)
    if not models_dir.is_dir() or user_config is None:
        return
    for folder in sorted(p for p in models_dir.iterdir() if (p / "config.json").is_file()):
        try:
            spec = llava_checkpoint.read_llava_spec(folder)
            template = _template_for(spec, folder, llava_templates) if spec is not None else None
        except Exception as exc:  # noqa: BLE001 - one odd folder must not stop the others
            logger.debug("llava: skipping %s: %s", folder.name, exc)
            continue
        if template is None:
            continue
        name = folder.name.lower()
        if any(re.match(pattern.lower(), name) and "instruction_template" in values
               for pattern, values in user_config.items() if isinstance(values, dict)):
            continue
        user_config[re.escape(name) + "$"] = {
            "instruction_template": "Custom (obtained from model metadata)",
            "instruction_template_str": template,
        }
        if folder.name == shared.model_name:
            shared.settings["instruction_template"] = "Custom (obtained from model metadata)"
            shared.settings["instruction_template_str"] = template


def _template_for(spec, folder: Path, llava_templates) -> str | None:
    """The original conversation format of an original checkpoint; a llava-hf checkpoint's own chat
    template, adapted to the content shape it renders (None without one: webui's default applies)."""
    if spec.format != "hf":
        return llava_templates.WEBUI_TEMPLATES.get(spec.template)
    return llava_templates.adapt_checkpoint_template(folder, spec.image_token_text or "<image>")


# The files webui's chat turns into image attachments (modules/chat.py add_message_attachment); any
# other file goes to the model as a text or PDF attachment.
WEBUI_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def ui():
    """The panel under the chat: a button that adds pictures to the chat box (as native webui
    attachments, so every later step treats them like the paperclip's), what the next message will
    carry and what the last one carried (with each picture's token cost), the "embed all" checkbox
    and the vision status."""
    import gradio as gr

    with gr.Accordion("LLaVA", open=True, elem_id="llava-panel"):
        status = gr.Markdown(value=_current_status, elem_id="llava-status")
        with gr.Row():
            with gr.Column():
                # A button, not a file box: in webui's Gradio build an upload through a gr.File raises
                # "Cannot set properties of undefined (setting 'abort_controller')" in the page; an
                # UploadButton (like the paperclip) does not. gr.Image would decode the picture itself and
                # fail with a traceback on a broken file; the extension's own decoder reports it cleanly.
                picture = gr.UploadButton("Add images to the next message", file_types=list(WEBUI_IMAGE_SUFFIXES),
                                          file_count="multiple", type="filepath", size="sm", elem_id="llava-image")
                pending = gr.Markdown(value=_pending_info(None), elem_id="llava-pending")
                sent = gr.Markdown(value="", elem_id="llava-sent")
            with gr.Column():
                embed_all = gr.Checkbox(value=bool(params["add_all_images_to_prompt"]),
                                        label="Embed all images, not only the last one", elem_id="llava-embed-all")
                refresh = gr.Button("Refresh status", size="sm")
    embed_all.change(lambda value: params.update(add_all_images_to_prompt=bool(value)), embed_all, None)
    refresh.click(_current_status, None, status)
    textbox, sent_message = shared.gradio.get("textbox"), shared.gradio.get("Chat input")
    if textbox is None:
        return
    # Whatever changes the chat box's files (this button, the paperclip, removing a file, sending the
    # message, which empties the box) updates what the panel says is pending. The box's change event does
    # not fire for this button's own update of it (and an event chained after it still reads the old
    # value), so the button's handler says it itself.
    picture.upload(_attach_to_textbox, [picture, textbox], [textbox, pending], show_progress="hidden")
    textbox.change(_pending_info, [textbox], [pending], show_progress="hidden", trigger_mode="always_last")
    # A dummy message or reply and Remove last empty the box from the server, and the box's change event
    # did not fire for them (seen in Chromium on webui 1dcde41d): the panel says it itself.
    for name in ("Send dummy message", "Send dummy reply", "Remove last"):
        _on_webui_event(name, "click", lambda: _pending_info(None), None, [pending])
    if sent_message is None:
        return
    # The message the "sent" line describes (this browser session's): the last one sent in the chat shown,
    # or None once that message is removed or another chat is shown.
    last_sent = gr.State(None)

    def describe(message, embed_all_value):
        return message, _sent_info(message, embed_all_value)

    # webui copies the chat box into "Chat input" when a message is sent, just before emptying the box; a
    # dummy message is sent from the box itself (read here before webui empties it).
    sent_message.change(describe, [sent_message, embed_all], [last_sent, sent], show_progress="hidden")
    sent_message.change(_current_status, None, [status], show_progress="hidden")
    _on_webui_event("Send dummy message", "click", describe, [textbox, embed_all], [last_sent, sent])
    for name, event in _CHAT_REPLACED_EVENTS:
        _on_webui_event(name, event, lambda: (None, ""), None, [last_sent, sent])
    embed_all.change(_sent_info, [last_sent, embed_all], [sent], show_progress="hidden")


# webui's events that remove the last message or show another chat (modules/ui_chat.py): the "sent" line
# no longer describes the chat on screen after them.
_CHAT_REPLACED_EVENTS = (("Remove last", "click"), ("Start new chat", "click"), ("Start incognito chat", "click"),
                         ("delete_chat-confirm", "click"), ("branch_chat", "click"), ("unique_id", "select"),
                         ("load_chat_history", "upload"), ("character_menu", "change"), ("mode", "change"))


def _on_webui_event(name: str, event: str, handler, inputs, outputs) -> None:
    """Listen to one of webui's own components, where this webui has it."""
    component = shared.gradio.get(name)
    listener = getattr(component, event, None)
    if listener is not None:
        listener(handler, inputs, outputs, show_progress="hidden")


def _current_status() -> str:
    """The vision status for the loaded model (on page load, after each message, on Refresh): a model
    loaded from the Model tab or the API gets its vision modules here at the latest."""
    _vision.current()
    return _vision.status


def _attach_to_textbox(paths, textbox_value):
    """Add the uploaded pictures to the chat box's files (they are sent with the next message); returns
    the chat box's new value and what the panel says is pending."""
    value = dict(textbox_value or {})
    value["files"] = list(value.get("files") or []) + [str(path) for path in (paths or []) if path]
    value.setdefault("text", "")
    return value, _pending_info(value)


def _image_files(message) -> list[str]:
    """The files of a chat box value (``{"text", "files"}``) that webui sends as images."""
    if not isinstance(message, dict):
        return []
    files = message.get("files") or []
    paths = [file if isinstance(file, str) else (file or {}).get("path", "") for file in files]
    return [path for path in paths if path and Path(path).suffix.lower() in WEBUI_IMAGE_SUFFIXES]


def _pending_info(textbox_value) -> str:
    """What the next message will carry, with each picture's token cost."""
    lines = [_image_info(path) for path in _image_files(textbox_value)]
    if not lines:
        return "No image waiting for the next message."
    return "**Next message** (not sent yet):\n\n" + "\n".join(f"* {line}" for line in lines)


def _sent_info(sent_message, embed_all: bool) -> str:
    """What the last message sent carried, and which images the model sees after it."""
    if not isinstance(sent_message, dict):
        return ""
    lines = [_image_info(path) for path in _image_files(sent_message)]
    if lines:
        return "**Sent** with your last message:\n\n" + "\n".join(f"* {line}" for line in lines)
    seen = "every image of the chat" if embed_all else "the images of your most recent message that had any"
    return f"**Sent**: your last message had no image; the model still sees {seen}."


def _image_info(path) -> str:
    """``name: W×H, N tokens of context``, or why the picture cannot be shown to the model."""
    name = html.escape(Path(path).name, quote=False)
    pipeline = _vision.current()
    if pipeline is None:
        return f"{name} (vision inactive: the model will not see it)"
    try:
        stat = Path(path).stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns, shared.model_name, _settings_key())
    except OSError as exc:
        return f"⚠️ {name}: cannot be read ({html.escape(exc.strerror or str(exc), quote=False)})"
    info = _panel_infos.get(key)
    if info is None:
        try:
            with open(path, "rb") as uploaded:  # Gradio's own copy of this user's upload
                width, height = pipeline.load_image(uploaded.read(), name=Path(path).name).size
        except ValueError as exc:  # ImageError: names the image and the reason
            info = f"⚠️ {html.escape(str(exc), quote=False)}: it will not be shown to the model"
        else:
            info = f"{name}: {width}×{height}, {pipeline.prompt_positions((width, height))} tokens of context"
        _panel_infos.put(key, info)
    return info


# (upload path, size, mtime, vision settings) -> the panel's line for it: the chat box's change event
# fires on every keystroke, and a picture is decoded once.
_panel_infos: BoundedLRU[str] = BoundedLRU(1024, cost=lambda info: 1)


def custom_generate_chat_prompt(user_input, state, **kwargs):
    """Write the chat's images into their messages as slots, then let webui build the prompt."""
    try:
        pipeline = _vision.current()
    except Exception as exc:  # noqa: BLE001
        _notify(state, f"vision unavailable: {_first_line(exc)}")
        return None
    if pipeline is None:
        _warn_if_blind(state)
        return None
    from modules import chat

    try:
        new_input, new_history, images = _slot_history(pipeline, user_input, state, kwargs)
    except _ApiImageError as exc:
        _raise_api_error(str(exc))
    except Exception as exc:  # noqa: BLE001 - answer without images rather than fail the chat
        logger.exception("llava: preparing the images failed")
        _notify(state, f"the images could not be prepared ({_first_line(exc)}); answered without them")
        return None
    state[IMAGES] = images
    # Built from a copy whose texts (system message, context, names, ...) cannot carry slot characters.
    build_state = {key: llava_chat.neutralize(value) if isinstance(value, str) else value
                   for key, value in state.items()}
    prompt = chat.generate_chat_prompt(new_input, build_state, **dict(kwargs, history=new_history))
    # webui's truncation drops whole messages (and can cut a slot): say which images are gone.
    shown = set(llava_chat.parse_slots(prompt).image_indices)
    lost = [name for index, (name, *_) in enumerate(images) if index not in shown]
    if lost:
        _notify(state, f"{len(lost)} image(s) fell out of the context and were not shown to the model "
                       f"({', '.join(lost)})")
    return prompt


class _ApiImageError(ValueError):
    """A bad image in an API request: the request fails with HTTP 400 and this message."""


def _raise_api_error(message: str):
    try:
        from modules.api.errors import InvalidRequestError
    except ImportError:  # webui without its API package: a plain error
        raise ValueError(message) from None
    raise InvalidRequestError(message=message, param="messages")


def _warn_if_blind(state) -> None:
    """Images sent to a model that cannot see them: say so instead of answering silently blind."""
    if shared.model is None:
        # No model at all (idle-unloaded: webui reloads it inside generate_reply, and tokenizer_modifier
        # then handles the images); webui itself reports a missing model.
        return
    has_images = bool(state.get("image_attachments") or state.get("raw_images"))
    has_images = has_images or any(urls for _, urls in _api_user_messages(state))
    if has_images:
        if _vision.problem:
            _notify(state, _vision.problem)
        elif getattr(shared.args, "loader", "Transformers") in (None, "Transformers"):
            _notify(state, f"{shared.model_name} is not a LLaVA model: it cannot see the attached image(s)")


def _slot_history(pipeline, user_input: str, state, kwargs):
    """Copy of the history with each message's images written as slots and no image attachments.

    Returns ``(user_input, history, images)``; ``images`` is ``[[name, data URL, content key], ...]``
    indexed by the slots. With "embed all" off only the most recent image gets a slot; the others take no tokens.
    """
    history = kwargs.get("history", state["history"])
    rows = history["internal"]
    metadata = history.get("metadata") or {}
    is_api = "messages" in state
    current_included = not (kwargs.get("impersonate") or kwargs.get("_continue"))

    # Per message: its text (markers removed) and its images, oldest first. -1 = the current input.
    texts: list[str] = [row[0] for row in rows]
    row_images: list[list[tuple[str, str]]] = [[] for _ in rows]
    current_text, current_images = user_input, []
    if is_api:
        # Every user message, text-only ones included, is matched to its row in order, so that a text-only
        # message whose typed text equals a later image message's can never take that message's images.
        pending = _api_user_messages(state)
        system_rows = {i for i, row in enumerate(rows) if len(row) > 3 and isinstance(row[3], dict)
                       and row[3].get("role") == "system"}
        targets = [i for i in range(len(rows)) if i not in system_rows] + ([-1] if current_included else [])
        for target in targets:
            if not pending:
                break
            text = current_text if target == -1 else texts[target]
            expected, urls = pending[0]
            if text != expected:
                continue
            pending.pop(0)
            if not urls:
                continue
            stripped = llava_chat.strip_media_run(text, len(urls))
            entries = [(f"image {i + 1} of a message", url) for i, url in enumerate(urls)]
            if target == -1:
                current_text, current_images = stripped, entries
            else:
                texts[target], row_images[target] = stripped, entries
    else:
        for row in range(len(rows)):
            row_images[row] = _ui_row_images(metadata, row)
        if current_included:
            current_images = _ui_row_images(metadata, len(rows))

    every_image = [image for images in row_images for image in images] + current_images
    # The message each image belongs to (row number; len(rows) for the current input).
    owners = [row for row, images in enumerate(row_images) for _ in images] + [len(rows)] * len(current_images)
    first_new = len(every_image) - len(current_images)
    keep_all = bool(params["add_all_images_to_prompt"])
    limit = int(params["max_images_per_request"])
    # With "embed all" every image of the chat is a candidate; without it, every image of the most recent
    # message that has images. The others take no positions at all.
    candidates = [p for p in range(len(every_image)) if keep_all or owners[p] == owners[-1]]
    if len(candidates) > limit:
        where = "in this chat" if keep_all else "in one message"
        message = (f"{len(candidates)} images {where} exceed the limit of {limit} "
                   "(setting llava-max_images_per_request); only the most recent ones are used")
        if is_api:
            raise _ApiImageError(message)
        _notify(state, message)
    if current_images and not keep_all:
        _say_left_out(state, is_api, every_image, owners)
    # Candidates are checked newest first, up to the limit, so a broken image is reported when it is sent
    # and afterwards only skipped.
    checked: dict[int, tuple[str, tuple[int, int]]] = {}  # position -> (content key, size)
    for position in reversed(candidates):
        if len(checked) >= limit:
            break
        name, source = every_image[position]
        is_new = position >= first_new
        if is_api and not (isinstance(source, str) and source.startswith("data:")):
            raise _ApiImageError(f"{name}: {NOT_INLINE}")  # an API client never sees notices
        if not _usable_source(state if is_new or is_api else {}, name, source):
            continue
        try:
            checked[position] = _check_image(pipeline, name, source)
        except ValueError as exc:  # ImageError: names the image and the reason
            if is_api:
                raise _ApiImageError(str(exc)) from exc
            if is_new:
                _notify(state, f"{exc}; the rest of the message was answered")

    images: list[list[str]] = []
    placement = _placement(pipeline)
    marker = pipeline.spec.image_token_text or "<image>"
    separator = pipeline.family.image_text_separator
    counter = 0

    def slots_for(entries) -> list[str]:
        """One slot per image of a message; "" for an image without one (it still takes its typed
        <image> marker, so the message's other images stay where the user put them)."""
        nonlocal counter
        slots = []
        for name, source in entries:
            position, counter = counter, counter + 1
            if position in checked:
                key, size = checked[position]
                slots.append(llava_chat.slot(len(images), size))
                images.append([name, source, key])
            else:
                slots.append("")
        return slots

    new_rows = []
    for row, text, entries in zip(rows, texts, row_images):
        clean = llava_chat.neutralize(text)
        # Every text of the history is neutralized (assistant and system texts come from API clients too),
        # so the only slots in the prompt are the ones written here.
        rest = [llava_chat.neutralize(value) if isinstance(value, str) else value for value in row[1:]]
        new_rows.append([llava_chat.place_slots(clean, slots_for(entries), placement, marker, separator), *rest])
    new_input = llava_chat.place_slots(llava_chat.neutralize(current_text), slots_for(current_images), placement, marker,
                                       separator)
    new_metadata = {
        key: (dict(value, attachments=[a for a in value.get("attachments", []) if a.get("type") != "image"])
              if isinstance(value, dict) and "attachments" in value else value)
        for key, value in metadata.items()
    }
    new_history = dict(history, internal=new_rows, metadata=new_metadata)
    return new_input, new_history, images


def _say_left_out(state, is_api: bool, every_image, owners) -> None:
    """A new image message leaves the images of the previous image message out of the model's view
    ("embed all" off): name the ones the model could see (decoded fine before). API clients get a log line;
    the rule is documented for them and their reply text stays theirs."""
    earlier = [p for p in range(len(every_image)) if owners[p] != owners[-1]]
    if not earlier:
        return
    previous = [p for p in earlier if owners[p] == owners[earlier[-1]]]
    names = [every_image[p][0] for p in previous if _sizes.get(_source_key(every_image[p][1])) is not None]
    if not names:
        return
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    message = (f"{shown} (from an earlier message) {'is' if len(names) == 1 else 'are'} not shown to the model: "
               "only the images of the most recent message with images are; tick \"Embed all images\" to keep "
               "every image")
    if is_api:
        logger.info("llava: %s", message)
    else:
        _notify(state, message)


def custom_tokenized_length(prompt):
    """Prompt length with every image slot (or webui marker) counted as its real number of positions."""
    has_slots = llava_chat.has_slots(prompt)
    if not has_slots and MEDIA_MARKER not in prompt:
        return None
    pipeline = _vision.current()
    if pipeline is None or shared.tokenizer is None:
        return None
    try:
        if not has_slots:
            prompt = _slots_for_counting(pipeline, prompt)
        text, add_bos = pipeline.reference_prompt(prompt, shared.tokenizer)
        parsed = llava_chat.parse_slots(text)
        return len(pipeline.tokenize(parsed.parts, shared.tokenizer, add_bos=add_bos, image_sizes=parsed.sizes).ids)
    except Exception:  # noqa: BLE001 - webui then counts the text itself
        logger.exception("llava: counting tokens failed")
        return None


def _slots_for_counting(pipeline, prompt: str) -> str:
    """A prompt webui built with its own markers (Count tokens, /v1/internal/chat-prompt; image sizes
    unknown) written as the extension would place its images: each run of ``<__media__>`` + ``"\\n\\n"``
    becomes one slot + the family's separator per image (an image newline for the llava-hf templates), at
    the plan's nominal size (the tower's input size; Pixtral: its longest edge, square). Without "embed
    all", only the last run (the most recent message with images) keeps its images."""
    size = pipeline.plan.nominal_size
    separator = pipeline.family.image_text_separator
    separator = llava_chat.IMAGE_NEWLINE if separator == "\n" else separator
    runs = list(re.finditer(f"((?:{re.escape(MEDIA_MARKER)})+)(\n\n)?", prompt))
    keep_all = bool(params["add_all_images_to_prompt"])
    replacements = []
    for number, run in enumerate(runs):
        count = run.group(1).count(MEDIA_MARKER)
        kept = keep_all or number == len(runs) - 1
        text = "".join(llava_chat.slot(0, size) + separator for _ in range(count)) if kept else ""
        replacements.append((run.start(), run.end(), text))
    return llava_chat.replace_spans(prompt, replacements)


def _reference_text_ids(prompt: str, input_ids, state):
    """webui's ids for a prompt without images, with the BOS the checkpoint's reference gives it (webui adds
    one by its own setting, which a LLaVA prompt does not follow; see LlavaPipeline.reference_prompt)."""
    pipeline = _vision.current()
    tokenizer = shared.tokenizer
    if pipeline is None or tokenizer is None or input_ids is None or input_ids.shape[-1] == 0:
        return input_ids
    text, add_bos = pipeline.reference_prompt(prompt, tokenizer)
    if text != prompt:  # a BOS written as text was removed: the words after it tokenize differently
        return _encode_reference(text, add_bos, state, like=input_ids)
    bos_text, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if (not add_bos and bos_id is not None and int(input_ids[0, 0]) == bos_id
            and not (bos_text and prompt.startswith(bos_text))):
        return input_ids[:, 1:]
    return input_ids


def _encode_reference(text: str, add_bos: bool, state, like):
    """``[1, n]`` ids of ``text`` (BOS in front if ``add_bos``), left-truncated as webui truncates, on ``like``'s device."""
    import torch

    tokenizer = shared.tokenizer
    ids = ([tokenizer.bos_token_id] if add_bos else []) + tokenizer(text, add_special_tokens=False)["input_ids"]
    max_length = int(state.get("truncation_length", len(ids))) - int(state.get("max_new_tokens", 0))
    ids = ids[-max(1, max_length):]
    return torch.tensor([ids], dtype=torch.long, device=like.device)


def tokenizer_modifier(state, prompt, input_ids, input_embeds):
    """Replace the text-only ids by ids + embeddings with the images spliced in."""
    if IMAGES not in state:
        # webui built this prompt itself (impersonate, /v1/completions): any slot character in it was typed.
        prompt = llava_chat.neutralize(prompt)
    has_slots = llava_chat.has_slots(prompt)
    completion_images = _completion_images(state)
    if not has_slots and MEDIA_MARKER not in prompt and not completion_images:
        return prompt, _reference_text_ids(prompt, input_ids, state), input_embeds  # text-only turn
    pipeline = _vision.current()
    if pipeline is None:
        if has_slots:  # cannot happen unless the model changed mid-request: drop the slots
            return prompt, _text_only_ids(llava_chat.strip_slots(prompt), state, input_ids), None
        if completion_images:
            _warn_if_blind(state)
        return prompt, input_ids, input_embeds
    from llava_pipeline import EncodingCancelled

    try:
        return _splice(pipeline, state, prompt, input_ids)
    except _ApiImageError as exc:  # an image the client sent cannot be used: the request fails (HTTP 400)
        _raise_api_error(str(exc))
    except EncodingCancelled:
        logger.info("llava: Stop pressed while encoding images; generation stops too")
        return prompt, _text_only_ids(llava_chat.strip_slots(prompt), state, input_ids, pipeline), None
    except Exception as exc:  # noqa: BLE001 - answer without images rather than fail the request
        logger.exception("llava: image embedding failed")
        _notify(state, f"the images could not be processed ({_first_line(exc)}); answered without them")
        return prompt, _text_only_ids(llava_chat.strip_slots(prompt), state, input_ids, pipeline), None


def _splice(pipeline, state, prompt, input_ids):
    import torch

    if llava_chat.has_slots(prompt):
        slot_prompt, images = prompt, state.get(IMAGES) or []
    elif _completion_images(state):
        # /v1/completions: the prompt is the client's own text; a <__media__> in it was typed, not webui's.
        slot_prompt, images = _slots_for_completion(pipeline, state, prompt)
    else:
        slot_prompt, images = _slots_from_markers(pipeline, state, prompt)
    slot_prompt, add_bos = pipeline.reference_prompt(slot_prompt, shared.tokenizer)
    parsed = llava_chat.parse_slots(slot_prompt)
    if any(index >= len(images) for index in parsed.image_indices):
        raise ValueError("an image slot points past the request's images")
    sources = [images[index] for index in parsed.image_indices]
    # Images are decoded only when their embedding is not cached: a follow-up turn re-sends every image
    # of the chat, and decoding them all again would cost more than the cached embeddings save.
    loaders = [lambda name=name, source=source, key=key: _decode_for_splice(pipeline, name, source, key)
               for name, source, key in sources]
    keys = [key for _, _, key in sources]
    max_length = int(state["truncation_length"]) - int(state["max_new_tokens"])
    embed = shared.model.get_input_embeddings()
    started = time.perf_counter()
    with torch.inference_mode():
        prepared = pipeline.prepare(
            parsed.parts, loaders, shared.tokenizer, embed, image_sizes=parsed.sizes, keys=keys,
            add_bos=add_bos, max_length=max(1, max_length), should_stop=lambda: bool(shared.stop_everything),
        )
    if prepared.dropped_images:
        names = ", ".join(sources[i][0] for i in prepared.dropped_images)
        _notify(state, f"{len(prepared.dropped_images)} image(s) fell out of the context and were not shown "
                       f"to the model ({names})")
    if state.get("auto_max_new_tokens"):
        _request_local.context_limit = int(state["truncation_length"])
    logger.info("llava: %d image(s) spliced into %d positions in %.0f ms", prepared.images_used,
                prepared.input_ids.shape[1], (time.perf_counter() - started) * 1000)
    return prompt, prepared.input_ids, prepared.inputs_embeds


def _slots_from_markers(pipeline, state, prompt):
    """Prompts webui built without our chat-prompt hook (impersonate, another extension's prompt):
    find each message's ``<__media__>`` run by its exact text and give it that message's images."""
    history = state.get("history") or {}
    rows: list[tuple[str, list[tuple[str, str]]]] = []
    if "messages" in state:
        for text, urls in _api_user_messages(state):
            if urls:
                stripped = llava_chat.strip_media_run(text, len(urls))
                rows.append((stripped if stripped is not None else text,
                             [(f"image {i + 1} of a message", u) for i, u in enumerate(urls)]))
    else:
        metadata = history.get("metadata") or {}
        for row, values in enumerate(history.get("internal") or []):
            entries = _ui_row_images(metadata, row)
            if entries:
                rows.append((values[0], entries))
    # The prompt reached here neutralized (tokenizer_modifier): compare with neutralized texts.
    found = llava_chat.find_marked_rows(prompt, [(llava_chat.neutralize(text), len(entries)) for text, entries in rows])
    keep_all = bool(params["add_all_images_to_prompt"])
    images, replacements = [], []
    for position, (number, start, end) in enumerate(found):
        entries = rows[number][1]
        # Without "embed all" only the images of the most recent message with images count.
        keep = keep_all or position == len(found) - 1
        slots = ""
        for name, source in entries:
            if keep and _usable_source(state, name, source):
                try:
                    key, size = _check_image(pipeline, name, source)
                    slots += llava_chat.slot(len(images), size)
                    images.append([name, source, key])
                except ValueError as exc:
                    _notify(state, str(exc))
        replacements.append((start, end, slots))
    return llava_chat.replace_spans(prompt, replacements), images


def _completion_images(state) -> list[tuple[str, object, int]]:
    """``(name, source, message number)`` of the images of a /v1/completions request, in message order.

    Taken from the request's own ``messages`` (data URLs, decoded by the extension): webui's
    ``raw_images`` lacks every image it could not decode, so an image the client sent would vanish
    without a word. ``raw_images`` (PIL images, one message) only when a request has no ``messages``.
    Empty for chat requests (they carry ``history``).
    """
    if "history" in state:
        return []
    messages = state.get("messages")
    if isinstance(messages, list):
        images = []
        for number, message in enumerate(messages, start=1):
            content = message.get("content") if isinstance(message, dict) else None
            images += [(f"image {index} of message {number}", url, number)
                       for index, url in enumerate(llava_chat.api_image_urls(content), start=1)]
        return images
    return [(f"image {number} of the request", image, 1)
            for number, image in enumerate(state.get("raw_images") or [], start=1)]


def _slots_for_completion(pipeline, state, prompt):
    """/v1/completions with messages: images, no marker. ``<image>`` in the prompt places them;
    otherwise they go at the start of the prompt (after a leading BOS text). The chat's rule applies:
    without "embed all", only the images of the most recent message with images are used (the others
    take no positions, and a typed ``<image>`` of theirs stays empty). An image that cannot be used fails
    the request (``_ApiImageError``)."""
    entries = _completion_images(state)
    keep_all = bool(params["add_all_images_to_prompt"])
    used = {i for i, (_, _, message) in enumerate(entries) if keep_all or message == entries[-1][2]}
    limit = int(params["max_images_per_request"])
    if len(used) > limit:
        raise _ApiImageError(f"{len(used)} images in this request exceed the limit of {limit} "
                             "(setting llava-max_images_per_request)")
    images, slots = [], []
    for position, (name, source, _) in enumerate(entries):
        if position not in used:
            slots.append("")
            continue
        if not isinstance(source, str):
            source = _png_data_url(source)  # a PIL image from webui's raw_images
        elif not source.startswith("data:"):
            raise _ApiImageError(f"{name}: {NOT_INLINE}")
        try:
            key, size = _check_image(pipeline, name, source)
        except ValueError as exc:  # ImageError: names the image and the reason
            raise _ApiImageError(str(exc)) from exc
        slots.append(llava_chat.slot(len(images), size))
        images.append([name, source, key])
    if len(used) < len(entries):
        logger.info("llava: %d image(s) of earlier messages not used: without \"embed all\" only the images of "
                    "the most recent message with images are", len(entries) - len(used))
    text = llava_chat.neutralize(prompt)
    marker = pipeline.spec.image_token_text or "<image>"
    if marker in text:
        return llava_chat.place_slots(text, slots, "before", marker, pipeline.family.image_text_separator), images
    bos = getattr(shared.tokenizer, "bos_token", None) or ""
    head = bos if bos and text.startswith(bos) else ""
    return head + "".join(slots) + text[len(head):], images


def _png_data_url(image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _text_only_ids(text: str, state, fallback, pipeline=None):
    """Ids of the prompt without any image, for the fallback paths: as the checkpoint's reference
    tokenizes it when its pipeline is known, else as webui encodes it."""
    try:
        if pipeline is not None:
            return _encode_reference(*pipeline.reference_prompt(text, shared.tokenizer), state, like=fallback)
        from modules.text_generation import encode

        return encode(text, add_bos_token=state.get("add_bos_token", True))
    except Exception:  # noqa: BLE001
        return fallback


def logits_processor_modifier(processor_list, input_ids):
    """With auto_max_new_tokens, webui sized the reply from the text-only prompt; image positions make
    the prompt longer, so end the reply (EOS) where the context ends."""
    limit = getattr(_request_local, "context_limit", None)
    _request_local.context_limit = None
    tokenizer = shared.tokenizer
    if tokenizer is None:
        return processor_list
    if limit is not None and tokenizer.eos_token_id is not None:
        processor_list.append(_ContextLimit(limit, tokenizer.eos_token_id))
    return processor_list


class _ContextLimit:
    """Logits processor: only EOS is allowed once the sequence fills the context."""

    def __init__(self, limit: int, eos_token_id: int):
        self.limit = limit
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] >= self.limit - 1:
            scores = scores.clone()
            eos = scores[:, self.eos_token_id].clone()
            scores[:] = float("-inf")
            scores[:, self.eos_token_id] = eos
        return scores


def output_modifier(string, state, is_chat=False):
    """Show this request's notices above the reply (visible text only; the model never sees them)."""
    notices = state.get(NOTICES) if isinstance(state, dict) else None
    if not notices:
        return string
    lines = "\n".join(f"> ⚠️ llava: {html.escape(notice, quote=False)}" for notice in notices)
    return f"{lines}\n\n{string}"
