"""Conversation formats: how a conversation becomes text, and which of that text carries loss.

- `tokenizer`: the tokenizer's own chat template, a Jinja template whose `{% generation %}`
  blocks mark the answers; transformers maps each block's characters to tokens through the
  tokenizer's offsets (`return_assistant_tokens_mask`).
- `vicuna_v1`: LLaVA-1.5's conversation (`conv_vicuna_v1` in llava/conversation.py):
  `<s>` + system + " " + "USER: question ASSISTANT: answer</s>USER: ...".
- `plain`: LLaVA's stage-1 format (`preprocess_plain`): `<s>`, the image, the caption, "\\n";
  the user's words are dropped.
- `gill`: GILL's raw text, no template: the tokenizer's BOS (OPT's `</s>`), then the turns'
  text as it is, `caption[IMG0]..[IMG7]`; every text token is a label.

The LLaVA formats and GILL's are `SeparatorFormat`s. `ConversationEncoder` tokenizes them as
LLaVA's `tokenizer_image_token` does, the text between images one piece at a time, so they
are written out here as text pieces rather than as Jinja templates.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_MARKER = "<image>"

# conv_vicuna_v1, which LLaVA-1.5 trains with (`--version v1`) and evaluates with
# (`--conv-mode vicuna_v1`); conv_llava_v1's "curious human" variant is not used by v1.5
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class SeparatorFormat:
    """A conversation written as LLaVA's `Conversation.get_prompt` writes one.

    With `roles` (LLaVA's separator style TWO): `system` + `user_sep`, then per turn
    "USER: question" + `user_sep` and "ASSISTANT: answer" + `end`. Without (style PLAIN): a
    user turn is only its images, an answer is followed by `end`, and there is no system
    prompt. `end` None is the tokenizer's EOS token. With `image_first`, a conversation's only
    `<image>`, when it is in the first user turn, moves to that turn's front as "<image>\\n"
    (LLaVA's preprocess_multimodal); conversations with more images keep their order.
    The loss covers each answer and its `end`; with roles, also the space before the answer,
    which SentencePiece joins to the answer's first word. Without roles, `user_text` says what
    becomes of a user turn's words: "dropped" (LLaVA's plain) or "labelled" (kept, and carrying
    loss as the answers do: GILL's LM loss covers the whole caption sequence).
    """

    system: str
    roles: tuple[str, str] | None
    user_sep: str
    end: str | None
    image_first: bool
    user_text: str = "dropped"

    def pieces(self, messages: list[dict], eos_token: str | None,
               add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """The conversation as (text, carries loss) pieces in order. A `system` message
        replaces the default system prompt."""
        end = eos_token if self.end is None else self.end
        if end is None:
            raise ValueError("the format ends answers with the EOS token, and the tokenizer has none")
        system = next((m["content"] for m in messages if m["role"] == "system"), self.system)
        out = [(system + self.user_sep, False)] if self.roles else []
        first_user = next((k for k, m in enumerate(messages) if m["role"] == "user"), None)
        single_image = sum(m["content"].count(IMAGE_MARKER) for m in messages) == 1
        for k, m in enumerate(messages):
            text = m["content"]
            if m["role"] == "user":
                if self.roles is None:
                    labelled = self.user_text == "labelled"
                    out.append((text if labelled else IMAGE_MARKER * text.count(IMAGE_MARKER), labelled))
                    continue
                if self.image_first and single_image and k == first_user and IMAGE_MARKER in text:
                    text = (IMAGE_MARKER + "\n" + text.replace(IMAGE_MARKER, "").strip()).strip()
                out.append((f"{self.roles[0]}: {text}{self.user_sep}", False))
            elif m["role"] == "assistant":
                if self.roles is None:
                    out.append((text + end, True))
                else:
                    out += [(f"{self.roles[1]}:", False), (f" {text}{end}", True)]
        if add_generation_prompt and self.roles:
            out.append((f"{self.roles[1]}:", False))
        return out


VICUNA_V1 = SeparatorFormat(system=VICUNA_SYSTEM, roles=("USER", "ASSISTANT"), user_sep=" ", end=None,
                            image_first=True)
PLAIN = SeparatorFormat(system="", roles=None, user_sep="", end="\n", image_first=False)

# GILL trains on raw `caption[IMG0]..[IMG7]` text and captions after the image, no chat template
GILL = SeparatorFormat(system="", roles=None, user_sep="", end="", image_first=False, user_text="labelled")

FORMATS = {"vicuna_v1": VICUNA_V1, "plain": PLAIN, "gill": GILL}


def chat_template(tokenizer, conversation_format: str) -> str | SeparatorFormat:
    """The format named `conversation_format`, for `ConversationEncoder`: a `SeparatorFormat`
    for `vicuna_v1` and `plain`; for `tokenizer`, the tokenizer's own chat template, checked
    to mark the assistant's tokens."""
    if conversation_format in FORMATS:
        return FORMATS[conversation_format]
    if conversation_format != "tokenizer":
        raise ValueError(f"unknown conversation_format '{conversation_format}'; "
                         f"choose one of tokenizer, {', '.join(FORMATS)}")
    template = tokenizer.chat_template
    if not template:
        raise ValueError("conversation_format 'tokenizer': the tokenizer has no chat template; "
                         "choose vicuna_v1, plain or gill")
    if "{% generation %}" not in template and "{%- generation %}" not in template:
        raise ValueError("conversation_format 'tokenizer': the tokenizer's chat template has no "
                         "{% generation %} blocks, so the assistant's tokens cannot be found from it; "
                         "choose vicuna_v1, or add the blocks to the template")
    return template
