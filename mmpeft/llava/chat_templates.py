"""The chat template a LLaVA export carries, so that `processor.apply_chat_template`,
transformers' image-text-to-text pipeline and OpenAI-compatible servers prompt the model
with the text it was trained on.

Training renders messages whose content is a string with `<image>` where an image goes.
Inference clients send typed content instead: `[{"type": "image"}, {"type": "text",
"text": ...}]`. Every exported template therefore opens with `TYPED_CONTENT`, which
rewrites typed content as the string training saw (an image part as "<image>\\n", as the
encoder puts the image before the question; a text part as its text; string content
unchanged), and then renders the conversation in the run's `conversation_format`:

- `tokenizer`: the LM's own template, unchanged, its `{% generation %}` blocks kept (so a
  run can train on top of the export with `conversation_format: tokenizer`);
- `vicuna_v1` and `plain`: the `SeparatorFormat` written as Jinja by `separator_template`,
  the answers inside `{% generation %}` blocks that cover what the format's loss covers.
"""

from __future__ import annotations

from mmpeft.data.templates import FORMATS, IMAGE_MARKER, SeparatorFormat

# one line, no whitespace control: it adds nothing to the output and strips nothing from
# the template that follows it
TYPED_CONTENT = (
    "{% set typed = namespace(messages=[]) %}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}"
    "{% set typed.messages = typed.messages + [message] %}"
    "{% else %}"
    "{% set text = namespace(value='') %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] in ['image', 'image_url'] %}{% set text.value = text.value + '<image>\\n' %}"
    "{% elif part['type'] == 'text' %}{% set text.value = text.value + part['text'] %}"
    "{% endif %}"
    "{% endfor %}"
    "{% set typed.messages = typed.messages + [dict(message, content=text.value)] %}"
    "{% endif %}"
    "{% endfor %}"
    "{% set messages = typed.messages %}"
)


def _literal(text: str) -> str:
    """`text` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def separator_template(fmt: SeparatorFormat) -> str:
    """`fmt` as a Jinja chat template over string content: the text `fmt.pieces` writes,
    with `eos_token` where the format ends answers with the EOS token. A `system` message
    replaces the default system prompt; with `image_first`, a conversation's only image,
    when it is in the first user turn, moves to that turn's front as "<image>\\n"."""
    end = "eos_token" if fmt.end is None else _literal(fmt.end)
    marker = _literal(IMAGE_MARKER)
    if fmt.roles is None:  # LLaVA's PLAIN style: a user turn is only its images, no system prompt
        return (
            "{% for message in messages %}"
            f"{{% if message['role'] == 'user' %}}{{{{ {marker} * message['content'].count({marker}) }}}}"
            f"{{% elif message['role'] == 'assistant' %}}{{% generation %}}{{{{ message['content'] + {end} }}}}"
            "{% endgeneration %}"
            "{% endif %}"
            "{% endfor %}"
        )
    user, cue, sep = _literal(fmt.roles[0] + ": "), _literal(fmt.roles[1] + ":"), _literal(fmt.user_sep)
    image_line = _literal(IMAGE_MARKER + "\n")
    moves_image = (
        "{% set count = namespace(images=0, first_user=-1) %}"
        "{% for message in messages %}"
        f"{{% set count.images = count.images + message['content'].count({marker}) %}}"
        "{% if message['role'] == 'user' and count.first_user < 0 %}{% set count.first_user = loop.index0 %}"
        "{% endif %}"
        "{% endfor %}"
    ) if fmt.image_first else "{% set count = namespace(images=0, first_user=-1) %}"
    return (
        f"{{% set system = namespace(text={_literal(fmt.system)}) %}}"
        "{% for message in messages %}{% if message['role'] == 'system' and loop.first %}"
        "{% set system.text = message['content'] %}{% endif %}{% endfor %}"
        + moves_image +
        f"{{{{ system.text + {sep} }}}}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        "{% set text = message['content'] %}"
        f"{{% if count.images == 1 and loop.index0 == count.first_user and {marker} in text %}}"
        f"{{% set text = ({image_line} + text.replace({marker}, '').strip()).strip() %}}"
        "{% endif %}"
        f"{{{{ {user} + text + {sep} }}}}"
        "{% elif message['role'] == 'assistant' %}"
        f"{{{{ {cue} }}}}"
        f"{{% generation %}}{{{{ ' ' + message['content'] + {end} }}}}{{% endgeneration %}}"
        "{% endif %}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ {cue} }}}}{{% endif %}}"
    )


def export_chat_template(conversation_format: str, lm_template: str | None) -> str:
    """The template an export carries for a run trained with `conversation_format`
    (`lm_template`: the LM tokenizer's own, which the `tokenizer` format trained with)."""
    if conversation_format in FORMATS:
        return TYPED_CONTENT + separator_template(FORMATS[conversation_format])
    if conversation_format != "tokenizer":
        raise ValueError(f"unknown conversation_format '{conversation_format}'; "
                         f"expected tokenizer or one of {', '.join(FORMATS)}")
    if not lm_template:
        raise ValueError("conversation_format 'tokenizer', but the run's tokenizer has no chat template")
    # an export of a run that itself started from an export already carries the preamble
    return lm_template if lm_template.startswith(TYPED_CONTENT) else TYPED_CONTENT + lm_template
