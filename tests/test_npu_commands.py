"""The NPU target's commands, exactly: upstream's own scripts plus our listed differences.

Nothing on the npu target can run here, so its command lines are where the tests are exact.
Each expected table is written from upstream's scripts at the pinned commit
(``llm/devices/npu/llama/llama_npu_sft_N1C8.sh``, ``llama_npu_lora_N1C8.sh``, ``export_npu.sh``,
``predict_npu.sh``); ``OURS`` lists each flag we change, add or drop, with the reason. An extra,
missing or changed flag fails.
"""

from __future__ import annotations

import shlex

import pytest

from conftest import copy_project, snakemake
from llamapipe.runners import commands
from llamapipe.scaleout import launch
from npu_commands import (
    SMOKE_SCRIPT,
    collective_check,
    find_step,
    flags,
    launcher,
    parse,
    script_flags,
    sft_only,
    shell_commands,
)

P = "{project}"  # the project directory in expected values

# llama_npu_sft_N1C8.sh, flag for flag (its "1"/"0" spellings of booleans compare equal to ours).
UPSTREAM_SFT = {
    "--device": "npu", "--model_name_or_path": "meta-llama/Llama-2-13b", "--dataset_name_or_path": "data/",
    "--output_dir": "./output/sft_bf16_llama_N1C8", "--per_device_train_batch_size": "2",
    "--gradient_accumulation_steps": "64", "--per_device_eval_batch_size": "1", "--eval_accumulation_steps": "1",
    "--max_steps": "100", "--learning_rate": "3e-06", "--warmup_steps": "20", "--save_steps": "1000",
    "--logging_steps": "1", "--evaluation_strategy": "epoch", "--src_length": "1024", "--max_length": "4096",
    "--bf16": "true", "--fp16_opt_level": "O2", "--do_train": "true", "--tensor_parallel_output": "true",
    "--disable_tqdm": "true", "--eval_with_do_generation": "false", "--metric_for_best_model": "accuracy",
    "--recompute": "false", "--tensor_parallel_degree": "8", "--pipeline_parallel_degree": "1",
    "--zero_padding": "0", "--amp_master_grad": "true", "--fuse_attention_qkv": "true",
    "--fuse_attention_ffn": "true", "--sequence_parallel": "1", "--use_flash_attention": "1",
    "--use_fused_rope": "1", "--use_fused_rms_norm": "1", "--sharding_parallel_degree": "1",
    "--pad_to_multiple_of": "4096", "--sharding": "stage1",
    "--sharding_parallel_config": "enable_stage1_tensor_fusion enable_stage1_overlap",
}
# flag -> (our value, or None to drop it; why)
OURS_SFT = {
    "--dataset_name_or_path": (f"{P}/results/data", "prepare_data's validated train.json/dev.json"),
    "--output_dir": (f"{P}/results/checkpoints/sft", "outside the rule's output: a rerun resumes from it"),
    "--save_steps": ("10", "upstream's 1000 > max_steps never checkpoints: a crash would lose the run"),
    "--save_total_limit": ("2", "checkpoints with optimizer state are ~150 GB each on 13b: keep the newest"),
    "--seed": ("42", "config seed: the same run twice trains the same"),
    "--fp16": ("false", "spelled out with bf16 so a dtype switch in config is one place"),
    "--evaluation_strategy": ("no", "dev.json is the prediction set; predict/evaluate score it"),
    "--metric_for_best_model": (None, "only used with evaluation"),
}
UPSTREAM_SFT_LAUNCH = {"--devices": "0,1,2,3,4,5,6,7", "--log_dir": "./sft_bf16_llama_N1C8"}
OURS_LAUNCH = {"--log_dir": (f"{P}/results/logs/sft_launch", "beside the rule's log; collect-sft reads "
                                                                "workerlog.0")}
# devices: 4,5,6,7 (upstream's scripts know only all eight cards)
OURS_LAUNCH_4567 = {"--devices": ("0,1,2,3", "the runtime's ids: ASCEND_RT_VISIBLE_DEVICES=4,5,6,7 leaves it cards "
                                             "0-3, and the launcher looks each --devices id up among them")}
SMOKE_LOGS = f"{P}/results/logs/smoke_collective_launch"
# llama_npu_lora_N1C8.sh against the sft script: other model/log names, no sharding, lora on.
UPSTREAM_LORA_CHANGES = {
    "--model_name_or_path": "meta-llama/Llama-2-13b-chat", "--output_dir": "./output/lora_bf16_llama_N1C8",
    "--sharding": None, "--sharding_parallel_config": None, "--lora": "true", "--lora_rank": "32",
}
OURS_LORA = {"--model_name_or_path": ("meta-llama/Llama-2-13b", "npu.model_name_or_path: one base model for "
                                                                "both scripts")}
# llama_npu_ppt_N1C8.sh; its bare flags (--do_train, --bf16, --amp_master_grad, --unified_checkpoint)
# are true to PdArgumentParser.
UPSTREAM_PPT = {
    "--model_name_or_path": "meta-llama/Llama-2-13b", "--tokenizer_name_or_path": "meta-llama/Llama-2-13b",
    "--input_dir": "./pre-data", "--output_dir": "./output", "--split": "949,50,1", "--max_seq_length": "4096",
    "--per_device_train_batch_size": "2", "--gradient_accumulation_steps": "32", "--per_device_eval_batch_size": "1",
    "--use_flash_attention": "1", "--use_fused_rms_norm": "1", "--virtual_pp_degree": "1",
    "--learning_rate": "0.00001", "--min_learning_rate": "0.000001", "--max_steps": "2000", "--save_steps": "2000",
    "--seed": "100", "--warmup_steps": "20", "--max_grad_norm": "1.0", "--logging_steps": "1",
    "--dataloader_num_workers": "1", "--eval_steps": "1001", "--tensor_parallel_degree": "4",
    "--disable_tqdm": "true", "--continue_training": "0", "--do_train": "true", "--device": "npu",
    "--enable_linear_fused_grad_add": "false", "--fuse_attention_qkv": "true", "--fuse_attention_ffn": "true",
    "--use_fused_rope": "true", "--recompute_use_reentrant": "true", "--data_cache": "./data_cache",
    "--bf16": "true", "--fp16_opt_level": "O2", "--amp_master_grad": "true", "--load_sharded_model": "true",
    "--save_sharded_model": "true", "--pipeline_parallel_degree": "1", "--ignore_data_skip": "0",
    "--force_reshard_pp": "true", "--unified_checkpoint": "true",
    "--tensor_parallel_config": "enable_mp_async_allreduce enable_mp_skip_c_identity", "--sequence_parallel": "1",
    "--pipeline_parallel_config": "disable_partial_send_recv", "--sharding": "stage1",
    "--sharding_parallel_degree": "2",
}
OURS_PPT = {
    "--input_dir": (f"{P}/data/pretrain", "npu.pretrain.input_dir, relative to the project (not llm/)"),
    "--output_dir": (f"{P}/results/checkpoints/sft", "the training stage's resumable checkpoint directory"),
    "--data_cache": (f"{P}/results/cache/pretrain_data", "upstream's ./data_cache lands in the (root-owned) "
                                                          "checkout"),
    "--gradient_accumulation_steps": ("64", "npu.sft, shared with SFT (the ppt script has 32)"),
    "--learning_rate": ("3e-06", "npu.sft.learning_rate (the ppt script has 1e-5)"),
    "--max_steps": ("100", "npu.sft.max_steps (the ppt script has 2000)"),
    "--save_steps": ("10", "checkpoint within the run"),
    "--save_total_limit": ("2", "bounded checkpoints"),
    "--seed": ("42", "config seed (the ppt script has 100)"),
    "--tensor_parallel_degree": ("8", "npu.parallel (the ppt script runs tp 4 x sharding 2)"),
    "--sharding_parallel_degree": ("1", "npu.parallel"),
    "--fp16": ("false", "spelled out with bf16"),
    "--recompute": ("false", "npu.parallel.recompute, spelled out"),
}
UPSTREAM_PPT_LAUNCH = {"--log_dir": "./ppt_bf16_llama_N1C8"}
OURS_PPT_LAUNCH = {**OURS_LAUNCH, "--devices": ("0,1,2,3,4,5,6,7", "the cards, as for SFT (upstream relies on "
                                                                     "ASCEND_RT_VISIBLE_DEVICES alone)")}
# export_npu.sh / predict_npu.sh
UPSTREAM_EXPORT = {"--model_name_or_path": "<src_path>", "--inference_model": None, "--output_path": "<dst_path>",
                   "--dtype": "float16", "--device": "npu", "--block_attn": None}
OURS_EXPORT = {
    "--model_name_or_path": (f"{P}/results/merged", "merge's one-file checkpoint"),
    "--output_path": (f"{P}/results/inference.tmp", "written aside, moved into place once checked"),
    "--src_length": ("1024", "lengths are baked in at export: the ones predict uses"),
    "--max_length": ("1024", "export.max_new_tokens"),
}
UPSTREAM_PREDICT = {"--model_name_or_path": "<model_path>", "--inference_model": None, "--dtype": "float16",
                    "--mode": "static", "--block_attn": None, "--device": "npu"}
OURS_PREDICT = {
    "--model_name_or_path": (f"{P}/results/inference", "the export"),
    "--data_file": (f"{P}/results/data/dev.json", "the dev prompts"),
    "--output_file": (f"{P}/results/predictions.json.upstream.jsonl", "collect-predictions reads it"),
    "--batch_size": ("1", "npu.predict.batch_size"),
    "--src_length": ("1024", "as exported"),
    "--max_length": ("1024", "predict.max_new_tokens"),
    "--decode_strategy": ("greedy_search", "deterministic predictions (upstream default samples top-p)"),
}
ASCEND_PRELUDE = [["set", "-eo", "pipefail"], ["source", "/usr/local/Ascend/ascend-toolkit/set_env.sh"]]
ATB_PRELUDE = [
    ["atb=$(ls", "/usr/local/Ascend/atb/set_env.sh", "/usr/local/Ascend/nnal/atb/set_env.sh", "2>/dev/null", "|",
     "head", "-n", "1)"],
    ["[", "-n", "$atb", "]", "||", "(echo", "no ATB set_env.sh under /usr/local/Ascend (atb/ or nnal/atb/)",
     ">&2", "&&", "false)"],
    ["source", "$atb"],
]
CHECKOUT_PRELUDE = [
    ["export", "PYTHONPATH=/opt/PaddleNLP:/opt/PaddleNLP/llm:/opt/PaddleNLP/llm/devices${PYTHONPATH:+:$PYTHONPATH}"],
    ["cd", "/opt/PaddleNLP/llm"],
]
NPU_ENV = {"GLOG_v": "0", "FLAGS_NPU_MC2": "1", "MC2_Recompute": "1", "FLAGS_npu_storage_format": "1",
           "FLAGS_use_stride_kernel": "0", "HCCL_OP_BASE_FFTS_MODE_ENABLE": "TRUE", "MULTI_STREAM_MEMORY_REUSE": "1",
           "HCCL_INTRA_PCIE_ENABLE": "0", "HCCL_INTRA_ROCE_ENABLE": "1", "FLAGS_allocator_strategy": "naive_best_fit"}

# Upstream spells these booleans 1/0; PdArgumentParser reads both spellings alike.
BOOL_FLAGS = {"--zero_padding", "--sequence_parallel", "--use_flash_attention", "--use_fused_rope",
              "--use_fused_rms_norm"}


def expected(upstream: dict, ours: dict, project) -> dict:
    out = {k: {"1": "true", "0": "false"}.get(v, v) if k in BOOL_FLAGS else v for k, v in upstream.items()}
    for flag, (value, _why) in ours.items():
        if value is None:
            out.pop(flag, None)
        else:
            out[flag] = value.replace(P, str(project))
    return out


@pytest.fixture(scope="module")
def npu_dry(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("npucmd") / "project")
    full = shell_commands(snakemake(project, "-n", "-p", "results/metrics.json", "--config", "target=npu").stdout)
    (project / "lora.yaml").write_text("sft:\n  lora: true\n")
    lora = shell_commands(snakemake(project, "-n", "-p", "results/metrics.json", "--config", "target=npu",
                                    "--configfile", "lora.yaml").stdout)
    (project / "ppt.yaml").write_text("npu:\n  pretrain:\n    enabled: true\n")
    ppt = shell_commands(snakemake(project, "-n", "-p", "results/sft", "--config", "target=npu",
                                   "--configfile", "ppt.yaml").stdout)
    cmds = {k: parse(v) for k, v in full.items()}
    cmds["pretrain"] = parse(ppt["sft"])
    return project.resolve(), cmds, {k: parse(v) for k, v in lora.items()}


@pytest.fixture(scope="module")
def npu_dry_4567(tmp_path_factory):
    """The npu dry-run on cards 4-7 (llama2-7b at tensor parallel 4: 13b does not fit 4 cards)."""
    project = copy_project(tmp_path_factory.mktemp("npucmd4567") / "project")
    (project / "tp4.yaml").write_text(
        "npu:\n  model_name_or_path: meta-llama/Llama-2-7b\n  parallel:\n    tensor_parallel_degree: 4\n")
    out = snakemake(project, "-n", "-p", "results/sft", "--configfile", "tp4.yaml", "--config", "target=npu",
                    "devices=4,5,6,7").stdout
    return project.resolve(), {k: parse(v) for k, v in shell_commands(out).items()}


def test_sft_is_upstreams_n1c8_script_plus_the_listed_differences(npu_dry):
    project, cmds, _ = npu_dry
    sft = cmds["sft"]
    step = find_step(sft, "run_finetune.py")
    head, launch = launcher(step, "run_finetune.py")
    assert head == ["python", "-u", "-m", "paddle.distributed.launch"]
    assert launch == expected(UPSTREAM_SFT_LAUNCH, OURS_LAUNCH, project)
    assert script_flags(step, "run_finetune.py") == expected(UPSTREAM_SFT, OURS_SFT, project)
    training_env = [["export", f"{k}={v}"] for k, v in sorted(NPU_ENV.items())]  # as the N1C8 script exports
    prepare = ["python", "-m", "llamapipe.stages.collect", "prepare-sft", "--ckpt-dir",
               f"{project}/results/checkpoints/sft", "--max-steps", "100", "--script=run_finetune.py"]
    assert sft.steps == ASCEND_PRELUDE + CHECKOUT_PRELUDE + training_env + [
        ["export", "FLAG_LLM_PDC=True"], ["export", "NO_COLOR=1"], prepare, step, [
        "python", "-m", "llamapipe", "collect-sft", "--ckpt-dir", f"{project}/results/checkpoints/sft",
        "--launch-logs", f"{project}/results/logs/sft_launch", "--out", f"{project}/results/sft",
        "--save-total-limit", "2"]]


def smoke_is_sfts_launch(cmds: dict, project, cards: str) -> dict:
    """smoke_collective against sft: the same container (cards, image, mounts, env), the same
    script prelude and exports step for step, the same launcher head and flags but --log_dir;
    then the supervisor's flags, exactly. Returns the launcher's flags."""
    sft, smoke = cmds["sft"], cmds["smoke_collective"]
    assert {**smoke.spec, "rule": "sft"} == sft.spec
    sft_step = find_step(sft, "run_finetune.py")
    *env_steps, step = smoke.steps
    assert env_steps == [s for s in sft.steps[:sft.steps.index(sft_step)] if not sft_only(s)]
    check, launch_step = collective_check(step)
    logs = SMOKE_LOGS.replace(P, str(project))
    assert check == {"--timeout": "300", "--cards": cards, "--reports": f"{logs}/ranks", "--launch-logs": logs,
                     "--out": f"{project}/results/smoke_collective.json"}
    head, launch = launcher(launch_step, SMOKE_SCRIPT)
    sft_head, sft_launch = launcher(sft_step, "run_finetune.py")
    assert head == sft_head == ["python", "-u", "-m", "paddle.distributed.launch"]
    assert launch == {**sft_launch, "--log_dir": logs}
    assert script_flags(launch_step, SMOKE_SCRIPT) == {"--reports": f"{logs}/ranks"}
    return launch


def test_smoke_collective_runs_sfts_launcher_on_sfts_cards_in_sfts_environment(npu_dry):
    project, cmds, _ = npu_dry
    launch = smoke_is_sfts_launch(cmds, project, "0,1,2,3,4,5,6,7")
    assert launch == {"--devices": "0,1,2,3,4,5,6,7", "--log_dir": SMOKE_LOGS.replace(P, str(project))}
    assert set(NPU_ENV) <= {s[1].split("=")[0] for s in cmds["smoke_collective"].steps if s[0] == "export"}


def test_cards_4_to_7_are_launched_as_the_runtimes_0_to_3(npu_dry_4567):
    project, cmds = npu_dry_4567
    step = find_step(cmds["sft"], "run_finetune.py")
    assert launcher(step, "run_finetune.py")[1] == expected(UPSTREAM_SFT_LAUNCH, {**OURS_LAUNCH, **OURS_LAUNCH_4567},
                                                           project)
    for rule in ("sft", "smoke_collective"):
        spec = cmds[rule].spec
        assert spec["env"]["ASCEND_RT_VISIBLE_DEVICES"] == "4,5,6,7", rule
        assert spec["devices"] == [f"/dev/davinci{c}" for c in (4, 5, 6, 7)] + [
            "/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"], rule
    launch = smoke_is_sfts_launch(cmds, project, "4,5,6,7")
    assert launch["--devices"] == "0,1,2,3"


@pytest.mark.parametrize("cards", ["0,1,2,3,4,5,6,7", "4,5,6,7", "2,5"])
def test_paddles_launcher_puts_one_rank_on_each_card_we_ask_for(monkeypatch, cards):
    """paddle.distributed.launch's own device lookup (launch/context/device.py) as the paddle-npu
    image runs it: PADDLE_XCCL_BACKEND=npu, no NPU_VISIBLE_DEVICES, so its labels are the cards the
    runtime shows, 0..n-1 (ASCEND_RT_VISIBLE_DEVICES applied); rank i gets FLAGS_selected_npus=i."""
    from paddle.distributed.launch.context import device as launch_device

    n = len(cards.split(","))
    monkeypatch.setenv("PADDLE_XCCL_BACKEND", "npu")
    monkeypatch.delenv("NPU_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(launch_device, "get_available_custom_device", lambda: [f"npu:{i}" for i in range(n)])
    dev = launch_device.Device.parse_device()
    argv = launch.launch_argv(launch.npu_layout({"devices": cards, "npu": {"device": "npu", "nodes": 1}}),
                              ["x.py"], "logs")
    ours = argv[argv.index("--devices") + 1]
    assert dev.get_selected_device_key() == "FLAGS_selected_npus"
    assert dev.get_selected_devices(ours) == [str(i) for i in range(n)]
    if cards != ours:  # the host's ids, what the launcher got before: no such label
        with pytest.raises(ValueError, match="is not in list"):
            dev.get_selected_devices(cards)


def test_pretrain_is_upstreams_ppt_script_plus_the_listed_differences(npu_dry):
    project, cmds, _ = npu_dry
    step = find_step(cmds["pretrain"], "run_pretrain.py")
    head, launch = launcher(step, "run_pretrain.py")
    assert head == ["python", "-u", "-m", "paddle.distributed.launch"]
    assert launch == expected(UPSTREAM_PPT_LAUNCH, OURS_PPT_LAUNCH, project)
    assert script_flags(step, "run_pretrain.py") == expected(UPSTREAM_PPT, OURS_PPT, project)


def test_lora_is_upstreams_lora_script_plus_the_listed_differences(npu_dry):
    project, _, lora = npu_dry
    step = find_step(lora["sft"], "run_finetune.py")
    upstream_lora = dict(UPSTREAM_SFT)
    for flag, value in UPSTREAM_LORA_CHANGES.items():
        if value is None:
            upstream_lora.pop(flag)
        else:
            upstream_lora[flag] = value
    assert script_flags(step, "run_finetune.py") == expected(
        upstream_lora, {**OURS_SFT, **OURS_LORA}, project)
    assert "--lora_alpha" not in step  # run_finetune.py has no such argument: alpha is 2 x rank


def test_lora_merge_runs_upstreams_merge_then_ours(npu_dry):
    project, _, lora = npu_dry
    merge = lora["merge"]
    step = find_step(merge, "tools/merge_lora_params.py")
    assert step[:2] == ["python", "tools/merge_lora_params.py"]
    folded = f"{project}/results/merged.lora"
    assert script_flags(step, "tools/merge_lora_params.py") == {
        "--model_name_or_path": "meta-llama/Llama-2-13b", "--lora_path": f"{project}/results/sft",
        "--output_path": folded, "--device": "npu", "--safe_serialization": "false"}
    after = merge.steps[merge.steps.index(step) + 1:]
    assert after[0] == ["python", "-m", "llamapipe", "check-outputs", "--kind", "model", "--path", folded]
    assert after[1] == ["cd", str(project)]
    ours = after[2]
    assert ours[:4] == ["python", "-m", "llamapipe", "merge"] and ours[ours.index("--sft") + 1] == folded
    assert after[3] == ["rm", "-rf", folded]


def checked_step(cmd, script: str, upstream: dict, ours: dict, project) -> list[str]:
    """The step running ``script``: started with plain python, flags exactly upstream's + ours."""
    step = find_step(cmd, script)
    assert step[:2] == ["python", script]
    assert script_flags(step, script) == expected(upstream, ours, project)
    return step


def test_export_is_upstreams_export_script_plus_the_listed_differences(npu_dry):
    project, cmds, _ = npu_dry
    export = cmds["export"]
    step = checked_step(export, "predict/export_model.py", UPSTREAM_EXPORT, OURS_EXPORT, project)
    tmp = f"{project}/results/inference.tmp"
    assert export.steps == ASCEND_PRELUDE + ATB_PRELUDE + CHECKOUT_PRELUDE + ops_install(project) + [
        ["rm", "-rf", tmp], step, ["python", "-m", "llamapipe", "check-outputs", "--kind", "export", "--path", tmp],
        ["mv", tmp, f"{project}/results/inference"]]


def ops_install(project) -> list:
    return [["ops=$(mktemp", "-d)"],
            ["python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-cache-dir", "--target",
             "$ops", f"{project}/results/wheels/*.whl"],
            ["export", "PYTHONPATH=$ops:$PYTHONPATH"],
            ["python", "-c", "import paddlenlp_ops"]]


def test_predict_is_upstreams_predict_script_plus_the_listed_differences(npu_dry):
    project, cmds, _ = npu_dry
    predict = cmds["predict"]
    step = checked_step(predict, "predict/predictor.py", UPSTREAM_PREDICT, OURS_PREDICT, project)
    raw = f"{project}/results/predictions.json.upstream.jsonl"
    assert predict.steps == ASCEND_PRELUDE + ATB_PRELUDE + CHECKOUT_PRELUDE + ops_install(project) + [
        ["rm", "-f", raw], step,
        ["python", "-m", "llamapipe", "collect-predictions", "--upstream", raw, "--dev",
         f"{project}/results/data/dev.json", "--out", f"{project}/results/predictions.json"]]


def test_build_ops_builds_a_copy_of_csrc_npu_as_the_guide_does(npu_dry):
    project, cmds, _ = npu_dry
    wheels, tmp = f"{project}/results/wheels", f"{project}/results/wheels.tmp"
    assert cmds["build_ops"].steps == ASCEND_PRELUDE + CHECKOUT_PRELUDE + [
        ["rm", "-rf", tmp], ["mkdir", "-p", tmp], ["build=$(mktemp", "-d)"],
        ["cp", "-r", "/opt/PaddleNLP/csrc/npu/.", "$build/"], ["cd", "$build"],
        ["python", "setup.py", "build", "bdist_wheel"], ["cp", "dist/paddlenlp_ops-*.whl", f"{tmp}/"],
        ["python", "-m", "llamapipe", "check-outputs", "--kind", "wheels", "--path", tmp], ["mv", tmp, wheels]]


def test_container_specs_map_cards_devices_and_env_per_stage(npu_dry):
    project, cmds, _ = npu_dry
    davinci = ["/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"]
    driver = [{"source": m, "target": m, "read_only": True}
              for m in ("/usr/local/Ascend/driver", "/usr/local/bin/npu-smi", "/usr/local/dcmi")]
    for rule, cards in {"sft": list(range(8)), "export": [0], "predict": [0], "merge": [0], "init_model": [],
                        "build_ops": [], "evaluate": []}.items():
        spec = cmds[rule].spec
        assert spec["image"] == "llamapipe-npu:cann800-paddle3.0.0-pdnlp4711e14", rule
        assert spec["env"]["ASCEND_RT_VISIBLE_DEVICES"] == ",".join(map(str, cards)), rule
        assert spec["devices"] == ([f"/dev/davinci{c}" for c in cards] + davinci if cards else []), rule
        code = commands.package_src_dir()
        assert spec["mounts"] == [{"source": str(project), "target": str(project), "read_only": False},
                                  {"source": code, "target": code, "read_only": True}] + (driver if cards else []), rule
        assert (spec["shm_size"], spec["network"], spec["privileged"]) == ("128g", "host", False), rule
        assert spec["user"].count(":") == 1 and spec["env"]["HOME"] == "/tmp", rule
        # the MC2/HCCL flags are exported by the sft script only (upstream's export/predict set none)
        assert not set(NPU_ENV) & set(spec["env"]), rule


def test_no_kill_and_no_socket_anywhere(npu_dry):
    _, cmds, lora = npu_dry
    for cmd in [*cmds.values(), *lora.values()]:
        text = shlex.join(cmd.argv)
        assert "kill" not in text  # upstream's `ps | grep run_finetune.py | kill -9` is never mirrored
        assert "docker.sock" not in text


def test_flags_parser_refuses_repeats_and_positionals():
    with pytest.raises(AssertionError):
        flags(["--a", "1", "--a", "2"])
    with pytest.raises(AssertionError):
        flags(["--a", "1", "stray", "x"])
    assert flags(["--a", "--b", "2"]) == {"--a": None, "--b": "2"}
