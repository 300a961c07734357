"""merge stage on real PaddleNLP checkpoints: LoRA folded into the base, full sharded safetensors, failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_LLAMA
from llamapipe.core import checkpoint_io
from llamapipe.core.errors import PipelineError
from llamapipe.stages import merge
from llamapipe.stages.sft import LORA_TARGET_MODULES

TINY = dict(
    TINY_LLAMA,
    vocab_size=320,
    # a config that needs the guide's fix-up
    use_cache=True,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=3,
)
TOKENS = np.random.RandomState(0).randint(3, TINY["vocab_size"], size=(3, 12)).astype("int64")


def logits(model, tokens=TOKENS) -> np.ndarray:
    import paddle

    model.eval()
    with paddle.no_grad():
        out = model(input_ids=paddle.to_tensor(tokens), return_dict=True)
    return out.logits.astype("float32").numpy()


def assert_guide_config(out: Path, dtype: str) -> dict:
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    assert config["model_type"] == "llama" and config["use_cache"] is False
    assert config["torch_dtype"] == dtype
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert config[key] == TINY[key], key
    return config


class Checkpoints:
    """Built once per module: a saved base model, a LoRA adapter on it, their logits."""

    def __init__(self, root: Path):
        import paddle
        from paddlenlp.peft import LoRAConfig, LoRAModel
        from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

        paddle.seed(7)
        self.base_dir = root / "base"
        model = LlamaForCausalLM(LlamaConfig(**TINY))
        model.save_pretrained(str(self.base_dir))
        self.base_state = {k: v.numpy() for k, v in model.state_dict().items()}
        self.base_logits = logits(model)

        lora = LoRAModel(model, LoRAConfig(
            target_modules=LORA_TARGET_MODULES, r=4, lora_alpha=8, dtype="float32",
            base_model_name_or_path=str(self.base_dir),
        ))
        rng = np.random.RandomState(1)
        n_b = 0
        for name, p in lora.named_parameters():
            if "lora_B" in name:  # B starts at zero; random B makes the adapter change the model
                p.set_value(rng.normal(0, 0.2, p.shape).astype("float32"))
                n_b += 1
        assert n_b == TINY["num_hidden_layers"] * len(LORA_TARGET_MODULES)
        self.lora_dir = root / "lora_sft"
        lora.save_pretrained(str(self.lora_dir))
        self.lora_logits = logits(lora)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return Checkpoints(tmp_path_factory.mktemp("merge"))


def test_lora_merge_equals_the_adapted_model(ckpts, tmp_path, caplog):
    from paddlenlp.transformers import AutoModelForCausalLM

    assert (ckpts.lora_dir / "lora_config.json").exists()
    assert np.abs(ckpts.lora_logits - ckpts.base_logits).max() > 1e-2  # the adapter matters

    out = tmp_path / "merged"
    with caplog.at_level("WARNING", logger="llamapipe.merge"):
        summary = merge.run({"dtype": "float32"}, str(ckpts.lora_dir), str(ckpts.base_dir), str(out))

    assert summary["source"] == "lora"
    assert not [r for r in caplog.records if r.name == "llamapipe.merge"]  # nothing non-zero dropped
    state = checkpoint_io.load_state_dict(str(out))
    assert sorted(state) == sorted(ckpts.base_state)  # no LoRA leftovers, nothing missing
    assert summary["tensors"] == len(state)
    assert summary["parameters"] == sum(v.size for v in ckpts.base_state.values())
    for k, v in state.items():
        assert v.shape == ckpts.base_state[k].shape and v.dtype == ckpts.base_state[k].dtype, k
    assert not np.array_equal(state["llama.layers.0.self_attn.q_proj.weight"],
                              ckpts.base_state["llama.layers.0.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(state["llama.embed_tokens.weight"], ckpts.base_state["llama.embed_tokens.weight"])

    config = assert_guide_config(out, "float32")
    assert {"use_cache", "bos_token_id", "eos_token_id", "pad_token_id"} <= set(summary["config_fixed_fields"])
    assert json.loads((out / "merge_summary.json").read_text()) == summary
    assert config["vocab_size"] == TINY["vocab_size"]

    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype="float32")
    got = logits(merged)
    np.testing.assert_allclose(got, ckpts.lora_logits, atol=1e-5, rtol=1e-5)
    assert np.abs(got - ckpts.base_logits).max() > 1e-2


def test_full_sharded_safetensors_become_one_pdparams(ckpts, tmp_path):
    import paddle
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    paddle.seed(11)
    sft = tmp_path / "full_sft"
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    model.save_pretrained(str(sft), safe_serialization=True, max_shard_size="20KB")
    shards = sorted(p.name for p in sft.glob("*.safetensors"))
    assert (sft / "model.safetensors.index.json").exists() and len(shards) > 1, shards
    (sft / "tokenizer_config.json").write_text("{}")
    source = {k: v.numpy() for k, v in model.state_dict().items()}

    out = tmp_path / "merged"
    summary = merge.run({"dtype": "float16"}, str(sft), str(ckpts.base_dir), str(out))

    assert summary["source"] == "full" and summary["tensors"] == len(source)
    weights = sorted(p.name for p in out.iterdir() if "safetensors" in p.name or "pdparams" in p.name)
    assert weights == ["model_state.pdparams"]
    assert (out / "tokenizer_config.json").read_text() == "{}"
    state = paddle.load(str(out / "model_state.pdparams"), return_numpy=True)
    assert sorted(state) == sorted(source)
    for k, v in source.items():
        np.testing.assert_array_equal(np.asarray(state[k]), v, err_msg=k)
    assert_guide_config(out, "float16")


def test_failure_leaves_no_output_and_no_temp_dirs(ckpts, tmp_path):
    sft = tmp_path / "empty_sft"
    sft.mkdir()
    (sft / "config.json").write_text((ckpts.base_dir / "config.json").read_text())
    out = tmp_path / "results" / "merged"
    with pytest.raises(PipelineError, match="no model weights"):
        merge.run({"dtype": "float32"}, str(sft), str(ckpts.base_dir), str(out))
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty_sft"]


def test_failure_keeps_a_previous_output_intact(ckpts, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model_state.pdparams").write_bytes(b"previous run")
    (tmp_path / "missing_weights").mkdir()
    with pytest.raises(PipelineError):
        merge.run({"dtype": "float32"}, str(tmp_path / "missing_weights"), str(ckpts.base_dir), str(out))
    assert [p.name for p in out.iterdir()] == ["model_state.pdparams"]
    assert (out / "model_state.pdparams").read_bytes() == b"previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "missing_weights"]
