"""GILL's input format on OPT's tokenizer conventions (the OPT-6.7B stand-in's: GPT-2's BPE
with OPT's special tokens), against references written by hand from GILL's data pipeline:
the caption as raw text after OPT's `</s>` BOS, then `[IMG0]`..`[IMG7]`; no chat template."""

import pytest

from mmpeft.data.conversation import ConversationEncoder, Sample
from mmpeft.data.stories import caption_voken_sample
from mmpeft.data.templates import chat_template
from mmpeft.models.vokens import voken_names
from mmpeft.standins.opt import opt_tokenizer

K = 4  # image input tokens


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    tokenizer = opt_tokenizer(tmp_path_factory.mktemp("opt"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *voken_names(8)]})
    return tokenizer


def _encoder(opt):
    return ConversationEncoder(opt, None, chat_template(opt, "gill"), "<image>", K, 48)


def test_opt_conventions(opt):
    assert opt("A dog")["input_ids"][0] == 2  # "</s>" leads every text
    assert (opt.pad_token_id, opt.eos_token_id, opt.convert_tokens_to_ids("<s>"), opt.unk_token) == (1, 2, 0, "</s>")
    # the first added token lands on row 50,265, inside OPT's 50,272 padded rows
    assert opt.convert_tokens_to_ids(["<image>", "[IMG0]", "[IMG7]"]) == [50265, 50266, 50273]
    # GPT-2's merges: "Ġthe" is one token (GPT-2's 262, here shifted past OPT's four specials)
    assert opt.convert_tokens_to_ids("Ġthe") == 262 + 4


def test_image_pass_is_bos_caption_then_img_tokens_every_token_a_label(opt):
    sample = caption_voken_sample("p1", "x.jpg", "A dog on the grass", "{caption}").sample
    enc = _encoder(opt).encode_text(sample)
    img = list(range(50266, 50274))
    pieces = ["A", "Ġdog", "Ġon", "Ġthe", "Ġgrass"]  # GPT-2 BPE, no leading space on the first word
    assert enc["input_ids"] == [2, *opt.convert_tokens_to_ids(pieces), *img]
    assert enc["labels"] == [-100, *opt.convert_tokens_to_ids(pieces), *img]


def test_captioning_pass_is_bos_image_slots_then_caption(opt):
    sample = Sample("c1", [{"role": "user", "content": "<image>"},
                           {"role": "assistant", "content": "A dog on the grass"}], ["x.jpg"])
    enc = _encoder(opt).encode_text(sample)
    caption = opt.convert_tokens_to_ids(["A", "Ġdog", "Ġon", "Ġthe", "Ġgrass"])
    assert enc["input_ids"] == [2, *[50265] * K, *caption]
    assert enc["labels"] == [-100, *[-100] * K, *caption]
