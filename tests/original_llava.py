"""An independent re-statement of what original LLaVA feeds its language model, for reference ids in tests.

Written from haotian-liu/LLaVA's own code, not from the extension: ``Conversation.get_prompt`` and the
conversation templates of ``llava/conversation.py`` (HEAD c121f04; the v0 checkpoints' format
``simple_conv_multimodal`` from 7ace501), ``tokenizer_image_token`` of ``llava/mm_utils.py`` and the way
``llava/serve/cli.py`` / ``run_llava.py`` put the image in the first message (``"<image>\\n" + text``).
A conversation here is a list of turns ``(user_text, image_count, assistant_text_or_None)``; every user
message that carries images gets ``"<image>\\n"`` per image before its text (v0: ``"\\n" + image`` after
it, 7ace501 run_llava). This module is test support, not a test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_TOKEN_INDEX = -200  # llava/constants.py
DEFAULT_IMAGE_TOKEN = "<image>"


@dataclass
class Conversation:
    system: str
    roles: tuple
    messages: list = field(default_factory=list)
    sep_style: str = "SINGLE"
    sep: str = "###"
    sep2: str | None = None

    def get_prompt(self) -> str:
        messages = self.messages
        if self.sep_style == "SINGLE":
            ret = self.system + self.sep
            for role, message in messages:
                if message:
                    ret += role + ": " + message + self.sep
                else:
                    ret += role + ":"
        elif self.sep_style == "TWO":
            seps = [self.sep, self.sep2]
            ret = self.system + seps[0]
            for i, (role, message) in enumerate(messages):
                if message:
                    ret += role + ": " + message + seps[i % 2]
                else:
                    ret += role + ":"
        elif self.sep_style == "MPT":
            ret = self.system + self.sep
            for role, message in messages:
                if message:
                    ret += role + message + self.sep
                else:
                    ret += role
        elif self.sep_style == "LLAMA_2":
            def wrap_sys(msg):
                return f"<<SYS>>\n{msg}\n<</SYS>>\n\n" if len(msg) > 0 else msg

            def wrap_inst(msg):
                return f"[INST] {msg} [/INST]"

            ret = ""
            for i, (role, message) in enumerate(messages):
                if message:
                    if i == 0:
                        message = wrap_sys(self.system) + message
                    if i % 2 == 0:
                        message = wrap_inst(message)
                        ret += self.sep + message
                    else:
                        ret += " " + message + " " + self.sep2
                else:
                    ret += ""
            ret = ret.lstrip(self.sep)
        else:
            raise ValueError(self.sep_style)
        return ret


def conversation(name: str, system: str | None = None) -> Conversation:
    """A fresh copy of conv_templates[name]; ``system`` replaces the system prompt (the chatml one keeps
    its ``<|im_start|>system\\n`` head)."""
    if name == "llava_v0":  # 7ace501 simple_conv_multimodal
        conv = Conversation(
            system="You are LLaVA, a large language and vision assistant trained by UW Madison WAIV Lab."
                   "You are able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language."
                   "Follow the instructions carefully and explain your answers in detail.",
            roles=("Human", "Assistant"),
            messages=[["Human", "Hi!"], ["Assistant", "Hi there!  How can I help you today?\n"]],
            sep_style="SINGLE", sep="###")
    elif name == "llava_v1":
        conv = Conversation(
            system="A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.",
            roles=("USER", "ASSISTANT"), sep_style="TWO", sep=" ", sep2="</s>")
    elif name == "llava_llama_2":
        conv = Conversation(
            system="You are a helpful language and vision assistant. "
                   "You are able to understand the visual content that the user provides, "
                   "and assist the user with a variety of tasks using natural language.",
            roles=("USER", "ASSISTANT"), sep_style="LLAMA_2", sep="<s>", sep2="</s>")
    elif name == "mistral_instruct":
        conv = Conversation(system="", roles=("USER", "ASSISTANT"), sep_style="LLAMA_2", sep="", sep2="</s>")
    elif name == "chatml_direct":
        conv = Conversation(system="<|im_start|>system\nAnswer the questions.",
                            roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), sep_style="MPT",
                            sep="<|im_end|>")
    else:
        raise KeyError(name)
    if system is not None:
        conv.system = ("<|im_start|>system\n" + system) if name == "chatml_direct" else system
    return conv


def prompt_for(name: str, turns, *, system: str | None = None, image_text: str = DEFAULT_IMAGE_TOKEN) -> str:
    """``get_prompt()`` of a conversation of ``(user_text, images, reply_or_None)`` turns; the last reply
    None is the open assistant turn."""
    conv = conversation(name, system)
    for user_text, images, reply in turns:
        if name == "llava_v0":
            message = user_text + "".join("\n" + image_text for _ in range(images))
        else:
            message = "".join(image_text + "\n" for _ in range(images)) + user_text
        conv.messages.append([conv.roles[0], message])
        conv.messages.append([conv.roles[1], reply])
    return conv.get_prompt()


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX) -> list[int]:
    """llava/mm_utils.py: chunks around ``<image>`` tokenized separately, one BOS kept, ``-200`` between."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(x, sep):
        return [ele for sublist in zip(x, [sep] * len(x)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def expand_images(ids: list[int], image_lengths: list[int], fill: int) -> list[int]:
    """``tokenizer_image_token`` ids with the i-th ``-200`` replaced by ``image_lengths[i]`` copies of ``fill``
    (the embedding positions the original's ``prepare_inputs_labels_for_multimodal`` builds)."""
    out, index = [], 0
    for token in ids:
        if token == IMAGE_TOKEN_INDEX:
            out.extend([fill] * image_lengths[index])
            index += 1
        else:
            out.append(token)
    if index != len(image_lengths):
        raise ValueError(f"{index} image markers for {len(image_lengths)} images")
    return out
