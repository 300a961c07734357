"""Cross-field config rules (llamapipe.config.rules): each holds on a good config, and a broken
one is refused by ``resolve`` with a message that names the keys and their values."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import pytest
import yaml

from conftest import ROOT
from llamapipe.config import deep_merge, load, resolve
from llamapipe.config import rules as config_rules
from llamapipe.core.errors import PipelineError

RAW = yaml.safe_load((ROOT / "config.yaml").read_text())
MULTI_NODE = {"nodes": 2, "master": "10.0.0.1:8090", "ips": "10.0.0.1,10.0.0.2", "node_launcher": "srun"}
SEVEN_B_ON_FOUR = {"model_name_or_path": "meta-llama/Llama-2-7b", "parallel": {"tensor_parallel_degree": 4}}


@pytest.fixture(autouse=True)
def in_project_dir(monkeypatch):
    """config.yaml's data.url is file:assets/...: relative to the project, as Snakemake runs."""
    monkeypatch.chdir(ROOT)


def _config(tmp_path, over: dict) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(deep_merge(RAW, over), allow_unicode=True))
    return str(path)


def problems(tmp_path, **over) -> list[str]:
    """What resolve refuses in config.yaml with nested overrides; [] when it resolves."""
    try:
        load(_config(tmp_path, over))
    except PipelineError as err:
        return str(err).splitlines()
    return []


def refused(tmp_path, **over) -> str:
    found = problems(tmp_path, **over)
    assert found, f"{over} was accepted"
    return "\n".join(found)


def _tar(path, members=("train.json", "dev.json")):
    with tarfile.open(path, "w:gz") as tf:
        for name in members:
            data = b"{}\n"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


# --- the shipped configs -----------------------------------------------------------------------


@pytest.mark.parametrize("over", [{}, {"target": "npu"}, {"target": "npu", "rehearsal": "cpu"},
                                  {"target": "npu", "rehearsal": "cpu", "sft": {"lora": True}},
                                  {"target": "npu", "npu": {"sft": {"lora": True}}}])
def test_shipped_configs_pass_every_rule(tmp_path, over):
    assert problems(tmp_path, **over) == []
    assert config_rules.check(load(_config(tmp_path, over))) == []


def test_every_problem_is_listed_at_once(tmp_path):
    found = problems(tmp_path, model={"hidden_size": 130}, sft={"save_steps": 5000},
                     data={"url": "file:assets/missing.tar.gz"})
    assert len(found) == 3
    assert any("model.hidden_size" in p for p in found)
    assert any("sft.save_steps" in p for p in found)
    assert any("data.url" in p for p in found)


def test_every_rule_says_what_it_protects():
    for rule in config_rules.RULES:
        assert rule.__doc__, f"{rule.__name__}: say what breaks downstream without it"


def test_rules_import_without_paddle():
    code = "import sys, llamapipe.config; assert not any(m.startswith('paddle') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --- target ------------------------------------------------------------------------------------


def test_rehearsal_needs_the_npu_target(tmp_path):
    message = refused(tmp_path, rehearsal="cpu")
    assert "rehearsal (cpu)" in message and "target=npu" in message


def test_pretrain_needs_the_npu_target(tmp_path):
    assert "npu.pretrain.enabled needs target: npu" in refused(tmp_path, npu={"pretrain": {"enabled": True}})
    assert problems(tmp_path, target="npu", npu={"pretrain": {"enabled": True}}) == []


# --- model shape -------------------------------------------------------------------------------


def test_hidden_size_must_split_into_heads(tmp_path):
    message = refused(tmp_path, model={"hidden_size": 130})
    assert "model.hidden_size (130) is not a multiple of model.num_attention_heads (4)" in message
    assert problems(tmp_path, model={"hidden_size": 136}) == []


def test_heads_must_split_into_kv_groups(tmp_path):
    message = refused(tmp_path, model={"num_key_value_heads": 3})
    assert "model.num_attention_heads (4) is not a multiple of model.num_key_value_heads (3)" in message
    assert "model.num_key_value_heads (8)" in refused(tmp_path, model={"num_key_value_heads": 8})
    assert problems(tmp_path, model={"num_key_value_heads": 2}) == []  # grouped-query attention


def test_head_dim_must_be_even(tmp_path):
    message = refused(tmp_path, model={"hidden_size": 12})
    assert "model.hidden_size / model.num_attention_heads = 12 / 4 = head_dim 3 is odd" in message
    assert problems(tmp_path, model={"hidden_size": 8}) == []  # head_dim 2


def test_model_shape_of_the_rehearsal_is_checked(tmp_path):
    message = refused(tmp_path, target="npu", rehearsal="cpu", model={"num_key_value_heads": 3})
    assert "model.num_key_value_heads (3)" in message


def test_model_section_is_not_checked_when_npu_loads_a_hub_model(tmp_path):
    assert problems(tmp_path, target="npu", model={"hidden_size": 130}) == []


# --- lengths -----------------------------------------------------------------------------------


def test_prompt_must_leave_room_for_the_target(tmp_path):
    message = refused(tmp_path, sft={"src_length": 160})
    assert "sft.src_length (160) must be less than sft.max_length (160)" in message
    assert problems(tmp_path, sft={"src_length": 159}) == []


def test_training_length_within_the_built_models_positions(tmp_path):
    message = refused(tmp_path, sft={"max_length": 300})
    assert "sft.max_length (300) exceeds model.max_position_embeddings (256)" in message
    assert problems(tmp_path, sft={"max_length": 256}) == []


def test_training_length_within_a_hub_models_positions(tmp_path):
    message = refused(tmp_path, target="npu", npu={"sft": {"max_length": 8192}})
    assert "npu.sft.max_length (8192) exceeds max_position_embeddings of meta-llama/Llama-2-13b (4096)" in message


def test_decoding_within_the_models_positions(tmp_path):
    message = refused(tmp_path, export={"max_new_tokens": 209}, predict={"max_new_tokens": 96})
    assert "sft.src_length + export.max_new_tokens (48 + 209 = 257) exceeds model.max_position_embeddings (256)" \
        in message
    assert problems(tmp_path, export={"max_new_tokens": 208}) == []


def test_decoding_within_upstream_predictors_total_length(tmp_path):
    message = refused(tmp_path, target="npu", npu={"export": {"max_new_tokens": 3073}})
    assert "npu.sft.src_length + npu.export.max_new_tokens (1024 + 3073 = 4097) exceeds 4096" in message
    assert "total_max_length" in message
    assert problems(tmp_path, target="npu", npu={"export": {"max_new_tokens": 3072}}) == []


def test_predict_within_export(tmp_path):
    message = refused(tmp_path, predict={"max_new_tokens": 97})
    assert "predict.max_new_tokens (97) exceeds export.max_new_tokens (96): lengths are baked in at export" in message
    assert "npu.predict.max_new_tokens (2048)" in refused(tmp_path, target="npu",
                                                          npu={"predict": {"max_new_tokens": 2048}})


# --- training cadence --------------------------------------------------------------------------


def test_warmup_ends_before_training(tmp_path):
    message = refused(tmp_path, sft={"warmup_steps": 1000})
    assert "sft.warmup_steps (1000) must be less than sft.max_steps (1000)" in message
    assert problems(tmp_path, sft={"warmup_steps": 999}) == []


def test_checkpoints_are_written(tmp_path):
    assert "sft.save_steps (1001) exceeds sft.max_steps (1000)" in refused(tmp_path, sft={"save_steps": 1001})
    assert problems(tmp_path, sft={"save_steps": 1000}) == []
    message = refused(tmp_path, target="npu", npu={"sft": {"save_steps": 1000}})
    assert "npu.sft.save_steps (1000) exceeds npu.sft.max_steps (100)" in message  # upstream's own default


def test_losses_are_logged(tmp_path):
    assert "sft.logging_steps (1001) exceeds sft.max_steps (1000)" in refused(tmp_path, sft={"logging_steps": 1001})
    assert problems(tmp_path, sft={"logging_steps": 1000}) == []


def test_lora_rank_within_the_adapted_layers(tmp_path):
    message = refused(tmp_path, sft={"lora": True, "lora_rank": 129})
    assert "sft.lora_rank (129) exceeds model.hidden_size (128)" in message
    assert problems(tmp_path, sft={"lora": True, "lora_rank": 128}) == []
    assert problems(tmp_path, sft={"lora": False, "lora_rank": 129}) == []  # no adapters, no limit
    gqa = refused(tmp_path, model={"num_key_value_heads": 1}, sft={"lora": True, "lora_rank": 33})
    assert "sft.lora_rank (33) exceeds the key/value width (32)" in gqa


# --- cards -------------------------------------------------------------------------------------


def test_cards_listed_once(tmp_path):
    message = refused(tmp_path, target="npu", devices="0,1,1,2,3,4,5,6")
    assert "devices (0,1,1,2,3,4,5,6): card(s) 1 listed twice" in message


def test_cards_ascending(tmp_path):
    message = refused(tmp_path, target="npu", npu={"devices": "1,0,2,3,4,5,6,7"})
    assert "npu.devices (1,0,2,3,4,5,6,7): card ids must be ascending" in message


def test_cards_on_one_node(tmp_path):
    message = refused(tmp_path, target="npu", devices="1,2,3,4,5,6,7,8")
    assert "devices (1,2,3,4,5,6,7,8): card(s) 8 not on a node of npu.cards_per_node (8)" in message
    assert problems(tmp_path, target="npu", devices="8,9,10,11,12,13,14,15", npu={"cards_per_node": 16}) == []
    assert problems(tmp_path, target="npu", devices="4,5,6,7", npu=SEVEN_B_ON_FOUR) == []


def test_smoke_test_runs_on_every_card_sft_uses(tmp_path):
    message = refused(tmp_path, target="npu", npu={"smoke_devices": "0,1"})
    assert ("npu.smoke_devices (0,1) is for npu.device cpu (the rehearsal): on the cards the smoke test runs on "
            "every card sft uses (npu.devices: 0,1,2,3,4,5,6,7)") in message
    assert problems(tmp_path, target="npu", rehearsal="cpu") == []  # the rehearsal sets it, with npu.device cpu


def test_layout_divides_the_cards(tmp_path):
    message = refused(tmp_path, target="npu", devices="0,1,2,3", npu={"parallel": {"tensor_parallel_degree": 8}})
    assert "npu.parallel: tensor x pipeline x sharding = 8 x 1 x 1 = 8 does not divide the 4 cards" in message
    assert "fix: LoRA fits" in message and "--config 'sft={lora: true}' 'npu={parallel: auto}'" in message
    assert "devices '0,1,2,3' x npu.nodes 1" in message


def test_tensor_parallel_splits_the_heads(tmp_path):
    message = refused(tmp_path, target="npu", devices="0,1,2",
                      npu={"parallel": {"tensor_parallel_degree": 3, "sequence_parallel": False}})
    assert ("npu.parallel.tensor_parallel_degree (3) does not divide num_attention_heads of "
            "meta-llama/Llama-2-13b (40)") in message
    shape = json.dumps({"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
                        "num_key_value_heads": 2, "intermediate_size": 11008, "num_hidden_layers": 32,
                        "vocab_size": 32000, "max_position_embeddings": 4096})
    gqa = refused(tmp_path, target="npu", npu={"model_config": shape, "parallel": {"tensor_parallel_degree": 8}})
    assert "npu.parallel.tensor_parallel_degree (8) does not divide num_key_value_heads of npu.model_config (2)" in gqa


def test_auto_layout_is_left_to_the_planner(tmp_path):
    auto = {"model_name_or_path": "meta-llama/Llama-2-7b", "parallel": "auto"}
    assert problems(tmp_path, target="npu", devices="0,1,2,3", npu=auto) == []


def test_a_model_the_layout_check_cannot_read_is_told_to_set_npu_model_config(tmp_path):
    model = tmp_path / "my-llama"  # a local model directory without its config.json
    local = refused(tmp_path, target="npu", npu={"model_name_or_path": str(model)})
    assert f"npu.model_name_or_path ({model}): the layout check needs the model's shape" in local
    assert "set npu.model_config to the model's config.json" in local and str(model / "config.json") in local
    hub = refused(tmp_path, target="npu", npu={"model_name_or_path": "org/llama-x"})
    assert "not a model the layout check knows (meta-llama/Llama-2-7b" in hub and "set npu.model_config" in hub
    assert "--model-config" not in local + hub  # the planner's CLI flag, not a config key


def test_schema_problems_come_first_all_at_once_and_no_rule_reads_an_untyped_value(tmp_path):
    # npu.sft.max_steps "500" (a quoted string): the schema refuses it before warmup_steps >= max_steps compares
    found = problems(tmp_path, seed="abc", threads=0, target="npu", npu={"sft": {"max_steps": "500"}})
    assert found[0].startswith("config: 3 problems")
    assert found[1:] == ['  - seed = "abc": must be a whole number', "  - threads = 0: must be at least 1",
                         '  - npu.sft.max_steps = "500": must be a whole number']


def test_the_plan_judges_only_a_config_that_passed_the_rules(tmp_path):
    # 13b on 4 cards does not fit, but the card list is the first thing to fix
    message = refused(tmp_path, target="npu", devices="0,1,2,2", npu={"parallel": {"tensor_parallel_degree": 4}})
    assert "listed twice" in message and "does not fit" not in message
    assert "does not fit" in refused(tmp_path, target="npu", devices="0,1,2,3",
                                     npu={"parallel": {"tensor_parallel_degree": 4}})


# --- nodes -------------------------------------------------------------------------------------


def test_several_nodes_pass_with_master_and_ips(tmp_path):
    assert problems(tmp_path, target="npu", npu=MULTI_NODE) == []


def test_several_nodes_need_a_master_unless_srun_picks_it(tmp_path):
    srun = {**MULTI_NODE, "master": None, "ips": None}
    assert problems(tmp_path, target="npu", npu=srun) == []  # srun: the job's first node
    assert "npu.master ('10.0.0.1') is not host:port" in refused(tmp_path, target="npu",
                                                                 npu={**MULTI_NODE, "master": "10.0.0.1"})
    local = {**MULTI_NODE, "master": None, "ips": None, "node_launcher": "local", "device": "cpu"}
    assert "npu.nodes (2) > 1 with npu.node_launcher local needs npu.master" in refused(tmp_path, target="npu",
                                                                                         npu=local)


def test_the_local_stand_in_rendezvous_on_the_loopback_address(tmp_path):
    cpu = {"nodes": 2, "master": "localhost:36677"}
    assert "sft.master ('localhost:36677') with sft.node_launcher local must be 127.0.0.1:<port>" in refused(
        tmp_path, sft=cpu)
    assert problems(tmp_path, sft={"nodes": 2, "master": "127.0.0.1:36677"}) == []
    assert "sft.nodes (2) > 1 with sft.node_launcher local needs sft.master" in refused(tmp_path, sft={"nodes": 2})


def test_the_local_stand_in_is_refused_on_real_cards(tmp_path):
    local = {**MULTI_NODE, "master": "127.0.0.1:8090", "ips": None, "node_launcher": "local"}
    assert "starts every node's launcher on this host's cards" in refused(tmp_path, target="npu", npu=local)


def test_cpu_launch_keys_are_refused_on_npu(tmp_path):
    message = refused(tmp_path, target="npu", sft={"processes": 2})
    assert "sft.processes (2) is the cpu target's; on npu one process per card in devices" in message


def test_listed_addresses_are_checked(tmp_path):
    message = refused(tmp_path, target="npu", npu={**MULTI_NODE, "ips": "10.0.0.1,10.0.0.2,10.0.0.3"})
    assert "npu.ips (10.0.0.1,10.0.0.2,10.0.0.3) lists 3 address(es) for npu.nodes (2)" in message
    assert "lists an address twice" in refused(tmp_path, target="npu", npu={**MULTI_NODE, "ips": "10.0.0.1,10.0.0.1"})
    loopback = refused(tmp_path, target="npu", npu={**MULTI_NODE, "master": "127.0.0.1:8090",
                                                    "ips": "127.0.0.1,10.0.0.2"})
    assert "holds 127.0.0.1" in loopback


def test_master_is_one_of_the_nodes(tmp_path):
    message = refused(tmp_path, target="npu", npu={**MULTI_NODE, "master": "10.0.0.9:8090"})
    assert "npu.master host 10.0.0.9 is not one of npu.ips (10.0.0.1,10.0.0.2)" in message


def test_several_nodes_share_the_host_network(tmp_path):
    message = refused(tmp_path, target="npu", npu={**MULTI_NODE, "network": "none"})
    assert "npu.nodes (2) > 1 needs npu.network: host (got none)" in message
    assert problems(tmp_path, target="npu", npu={"network": "none"}) == []  # one node: its own business


# --- download source ---------------------------------------------------------------------------


def test_a_local_archive_passes_by_absolute_or_relative_url(tmp_path):
    archive = _tar(tmp_path / "AdvertiseGen.tar.gz")
    assert problems(tmp_path, data={"url": f"file://{archive}"}) == []
    assert problems(tmp_path, data={"url": "file:assets/AdvertiseGen-sample.tar.gz"}) == []


def test_a_local_archive_must_exist(tmp_path):
    message = refused(tmp_path, data={"url": "file:assets/missing.tar.gz"})
    assert f"data.url (file:assets/missing.tar.gz): no such file {ROOT}/assets/missing.tar.gz" in message


def test_a_local_archive_is_a_regular_file(tmp_path):
    (tmp_path / "dir.tar.gz").mkdir()
    assert "is not a regular file" in refused(tmp_path, data={"url": f"file://{tmp_path}/dir.tar.gz"})


def test_a_local_archive_is_a_tar_archive(tmp_path):
    (tmp_path / "train.json").write_text('{"src": "a", "tgt": "b"}\n')
    message = refused(tmp_path, data={"url": f"file://{tmp_path}/train.json"})
    assert f"data.url (file://{tmp_path}/train.json): {tmp_path}/train.json is not a tar archive" in message


def test_a_local_url_names_no_host(tmp_path):
    assert "names host 'server'" in refused(tmp_path, data={"url": "file://server/data.tar.gz"})


def test_a_url_must_name_a_file(tmp_path):
    message = refused(tmp_path, data={"url": "https://example.org/datasets/"})
    assert "data.url (https://example.org/datasets/) names no file" in message
    assert problems(tmp_path, data={"url": "https://example.org/datasets/AdvertiseGen.tar.gz"}) == []


def test_url_scheme_is_fetchable(tmp_path):
    cfg = load(_config(tmp_path, {}))  # the schema refuses other schemes first; the rule says why
    cfg["data"]["url"] = "ftp://example.org/AdvertiseGen.tar.gz"
    assert config_rules.url_scheme_is_fetchable(cfg) == [
        "data.url (ftp://example.org/AdvertiseGen.tar.gz): scheme 'ftp' cannot be fetched; use http://, https:// "
        "or file:"]


def test_sha256_is_64_hex_digits(tmp_path):
    cfg = load(_config(tmp_path, {}))
    cfg["data"]["sha256"] = "abc"
    with pytest.raises(PipelineError, match=r"data.sha256 \('abc'\) must be 64 hex digits \(got 3 characters\)"):
        resolve(cfg)
    cfg["data"]["sha256"] = "9C81849CED26F065F29CD4DAE1F1982AF4CE5BA9183268B4E3E95C92F8EC18D1"  # download lowercases
    assert config_rules.sha256_is_hex(cfg) == []
