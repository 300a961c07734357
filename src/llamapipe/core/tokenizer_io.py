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


class SentencePieceTokenizer:
    """What predict needs of the saved LLaMA tokenizer, on ``sentencepiece`` alone.

    Importing PaddleNLP for its ``LlamaTokenizer`` costs a stage ~3.6 s and ~230 MiB; that
    tokenizer is a sentencepiece model plus special tokens, so this gives the same ids and text
    for what predict does (``encode`` without special tokens, ``decode`` skipping them, with the
    library's default clean-up of spaces before punctuation). A text that holds a special token's
    string (which the library splits out before sentencepiece) goes to the library's tokenizer.
    ``tests/test_predict_fast_path.py`` checks both against PaddleNLP's on the bundled data.
    """

    # PaddleNLP's decode(clean_up_tokenization_spaces=True): English tokenization artifacts
    CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))

    def __init__(self, path: str, padding_side: str = "left"):
        import json
        from pathlib import Path

        import sentencepiece as spm

        d = Path(path)
        model = next((d / n for n in TOKENIZER_FILES if n.endswith(".model") and (d / n).is_file()), None)
        if model is None:
            raise FileNotFoundError(f"no sentencepiece model in {path}")
        self.path = str(d)
        self.sp = spm.SentencePieceProcessor(model_file=str(model))
        specials = json.loads((d / "special_tokens_map.json").read_text(encoding="utf-8"))
        self.special_tokens = {k: (v["content"] if isinstance(v, dict) else v) for k, v in specials.items()
                               if k.endswith("_token") and v}
        self.special_tokens.setdefault("pad_token", self.sp.id_to_piece(0))  # as load_tokenizer sets it
        ids = {k: self.sp.piece_to_id(v) for k, v in self.special_tokens.items()}
        self.bos_token_id, self.eos_token_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_token_id = ids["pad_token"]
        self.special_ids = set(ids.values())
        self.padding_side = padding_side
        self._library = None

    def library(self) -> Any:
        if self._library is None:
            self._library = load_tokenizer(self.path, padding_side=self.padding_side)
        return self._library

    def encode(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        if add_special_tokens or any(s in text for s in self.special_tokens.values()):
            return self.library().encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": self.sp.encode(text)}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if not skip_special_tokens:
            return self.library().decode(ids, skip_special_tokens=False)
        text = self.sp.decode([i for i in ids if i not in self.special_ids])
        for before, after in self.CLEAN_UP:
            text = text.replace(before, after)
        return text


def join_text(text: Text) -> str:
    """PaddleNLP's format allows List(str) (multi-turn); we join turns for a single-turn model."""
    return "\n".join(text) if isinstance(text, list) else text


def encode_prompt(tok: Any, src: Text, src_length: int) -> list[int]:
    """bos + src tokens, truncated to ``src_length`` tokens in all."""
    ids = tok.encode(join_text(src), add_special_tokens=False)["input_ids"]
    return [tok.bos_token_id] + ids[: max(src_length - 1, 0)]


def encode_example(tok: Any, src: Text, tgt: Text, src_length: int, max_length: int) -> dict[str, list[int]]:
    """Prompt + target + eos, labels masked (-100) on the prompt as in PaddleNLP SFT.

    PaddleNLP's LLaMA criterion does not shift, so (like its ``llm/utils/data.py``) we do:
    position i of ``labels`` is the token that follows position i of ``input_ids``.
    """
    prompt = encode_prompt(tok, src, src_length)
    budget = max(max_length - len(prompt) - 1, 0)
    target = tok.encode(join_text(tgt), add_special_tokens=False)["input_ids"][:budget] + [tok.eos_token_id]
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
