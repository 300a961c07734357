"""Prompt/target encoding shared by sft and predict (pure logic, a stand-in tokenizer)."""

from __future__ import annotations

import numpy as np

from llamapipe.core.tokenizer_io import decode_generated, encode_example, encode_prompt, left_padded_batch


class CharTokenizer:
    """One id per character (ord), LLaMA's special ids: pad 0, bos 1, eos 2."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def encode(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i > 2)


def test_labels_are_shifted_and_masked_on_the_prompt():
    tok = CharTokenizer()
    ex = encode_example(tok, "ab", "xy", src_length=8, max_length=16)
    # full sequence: bos a b x y eos ; model sees all but the last, predicts all but the first
    assert ex["input_ids"] == [1, ord("a"), ord("b"), ord("x"), ord("y")]
    assert ex["labels"] == [-100, -100, ord("x"), ord("y"), 2]


def test_prompt_and_target_truncation_keep_eos():
    tok = CharTokenizer()
    assert encode_prompt(tok, "abcdef", src_length=3) == [1, ord("a"), ord("b")]
    ex = encode_example(tok, "abcdef", "uvwxyz", src_length=3, max_length=6)
    seq = ex["input_ids"] + ex["labels"][-1:]
    assert len(seq) == 6 and seq[-1] == 2


def test_list_text_is_joined_turns():
    tok = CharTokenizer()
    assert encode_prompt(tok, ["a", "b"], 8) == [1, ord("a"), ord("\n"), ord("b")]


def test_left_padded_batch_masks_pads_and_counts_positions_from_real_tokens():
    batch = left_padded_batch(CharTokenizer(), ["abc", "a"], src_length=8)
    assert batch["input_ids"].tolist() == [[1, 97, 98, 99], [0, 0, 1, 97]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    assert batch["input_ids"].dtype == np.int64


def test_decode_stops_at_first_eos():
    assert decode_generated(CharTokenizer(), [ord("h"), ord("i"), 2, ord("x"), 0], eos_token_id=2) == "hi"
