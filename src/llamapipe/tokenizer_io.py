"""The one place that loads tokenizers and turns src/tgt text into token ids.

Training and prediction must encode prompts identically, so both go through here.
"""

from __future__ import annotations

from typing import Any, Union

# What a saved LLaMA tokenizer consists of; stages that pass a model along copy these.
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model", "tokenizer.model")

Text = Union[str, list[str]]


def load_tokenizer(path: str, padding_side: str = "right") -> Any:
    from paddlenlp.transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        # LLaMA sentencepiece models ship without a pad token; id 0 is reserved for it.
        tok.pad_token = tok.convert_ids_to_tokens(0)
    tok.padding_side = padding_side
    return tok


def flatten(text: Text) -> str:
    """PaddleNLP's format allows List(str) (multi-turn); we join turns for a single-turn model."""
    return "\n".join(text) if isinstance(text, list) else text


def encode_prompt(tok: Any, src: Text, src_length: int) -> list[int]:
    """bos + src tokens, truncated to ``src_length`` tokens in all."""
    ids = tok.encode(flatten(src), add_special_tokens=False)["input_ids"]
    return [tok.bos_token_id] + ids[: max(src_length - 1, 0)]


def encode_example(tok: Any, src: Text, tgt: Text, src_length: int, max_length: int) -> dict[str, list[int]]:
    """Prompt + target + eos, labels masked (-100) on the prompt as in PaddleNLP SFT.

    PaddleNLP's LLaMA criterion does not shift, so (like its ``llm/utils/data.py``) we do:
    position i of ``labels`` is the token that follows position i of ``input_ids``.
    """
    prompt = encode_prompt(tok, src, src_length)
    budget = max(max_length - len(prompt) - 1, 0)
    target = tok.encode(flatten(tgt), add_special_tokens=False)["input_ids"][:budget] + [tok.eos_token_id]
    tokens = prompt + target
    labels = [-100] * len(prompt) + target
    return {"input_ids": tokens[:-1], "labels": labels[1:]}


def left_padded_batch(tok: Any, srcs: list[Text], src_length: int) -> dict[str, Any]:
    """Prompts left-padded for decoding: mask 0 on pads, positions count real tokens only."""
    import numpy as np

    prompts = [encode_prompt(tok, s, src_length) for s in srcs]
    width = max(len(p) for p in prompts)
    input_ids = np.full((len(prompts), width), tok.pad_token_id, dtype="int64")
    mask = np.zeros((len(prompts), width), dtype="int64")
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    position_ids = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None).astype("int64")
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}


def decode_generated(tok: Any, ids: Any, eos_token_id: int) -> str:
    """Text of one generated row, cut at the first eos (rows that ended early are padded after it)."""
    ids = [int(t) for t in ids]
    if eos_token_id in ids:
        ids = ids[: ids.index(eos_token_id)]
    return tok.decode(ids, skip_special_tokens=True)


def copy_tokenizer_files(src_dir: Any, dst_dir: Any) -> None:
    import shutil
    from pathlib import Path

    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).exists():
            shutil.copyfile(Path(src_dir) / name, Path(dst_dir) / name)
