"""LLaVA-1.5's formats on the real Llama-2 vocabulary, against references written by hand
from LLaVA's code (conv_vicuna_v1, preprocess_multimodal, tokenizer_image_token,
preprocess_v1, preprocess_plain), not from our encoder: the text between images is
tokenized one piece at a time, `<s>` only in front of the first, the image between."""

import pytest

from mmpeft.data.conversation import BadRecord, ConversationEncoder, Sample
from mmpeft.data.templates import chat_template
from mmpeft.standins.tokenizers import llama2_tokenizer

N = 3  # image tokens per image
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# Llama-2 ids, written out: "▁Red" "." "</s>" / "▁Top" "▁left" "." "</s>" / "▁Hi" "." "</s>"
RED, TOP_LEFT, HI = [4367, 29889, 2], [7488, 2175, 29889, 2], [6324, 29889, 2]
END_USER = [2, 11889, 29901]  # "</s>" "USER" ":" -- no "▁" after "</s>"


@pytest.fixture(scope="module")
def llama():
    tokenizer = llama2_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def _ids(llama, text):
    """One piece as `tokenizer_image_token` tokenizes it, without the `<s>` it drops."""
    return llama(text, add_special_tokens=False)["input_ids"]


def _encoder(llama, fmt):
    return ConversationEncoder(llama, None, chat_template(llama, fmt), "<image>", N, 2048)


def test_llama2_ids_at_the_turn_boundaries(llama):
    assert llama("Hello")["input_ids"] == [1, 15043]
    assert _ids(llama, "USER:") == [3148, 1001, 29901]  # "▁US" "ER" ":" at the start of a piece
    assert _ids(llama, "</s>USER:") == END_USER
    assert _ids(llama, " ASSISTANT:") == [319, 1799, 9047, 13566, 29901]
    assert _ids(llama, "\nWhat") == [29871, 13, 5618]  # the dummy prefix "▁", then the newline
    assert _ids(llama, "A red circle.\n") == [319, 2654, 8607, 29889, 13]
    assert llama.convert_tokens_to_ids("<image>") == 32000


def test_single_turn_image_before_the_question(llama):
    image = llama.convert_tokens_to_ids("<image>")
    sample = Sample("s1", [{"role": "user", "content": "<image>\nWhat colour is the circle?"},
                           {"role": "assistant", "content": "Red."}], ["x.jpg"])
    enc = _encoder(llama, "vicuna_v1").encode_text(sample)
    before = [1] + _ids(llama, SYSTEM + " USER: ") + [image] * N
    after = _ids(llama, "\nWhat colour is the circle? ASSISTANT: Red.</s>")
    assert after == _ids(llama, "\nWhat colour is the circle? ASSISTANT:") + RED
    assert enc["input_ids"] == before + after
    assert enc["labels"] == [-100] * (len(before) + len(after) - 3) + RED
    assert enc["input_ids"].count(1) == 1 and enc["input_ids"][0] == 1


def test_two_turns_have_no_space_between_the_end_token_and_the_next_user_turn(llama):
    image = llama.convert_tokens_to_ids("<image>")
    sample = Sample("s2", [{"role": "user", "content": "<image>\nWhat colour is the circle?"},
                           {"role": "assistant", "content": "Red."},
                           {"role": "user", "content": "Where is it?"},
                           {"role": "assistant", "content": "Top left."}], ["x.jpg"])
    enc = _encoder(llama, "vicuna_v1").encode_text(sample)
    head = [1] + _ids(llama, SYSTEM + " USER: ") + [image] * N + _ids(llama, "\nWhat colour is the circle? ASSISTANT:")
    middle = END_USER[1:] + _ids(llama, " Where is it? ASSISTANT:")
    assert enc["input_ids"] == head + RED + middle + TOP_LEFT
    # the same as LLaVA's one call on the text after the image
    assert enc["input_ids"][len(head) - len(_ids(llama, "\nWhat colour is the circle? ASSISTANT:")):] == _ids(
        llama, "\nWhat colour is the circle? ASSISTANT: Red.</s>USER: Where is it? ASSISTANT: Top left.</s>")
    assert enc["labels"] == [-100] * len(head) + RED + [-100] * len(middle) + TOP_LEFT
    k = enc["input_ids"].index(2)
    assert enc["input_ids"][k - 1:k + 3] == [29889, 2, 11889, 29901]  # ".</s>USER:"
    assert 29871 not in enc["input_ids"][k:k + 3]


def test_image_after_the_question_moves_to_its_front(llama):
    image = llama.convert_tokens_to_ids("<image>")
    sample = Sample("s3", [{"role": "user", "content": "What colour is the circle?\n<image>"},
                           {"role": "assistant", "content": "Red."}], ["x.jpg"])
    enc = _encoder(llama, "vicuna_v1").encode_text(sample)
    expected = ([1] + _ids(llama, SYSTEM + " USER: ") + [image] * N
                + _ids(llama, "\nWhat colour is the circle? ASSISTANT:") + RED)
    assert enc["input_ids"] == expected
    assert enc["labels"] == [-100] * (len(expected) - 3) + RED


def test_text_only_record_is_one_piece_after_bos(llama):
    sample = Sample("s4", [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}], [])
    enc = _encoder(llama, "vicuna_v1").encode_text(sample)
    expected = llama(SYSTEM + " USER: Hello? ASSISTANT: Hi.</s>")["input_ids"]  # preprocess_v1 without an image
    assert expected[0] == 1 and expected[-3:] == HI
    assert enc["input_ids"] == expected
    assert enc["labels"] == [-100] * (len(expected) - 3) + HI


def test_generation_prompt_ends_with_the_assistant_cue(llama):
    image = llama.convert_tokens_to_ids("<image>")
    sample = Sample("s5", [{"role": "user", "content": "<image>\nWhat colour is the circle?"}], ["x.jpg"])
    ids = _encoder(llama, "vicuna_v1").encode_prompt(sample)
    assert ids == ([1] + _ids(llama, SYSTEM + " USER: ") + [image] * N
                   + _ids(llama, "\nWhat colour is the circle? ASSISTANT:"))
    assert ids[-5:] == [319, 1799, 9047, 13566, 29901]


def test_plain_is_bos_image_caption_and_newline(llama):
    image = llama.convert_tokens_to_ids("<image>")
    sample = Sample("c1", [{"role": "user", "content": "Describe it.<image>"},
                           {"role": "assistant", "content": "A red circle."}], ["x.jpg"])
    enc = _encoder(llama, "plain").encode_text(sample)
    caption = [319, 2654, 8607, 29889, 13]  # "▁A" "▁red" "▁circle" "." "\n" -- no "</s>"
    assert enc["input_ids"] == [1] + [image] * N + caption
    assert enc["labels"] == [-100] * (1 + N) + caption


def test_a_system_message_replaces_the_default_prompt_and_turns_must_alternate(llama):
    sample = Sample("s6", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"},
                           {"role": "assistant", "content": "Hi."}], [])
    enc = _encoder(llama, "vicuna_v1").encode_text(sample)
    assert enc["input_ids"] == llama("Be brief. USER: Hello? ASSISTANT: Hi.</s>")["input_ids"]
    twice = Sample("s7", [{"role": "user", "content": "Hello?"}, {"role": "user", "content": "Anyone?"},
                          {"role": "assistant", "content": "Hi."}], [])
    with pytest.raises(BadRecord, match="record s7: turns must alternate") as err:
        _encoder(llama, "vicuna_v1").encode_text(twice)
    assert err.value.kind == "turn order"


def test_two_images_keep_their_places_and_each_piece_is_tokenized_alone(llama):
    image = llama.convert_tokens_to_ids("<image>")
    sample = Sample("s8", [{"role": "user", "content": "First <image>\nthen <image>\nWhich?"},
                           {"role": "assistant", "content": "Red."}], ["a.jpg", "b.jpg"])
    encoder = _encoder(llama, "vicuna_v1")
    pieces = [_ids(llama, SYSTEM + " USER: First "), _ids(llama, "\nthen "), _ids(llama, "\nWhich? ASSISTANT:")]
    assert pieces[1][0] == 29871  # each piece after an image starts with the dummy prefix "▁"
    assert encoder.token_ids(sample) == [1] + pieces[0] + [image] + pieces[1] + [image] + pieces[2] + RED
    enc = encoder.encode_text(sample)
    assert enc["input_ids"] == [1] + pieces[0] + [image] * N + pieces[1] + [image] * N + pieces[2] + RED
    assert enc["labels"] == [-100] * (len(enc["labels"]) - 3) + RED
