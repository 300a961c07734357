"""checkpoint_io: every weight layout reads back exactly, TP ranks re-join, config fix-up (real Paddle)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_LLAMA
from llamapipe.core import checkpoint_io
from llamapipe.core.errors import PipelineError

TINY = TINY_LLAMA


class Tiny:
    """One tiny LLaMA built once per module: its config, saved dir and numpy state dict."""

    def __init__(self, root: Path):
        import paddle
        from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

        self.paddle = paddle
        paddle.seed(1234)
        self.config = LlamaConfig(**TINY)
        model = LlamaForCausalLM(self.config)
        self.saved = root / "tiny"
        model.save_pretrained(str(self.saved))
        self.state = {k: v.numpy() for k, v in model.state_dict().items()}

    def save_pdparams(self, state: dict, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.paddle.save({k: self.paddle.to_tensor(v) for k, v in state.items()}, str(path))

    def shards(self, n: int) -> list[dict]:
        names = sorted(self.state)
        return [{k: self.state[k] for k in names[i::n]} for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("tiny"))


def assert_same_state(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def write_index(path: Path, weight_map: dict) -> None:
    path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def test_single_pdparams_from_save_pretrained(tiny):
    assert (tiny.saved / "model_state.pdparams").exists()
    assert_same_state(checkpoint_io.load_state_dict(str(tiny.saved)), tiny.state)


def test_sharded_pdparams_with_index(tiny, tmp_path):
    weight_map = {}
    for i, shard in enumerate(tiny.shards(3), start=1):
        name = f"model_state-{i:05d}-of-00003.pdparams"
        tiny.save_pdparams(shard, tmp_path / name)
        weight_map.update(dict.fromkeys(shard, name))
    write_index(tmp_path / "model_state.pdparams.index.json", weight_map)
    assert_same_state(checkpoint_io.load_state_dict(str(tmp_path)), tiny.state)


def test_single_safetensors(tiny, tmp_path):
    from safetensors.numpy import save_file

    save_file(tiny.state, str(tmp_path / "model.safetensors"), metadata={"format": "np"})
    assert_same_state(checkpoint_io.load_state_dict(str(tmp_path)), tiny.state)


def test_sharded_safetensors_with_index(tiny, tmp_path):
    from safetensors.numpy import save_file

    weight_map = {}
    for i, shard in enumerate(tiny.shards(2), start=1):
        name = f"model-{i:05d}-of-00002.safetensors"
        save_file(shard, str(tmp_path / name), metadata={"format": "np"})
        weight_map.update(dict.fromkeys(shard, name))
    write_index(tmp_path / "model.safetensors.index.json", weight_map)
    assert_same_state(checkpoint_io.load_state_dict(str(tmp_path)), tiny.state)


def test_index_naming_an_absent_tensor_fails_naming_the_index(tiny, tmp_path):
    from safetensors.numpy import save_file

    save_file(tiny.state, str(tmp_path / "model-00001-of-00001.safetensors"))
    weight_map = dict.fromkeys(tiny.state, "model-00001-of-00001.safetensors")
    weight_map["llama.layers.9.ghost.weight"] = "model-00001-of-00001.safetensors"
    write_index(tmp_path / "model.safetensors.index.json", weight_map)
    with pytest.raises(PipelineError, match=r"model\.safetensors\.index\.json.*ghost"):
        checkpoint_io.load_state_dict(str(tmp_path))


def test_empty_dir_is_a_pipeline_error(tmp_path):
    with pytest.raises(PipelineError, match="no model weights"):
        checkpoint_io.load_state_dict(str(tmp_path))


def test_tensor_parallel_ranks_rejoin_to_the_original(tiny, tmp_path):
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    ranks = []
    for rank in range(2):
        cfg = LlamaConfig(**TINY, tensor_parallel_degree=2, tensor_parallel_rank=rank)
        actions = LlamaForCausalLM._get_tensor_parallel_mappings(cfg, is_split=True)
        shard = {}
        for name, value in tiny.state.items():
            key = name[len("llama."):] if name.startswith("llama.") else name
            shard[name] = np.ascontiguousarray(actions[key](value)) if key in actions else value
        tiny.save_pdparams(shard, tmp_path / f"model_state.tp{rank:02d}.pdparams")
        ranks.append(shard)
    tiny.config.save_pretrained(str(tmp_path))

    # The ranks really are halves: column-parallel splits the output dim, row-parallel the input dim.
    q, o = "llama.layers.0.self_attn.q_proj.weight", "llama.layers.0.self_attn.o_proj.weight"
    assert ranks[0][q].shape == (32, 16) and ranks[0][o].shape == (16, 32)
    assert ranks[0]["lm_head.weight"].shape == (32, 200)
    assert ranks[0]["llama.embed_tokens.weight"].shape == (200, 32)
    assert not np.array_equal(ranks[0][q], ranks[1][q])
    assert ranks[0]["llama.norm.weight"].shape == (32,)  # replicated, not split

    merged = checkpoint_io.load_state_dict(str(tmp_path))
    assert_same_state(merged, tiny.state)
    for name in (q, o, "llama.layers.1.mlp.gate_proj.weight", "llama.layers.1.mlp.down_proj.weight",
                 "lm_head.weight", "llama.embed_tokens.weight"):
        assert merged[name].shape != ranks[0][name].shape
        np.testing.assert_array_equal(merged[name], tiny.state[name])


def test_save_merged_round_trips(tiny, tmp_path):
    path = checkpoint_io.save_merged(tiny.state, tmp_path)
    assert path == tmp_path / "model_state.pdparams"
    assert_same_state(checkpoint_io.load_state_dict(str(tmp_path)), tiny.state)


def test_fix_config_applies_guide_fields_and_keeps_shape(tiny):
    config = json.loads((tiny.saved / "config.json").read_text())
    config.update(architectures=["LlamaModel"], bos_token_id=0, eos_token_id=0, pad_token_id=-1,
                  use_cache=True, model_type="llama2")
    original = json.loads(json.dumps(config))
    fixed = checkpoint_io.fix_config(config, "float16")

    assert config == original  # input not mutated
    assert fixed["architectures"] == ["LlamaForCausalLM"]
    assert (fixed["bos_token_id"], fixed["eos_token_id"], fixed["pad_token_id"]) == (1, 2, 0)
    assert fixed["model_type"] == "llama"
    assert fixed["use_cache"] is False
    assert fixed["torch_dtype"] == "float16" and fixed["dtype"] == "float16"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta"):
        assert fixed[key] == original[key], key
    assert set(original) <= set(fixed)


def test_missing_directory_and_missing_shard_are_named(tmp_path):
    import json

    from llamapipe.core.checkpoint_io import load_state_dict
    from llamapipe.core.errors import PipelineError

    with pytest.raises(PipelineError, match="does not exist"):
        load_state_dict(str(tmp_path / "nope"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(PipelineError, match="model-00001-of-00002.safetensors"):
        load_state_dict(str(tmp_path))
