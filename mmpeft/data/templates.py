"""Conversation formats as chat templates whose `{% generation %}` blocks mark the
tokens that carry loss.

The loss mask of every sample comes from these blocks: transformers maps each block's
character span to tokens through the tokenizer's own offsets (`return_assistant_tokens_mask`),
so no format needs length arithmetic that could drift from the real tokenization.

- `tokenizer`: the tokenizer's own chat template; it must have generation blocks.
- `vicuna_v1`: LLaVA-1.5's conversation format ("USER: ... ASSISTANT: ...</s>").
- `plain`: LLaVA's stage-1 format: the image, then the caption and end of sequence;
  the user's words are dropped.
"""

from __future__ import annotations

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

VICUNA_V1 = (
    "{{ '" + VICUNA_SYSTEM.replace("'", "\\'") + "' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ ' USER: ' + message['content'] }}"
    "{% else %}{{ ' ASSISTANT: ' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)

PLAIN = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<image>' if '<image>' in message['content'] else '' }}"
    "{% else %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
)

FORMATS = {"vicuna_v1": VICUNA_V1, "plain": PLAIN}


def chat_template(tokenizer, conversation_format: str) -> str:
    """The template for `conversation_format`; `tokenizer` takes the tokenizer's own and
    checks that it marks the assistant's tokens."""
    if conversation_format in FORMATS:
        return FORMATS[conversation_format]
    if conversation_format != "tokenizer":
        raise ValueError(f"unknown conversation_format '{conversation_format}'; "
                         f"choose one of tokenizer, {', '.join(FORMATS)}")
    template = tokenizer.chat_template
    if not template:
        raise ValueError("conversation_format 'tokenizer': the tokenizer has no chat template; "
                         "choose vicuna_v1 or plain")
    if "{% generation %}" not in template and "{%- generation %}" not in template:
        raise ValueError("conversation_format 'tokenizer': the tokenizer's chat template has no "
                         "{% generation %} blocks, so the assistant's tokens cannot be found from it; "
                         "choose vicuna_v1, or add the blocks to the template")
    return template
