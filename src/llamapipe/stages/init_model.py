"""init_model (cpu): a tiny randomly initialised LLaMA and a tokenizer trained on the training text.

Saved with PaddleNLP's own ``save_pretrained`` so every later stage loads it exactly like a
hub checkpoint (``LlamaForCausalLM.from_pretrained(dir)``).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

from llamapipe.core.atomic import atomic_dir
from llamapipe.core.checkpoint_io import BASE_MODEL_POINTER
from llamapipe.core.errors import PipelineError
from llamapipe.core.tokenizer_io import join_text

log = logging.getLogger("llamapipe.init_model")


# LLaMA-2's conventions: pad/bos/eos/unk ids 0/1/2/3 (config.json fix-up of the guide relies on them).
SPECIAL_IDS = {"pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3}


def _write_corpus(train_file: str, out: Path) -> int:
    n = 0
    with open(train_file, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for line in src:
            rec = json.loads(line)
            dst.write(join_text(rec["src"]) + "\n" + join_text(rec["tgt"]) + "\n")
            n += 1
    return n


def train_sentencepiece(corpus: Path, prefix: Path, vocab_size: int, seed: int) -> int:
    """Train a byte-fallback BPE model; if the corpus cannot fill ``vocab_size``, use the largest it can."""
    import sentencepiece as spm

    def _train(size: int) -> None:
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(prefix),
            vocab_size=size,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            num_threads=1,  # one thread: the same corpus gives the same pieces every run
            minloglevel=2,
            normalization_rule_name="identity",  # keep full-width punctuation as the references have it
            **SPECIAL_IDS,
        )

    try:
        _train(vocab_size)
        fitted = vocab_size
    except RuntimeError as exc:
        found = re.search(r"<= (\d+)", str(exc))
        if "too high" not in str(exc) or not found:
            raise PipelineError(f"sentencepiece training failed: {exc}") from exc
        fitted = int(found.group(1))
        log.warning("corpus supports at most %d pieces; vocab_size %d lowered to %d", fitted, vocab_size, fitted)
        _train(fitted)
    _drop_training_paths(prefix.with_suffix(".model"))
    return fitted


def _drop_training_paths(model_file: Path) -> None:
    """The trained model records its corpus and output paths (a fresh temp dir each run): keep
    only their names, so the same corpus gives a byte-identical tokenizer file every run."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    spec = proto.trainer_spec
    spec.input[:] = [Path(p).name for p in spec.input]
    spec.model_prefix = Path(spec.model_prefix).name
    model_file.write_bytes(proto.SerializeToString())


def write_base_pointer(model_name_or_path: str, out_dir: str) -> dict[str, Any]:
    """npu: the base model is a named hub model that upstream's scripts load themselves; record
    which one (merge and provenance read it) instead of copying 26 GB of weights."""
    summary = {"model_name_or_path": model_name_or_path, "weights": "loaded by upstream from the name"}
    with atomic_dir(out_dir) as tmp:
        (tmp / BASE_MODEL_POINTER).write_text(json.dumps(summary, indent=2) + "\n")
    log.info("base model %s (named, not built) -> %s", model_name_or_path, out_dir)
    return summary


def run(params: dict[str, Any], train_file: str, out_dir: str, seed: int) -> dict[str, Any]:
    if "model_name_or_path" in params:
        return write_base_pointer(params["model_name_or_path"], out_dir)
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    from llamapipe.core.paddle_env import seed_everything

    with atomic_dir(out_dir) as tmp, tempfile.TemporaryDirectory() as work:
        corpus = Path(work) / "corpus.txt"
        records = _write_corpus(train_file, corpus)
        vocab = train_sentencepiece(corpus, Path(work) / "spm", params["vocab_size"], seed)
        tok = LlamaTokenizer(vocab_file=str(Path(work) / "spm.model"))
        tok.pad_token = tok.convert_ids_to_tokens(SPECIAL_IDS["pad_id"])
        tok.save_pretrained(str(tmp))

        seed_everything(seed)
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=params["hidden_size"],
            intermediate_size=params["intermediate_size"],
            num_hidden_layers=params["num_hidden_layers"],
            num_attention_heads=params["num_attention_heads"],
            num_key_value_heads=params.get("num_key_value_heads") or params["num_attention_heads"],
            max_position_embeddings=params["max_position_embeddings"],
            rms_norm_eps=1e-5,
            pad_token_id=SPECIAL_IDS["pad_id"],
            bos_token_id=SPECIAL_IDS["bos_id"],
            eos_token_id=SPECIAL_IDS["eos_id"],
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
        model.save_pretrained(str(tmp))
        n_params = sum(int(p.size) for p in model.parameters())
        summary = {"vocab_size": vocab, "parameters": n_params, "tokenizer_corpus_records": records}
        (tmp / "init_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("tiny LLaMA: %d parameters, vocab %d -> %s", n_params, vocab, out_dir)
    return summary
