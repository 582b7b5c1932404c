"""Tokenizers of the tiny zoo, trained on the world's text with the `tokenizers` library.

The LM tokenizer is byte-level BPE (any text encodes, not just the world's words) with a
ChatML chat template whose `{% generation %}` markers let transformers and TRL find the
assistant tokens. The CLIP tokenizer is a real `CLIPTokenizer` built from a BPE vocabulary
trained with CLIP's own normalisation and word-end suffix.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer, PreTrainedTokenizerFast

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|pad|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_lm_tokenizer(texts: Iterable[str], vocab_size: int = 640) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ChatML specials; `<|im_end|>` ends turns and is the EOS token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=PAD,
        additional_special_tokens=[IM_START], chat_template=CHAT_TEMPLATE,
        model_max_length=512, padding_side="right",
    )


def train_clip_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> CLIPTokenizer:
    """A `CLIPTokenizer` whose merges were learned on the world's captions."""
    reference = CLIPTokenizer()  # empty vocabulary, but CLIP's normaliser and pre-tokeniser
    backend = reference.backend_tokenizer
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.normalizer = backend.normalizer
    tok.pre_tokenizer = backend.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # the trained merges are reachable only through the tokenizer's JSON form
    merges = [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    return CLIPTokenizer(vocab=_fixed_ids(tok.get_vocab(), trainer.special_tokens), merges=merges,
                         model_max_length=77)


def _fixed_ids(vocab: dict[str, int], specials) -> dict[str, int]:
    """The same tokens numbered by a fixed rule: the special tokens in their order, then
    every other token in string order. The BPE trainer numbers the word-final characters it
    meets (`k</w>`, `,</w>`) in hash-map order, which changes from one run to the next, and
    so does the order of merges whose counts tie (`o n</w>`, `o f</w>`); the ids pick CLIP's
    embedding rows, so with them the same seed trained a different CLIP in every build."""
    specials = [s.content for s in specials]
    return {t: i for i, t in enumerate(specials + sorted(set(vocab) - set(specials)))}
