"""Every cross-field rule of the resolved config, checked before any job starts.

The schema checks each key alone; the rules here check keys against each other (and a
``file:`` url against the file it names). Each rule is a function of the resolved config that
returns its problems; each problem names the keys, their values and what would break, so one
``check`` lists everything a user has to fix. Only real constraints belong here: each rule's
docstring says what trips downstream without it.

Imported at Snakefile parse time: pure Python, no Paddle.
"""

from __future__ import annotations

import os
import posixpath
import re
import tarfile
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlparse

from llamapipe.config.paths import builds_base_model, file_url_path, locate_file_url, model_config_file
from llamapipe.core.cards import parse_cards
from llamapipe.core.errors import PipelineError
from llamapipe.core.hashing import sha256_file
from llamapipe.scaleout.planner import KNOWN_MAX_POSITIONS, KNOWN_MODELS, ModelShape, read_model_config

# max_position_embeddings of the hub models the planner knows (their config.json files).
# upstream predictor.py's PredictorArgument.total_max_length default: export_args and
# predictor_args do not pass it, and __post_init__ asserts src_length + max_length <= it.
UPSTREAM_TOTAL_MAX_LENGTH = 4096
DOWNLOAD_SCHEMES = ("http", "https", "file")  # what stages/download.py fetches
ADVERTISEGEN_URL = "https://bj.bcebos.com/paddlenlp/datasets/examples/AdvertiseGen.tar.gz"  # the guide's
SAMPLE_ARCHIVE = "AdvertiseGen-sample.tar.gz"  # assets/: the cpu target's sample (tools/make_sample_data.py)
SAMPLE_SHA256 = "9c81849ced26f065f29cd4dae1f1982af4ce5ba9183268b4e3e95c92f8ec18d1"
IPS_LOOPBACK = "127.0.0.1"  # paddle.distributed.launch: "127.0.0.1 in ips is not allowed in multi-nodes"


def check(cfg: dict) -> list[str]:
    """All problems of the resolved config (empty: every rule holds)."""
    return [problem for rule in RULES for problem in rule(cfg)]


# --- helpers -----------------------------------------------------------------------------------


def _npu(cfg: dict) -> dict:
    return cfg.get("npu") or {}


def _on_npu(cfg: dict) -> bool:
    return cfg["target"] == "npu"


def _key(cfg: dict, dotted: str) -> str:
    """The key a user sets: ``npu.sft.max_steps`` when the npu overlay supplied the value."""
    section, name = dotted.split(".", 1)
    overlay = _npu(cfg).get(section) if _on_npu(cfg) else None
    return f"npu.{dotted}" if isinstance(overlay, dict) and name in overlay else dotted


@dataclass(frozen=True)
class TrainedShape:
    """The shape of the model sft trains, where it comes from, and how messages name it."""

    source: str  # "model" (the section), "npu.model_config" or a known hub name
    shape: ModelShape
    max_positions: int | None

    def key(self, field: str) -> str:
        return f"model.{field}" if self.source == "model" else f"{field} of {self.source}"


def model_shape(cfg: dict) -> TrainedShape | None:
    """The shape of the model sft trains, when it is known (and well-formed) before any job runs;
    an unreadable or malformed shape is the plan's to report (or ``tiny_model_shape``'s)."""
    npu = _npu(cfg)
    name = npu.get("model_name_or_path")
    try:
        if builds_base_model(cfg):
            source, data = "model", cfg["model"]
        elif model_config_file(cfg):  # npu.model_config, or the config.json of a local model directory
            source, data = "npu.model_config", read_model_config(model_config_file(cfg), "npu.model_config")
        elif name in KNOWN_MODELS:
            source, data = name, {**KNOWN_MODELS[name], "model_type": "llama",
                                  "max_position_embeddings": KNOWN_MAX_POSITIONS.get(name)}
        else:
            return None
        return TrainedShape(source, ModelShape.from_hf_config(data), data.get("max_position_embeddings"))
    except (PipelineError, AttributeError, TypeError):
        return None


def card_ids(cfg: dict) -> list[int]:
    return parse_cards(cfg.get("devices"))


def _devices_key(cfg: dict) -> str:
    """``devices`` when given, else the ``npu.devices`` that resolve copied into it."""
    return "npu.devices" if cfg.get("devices") == _npu(cfg).get("devices") else "devices"


# --- target ------------------------------------------------------------------------------------


def rehearsal_needs_npu_target(cfg: dict) -> list[str]:
    """The rehearsal replaces npu settings; on the cpu target there is nothing to rehearse."""
    if cfg.get("rehearsal") and not _on_npu(cfg):
        return [f"rehearsal ({cfg['rehearsal']}) rehearses the npu target: use it with target=npu "
                f"(target is {cfg['target']})"]
    return []


def pretrain_needs_npu_target(cfg: dict) -> list[str]:
    """Only the npu sft command runs run_pretrain.py; the cpu target would silently fine-tune."""
    if not _on_npu(cfg) and _npu(cfg).get("pretrain", {}).get("enabled"):
        return ["npu.pretrain.enabled needs target: npu (the cpu target fine-tunes only)"]
    return []


# --- model shape (the tiny LLaMA init_model builds) ---------------------------------------------
# LlamaConfig and the LlamaForCausalLM constructor accept every one of these shapes; the first
# forward pass (sft) fails with a bare Paddle shape error. Tried with paddlenlp 3.0.0b4.


def tiny_model_shape(cfg: dict) -> list[str]:
    """The shape rules below, for the model init_model builds (a hub model brings its own)."""
    if not builds_base_model(cfg):
        return []
    m = cfg["model"]
    return [*_hidden_size_splits_into_heads(m), *_heads_split_into_kv_groups(m), *_head_dim_is_even(m)]


def _hidden_size_splits_into_heads(m: dict) -> list[str]:
    """hidden_size 130 over 4 heads: the q/k/v reshape fails ("capacity 2560 != in_size 2600")."""
    if m["hidden_size"] % m["num_attention_heads"]:
        return [f"model.hidden_size ({m['hidden_size']}) is not a multiple of model.num_attention_heads "
                f"({m['num_attention_heads']}): head_dim must be whole"]
    return []


def _heads_split_into_kv_groups(m: dict) -> list[str]:
    """4 heads over 3 (or 8) key/value heads: the attention matmul fails on the head axis."""
    heads, kv = m["num_attention_heads"], m.get("num_key_value_heads")
    if kv and heads % kv:
        return [f"model.num_attention_heads ({heads}) is not a multiple of model.num_key_value_heads ({kv}): "
                f"each key/value head serves a whole group of query heads"]
    return []


def _head_dim_is_even(m: dict) -> list[str]:
    """hidden 12 over 4 heads (head_dim 3): rotary embedding's rotate_half fails to broadcast."""
    if m["hidden_size"] % m["num_attention_heads"]:
        return []  # _hidden_size_splits_into_heads says it
    head_dim = m["hidden_size"] // m["num_attention_heads"]
    if head_dim % 2:
        return [f"model.hidden_size / model.num_attention_heads = {m['hidden_size']} / "
                f"{m['num_attention_heads']} = head_dim {head_dim} is odd: rotary embeddings rotate pairs"]
    return []


# --- lengths -----------------------------------------------------------------------------------


def prompt_leaves_room_for_target(cfg: dict) -> list[str]:
    """Prompts are cut to src_length, targets to max_length minus the prompt: with
    src_length >= max_length a long prompt keeps no target token (our encoder keeps only eos,
    upstream's tokenizes the target with max_length <= 0), and sft learns nothing from it."""
    sft = cfg["sft"]
    if sft["src_length"] >= sft["max_length"]:
        return [f"{_key(cfg, 'sft.src_length')} ({sft['src_length']}) must be less than "
                f"{_key(cfg, 'sft.max_length')} ({sft['max_length']}): the prompt leaves no room for the target"]
    return []


def training_fits_positions(cfg: dict) -> list[str]:
    """A training example longer than max_position_embeddings fails in the rotary embedding
    (gather "index 32 >= 32"), at the first batch that holds one."""
    shape = model_shape(cfg)
    if not shape or not shape.max_positions:
        return []
    max_length = cfg["sft"]["max_length"]
    if max_length > shape.max_positions:
        return [f"{_key(cfg, 'sft.max_length')} ({max_length}) exceeds {shape.key('max_position_embeddings')} "
                f"({shape.max_positions}): longer examples fail in the rotary embedding"]
    return []


def _decode_length(cfg: dict) -> tuple[int, str]:
    """What export bakes in and predict decodes: prompt (src_length) + export.max_new_tokens."""
    src, new = cfg["sft"]["src_length"], cfg["export"]["max_new_tokens"]
    label = f"{_key(cfg, 'sft.src_length')} + {_key(cfg, 'export.max_new_tokens')} ({src} + {new} = {src + new})"
    return src + new, label


def decoding_fits_positions(cfg: dict) -> list[str]:
    """Decoding reaches position src_length + max_new_tokens: our exported loop fails past
    max_position_embeddings (gather "index 32 >= 32" from 20 + 20 on 32 positions; 20 + 13 still
    decodes), and upstream export_model.py/predictor.py refuse src_length + max_length above it.
    Upstream's bound, the stricter by one token, holds on both targets."""
    shape = model_shape(cfg)
    if not shape or not shape.max_positions:
        return []
    total, label = _decode_length(cfg)
    if total > shape.max_positions:
        return [f"{label} exceeds {shape.key('max_position_embeddings')} ({shape.max_positions}): "
                f"export and predict decode past the model's positions"]
    return []


def decoding_fits_upstream_predictor(cfg: dict) -> list[str]:
    """npu export/predict run upstream's PredictorArgument, which asserts src_length +
    max_length <= total_max_length (4096 by default; export_args/predictor_args do not pass it)."""
    if not _on_npu(cfg):
        return []
    total, label = _decode_length(cfg)
    if total > UPSTREAM_TOTAL_MAX_LENGTH:
        return [f"{label} exceeds {UPSTREAM_TOTAL_MAX_LENGTH}, upstream predictor's total_max_length: "
                f"export_model.py would stop on its assertion"]
    return []


def predict_within_export(cfg: dict) -> list[str]:
    """The exported graph is sized for export.max_new_tokens; predict refuses more, after
    sft, merge and export have run."""
    asked, baked = cfg["predict"]["max_new_tokens"], cfg["export"]["max_new_tokens"]
    if asked > baked:
        return [f"{_key(cfg, 'predict.max_new_tokens')} ({asked}) exceeds {_key(cfg, 'export.max_new_tokens')} "
                f"({baked}): lengths are baked in at export"]
    return []


# --- training cadence --------------------------------------------------------------------------


def warmup_ends_before_training(cfg: dict) -> list[str]:
    """The linear schedule ramps up for warmup_steps, then decays: with warmup_steps >= max_steps
    the run ends before the ramp does, so it never trains at sft.learning_rate (strict: at
    warmup == max_steps the peak would come after the last step)."""
    sft = cfg["sft"]
    if sft["warmup_steps"] >= sft["max_steps"]:
        return [f"{_key(cfg, 'sft.warmup_steps')} ({sft['warmup_steps']}) must be less than "
                f"{_key(cfg, 'sft.max_steps')} ({sft['max_steps']}): the learning rate would never reach "
                f"{_key(cfg, 'sft.learning_rate')}"]
    return []


def checkpoints_are_written(cfg: dict) -> list[str]:
    """The Trainer saves when global_step % save_steps == 0: past max_steps it never saves, and a
    killed sft starts over (upstream's own 1000 > 100 did exactly that)."""
    sft = cfg["sft"]
    if sft["save_steps"] > sft["max_steps"]:
        return [f"{_key(cfg, 'sft.save_steps')} ({sft['save_steps']}) exceeds {_key(cfg, 'sft.max_steps')} "
                f"({sft['max_steps']}): no checkpoint is ever written, so a killed run starts over"]
    return []


def losses_are_logged(cfg: dict) -> list[str]:
    """The Trainer logs when global_step % logging_steps == 0: past max_steps there is no loss
    log (the npu sft collector fails with "no loss lines"; the loss plot is empty)."""
    sft = cfg["sft"]
    if sft["logging_steps"] > sft["max_steps"]:
        return [f"{_key(cfg, 'sft.logging_steps')} ({sft['logging_steps']}) exceeds {_key(cfg, 'sft.max_steps')} "
                f"({sft['max_steps']}): no loss is ever logged"]
    return []


def lora_rank_is_low_rank(cfg: dict) -> list[str]:
    """LoRA adapts q/k/v/o/gate/up/down: the update B @ A of a d_in x d_out weight has rank at
    most min(d_in, d_out), so a larger lora_rank trains parameters that add no capacity (Paddle
    does not refuse it: rank 100 on hidden 64 trains without error)."""
    if not cfg["sft"]["lora"]:
        return []
    shape = model_shape(cfg)
    if not shape:
        return []
    dims = {shape.key("hidden_size"): shape.shape.hidden_size,
            "the key/value width": shape.shape.num_key_value_heads * shape.shape.head_dim,
            shape.key("intermediate_size"): shape.shape.intermediate_size}
    limit_key = min(dims, key=dims.get)
    rank = cfg["sft"]["lora_rank"]
    if rank > dims[limit_key]:
        return [f"{_key(cfg, 'sft.lora_rank')} ({rank}) exceeds {limit_key} ({dims[limit_key]}), the smallest "
                f"dimension LoRA adapts: the extra rank trains parameters but adds no capacity"]
    return []


# --- cards and parallel layout (npu) ------------------------------------------------------------


def cards_are_listed_once(cfg: dict) -> list[str]:
    """A card twice would put two ranks on one card; the container runner refuses it at job time."""
    if not _on_npu(cfg):
        return []
    ids = card_ids(cfg)
    twice = sorted({c for c in ids if ids.count(c) > 1})
    if twice:
        return [f"{_devices_key(cfg)} ({cfg['devices']}): card(s) {', '.join(map(str, twice))} listed twice"]
    return []


def cards_are_ascending(cfg: dict) -> list[str]:
    """CANN: ASCEND_RT_VISIBLE_DEVICES supports only device ids in ascending order."""
    if not _on_npu(cfg):
        return []
    ids = card_ids(cfg)
    if any(a > b for a, b in zip(ids, ids[1:])):
        return [f"{_devices_key(cfg)} ({cfg['devices']}): card ids must be ascending "
                f"(ASCEND_RT_VISIBLE_DEVICES accepts no other order)"]
    return []


def cards_are_on_one_node(cfg: dict) -> list[str]:
    """Card ids are logical ids of one node, 0 .. cards_per_node-1: CANN reads the list only up to
    the first invalid id (so training silently runs on fewer cards), and /dev/davinciN is missing."""
    if not _on_npu(cfg):
        return []
    per_node = _npu(cfg).get("cards_per_node", 8)
    outside = [c for c in card_ids(cfg) if c >= per_node]
    if outside:
        return [f"{_devices_key(cfg)} ({cfg['devices']}): card(s) {', '.join(map(str, outside))} not on a node of "
                f"npu.cards_per_node ({per_node}) cards (ids 0-{per_node - 1})"]
    return []


def smoke_test_covers_the_cards(cfg: dict) -> list[str]:
    """smoke_collective exists to run on every card sft uses: on real cards other ones would let
    a hanging card through to sft. npu.smoke_devices is the CPU rehearsal's process count."""
    npu = _npu(cfg)
    if _on_npu(cfg) and npu.get("smoke_devices") and npu.get("device") != "cpu":
        return [f"npu.smoke_devices ({npu['smoke_devices']}) is for npu.device cpu (the rehearsal): on the cards "
                f"the smoke test runs on every card sft uses ({_devices_key(cfg)}: {cfg['devices']})"]
    return []


def pairing_is_the_pinned_set(cfg: dict) -> list[str]:
    """npu.pairing is what preflight checks the host's driver and the image's CANN against: left
    behind when npu.image changes, it would pass a driver or image of another set (or fail a
    right one)."""
    npu = _npu(cfg)
    pairing, image = npu.get("pairing") or {}, npu.get("image") or {}
    if not _on_npu(cfg) or not pairing:
        return []
    return [f"npu.pairing.{key} ({pairing[key]}) is not npu.image.{key} ({image.get(key)}): the pairing table "
            "describes the pinned set; change both together, with the new set's driver and CANN "
            "(docs/npu-pins.md)"
            for key in ("base", "paddle_version", "paddle_custom_npu_version")
            if pairing.get(key) is not None and pairing[key] != image.get(key)]


def _degrees(cfg: dict) -> dict | None:
    """The pinned degrees (None for ``parallel: auto``, where the planner picks a layout that fits)."""
    par = _npu(cfg).get("parallel")
    return par if _on_npu(cfg) and isinstance(par, dict) else None


def layout_divides_cards(cfg: dict) -> list[str]:
    """PaddleNLP asserts tp * pp divides the world and floors dp = world // (tp * pp * sharding);
    the hybrid topology then needs tp * pp * sharding * dp to be the whole world."""
    par = _degrees(cfg)
    if not par:
        return []
    tp, pp, sh = (par["tensor_parallel_degree"], par["pipeline_parallel_degree"], par["sharding_parallel_degree"])
    nodes = _npu(cfg)["nodes"]
    world = len(card_ids(cfg)) * nodes
    if world % (tp * pp * sh):
        from llamapipe.config.parallel import fix_lines

        return [f"npu.parallel: tensor x pipeline x sharding = {tp} x {pp} x {sh} = {tp * pp * sh} does not divide "
                f"the {world} cards ({_devices_key(cfg)} {cfg['devices']!r} x npu.nodes {nodes}){fix_lines(cfg)}"]
    return []


def tensor_parallel_splits_heads(cfg: dict) -> list[str]:
    """PaddleNLP's LlamaAttention asserts num_heads % tensor_parallel_degree == 0 (and with
    fuse_attention_qkv raises for key/value heads)."""
    par, shape = _degrees(cfg), model_shape(cfg)
    if not par or not shape:
        return []
    tp = par["tensor_parallel_degree"]
    problems = [f"npu.parallel.tensor_parallel_degree ({tp}) does not divide {shape.key(field)} ({heads}): "
                f"each card holds whole heads"
                for field, heads in (("num_attention_heads", shape.shape.num_attention_heads),
                                     ("num_key_value_heads", shape.shape.num_key_value_heads))
                if heads % tp]
    if problems and not layout_divides_cards(cfg):  # one set of fixes, under the first layout problem
        from llamapipe.config.parallel import fix_lines

        problems[-1] += fix_lines(cfg)
    return problems


# --- nodes (both targets: npu.nodes/master/ips, the cpu target's sft.nodes/master) -------------


def _launch_keys(cfg: dict) -> tuple[str, dict]:
    """The section that holds the launch layout, and its name as a user writes it."""
    return ("npu", _npu(cfg)) if _on_npu(cfg) else ("sft", cfg.get("sft") or {})


def _node_launcher(cfg: dict) -> str:
    return _launch_keys(cfg)[1].get("node_launcher") or "local"


def _multi_node(cfg: dict) -> bool:
    return _launch_keys(cfg)[1].get("nodes", 1) > 1


def _split_host_port(master: str) -> tuple[str, int] | None:
    host, sep, port = master.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def _ips(cfg: dict) -> list[str]:
    return [ip.strip() for ip in (_npu(cfg).get("ips") or "").split(",") if ip.strip()]


def launch_layout_keys_match_the_target(cfg: dict) -> list[str]:
    """On npu the processes are the cards in ``devices`` and the nodes ``npu.nodes``: the cpu
    target's sft.processes/nodes/master would be silently ignored there."""
    if not _on_npu(cfg):
        return []
    sft = cfg.get("sft") or {}
    defaults = {"processes": 1, "nodes": 1, "master": None}
    return [f"sft.{k} ({sft[k]!r}) is the cpu target's; on npu "
            f"{('one process per card in devices' if k == 'processes' else 'set npu.' + k)}"
            for k, v in defaults.items() if k in sft and sft[k] != v]


def nodes_have_a_master(cfg: dict) -> list[str]:
    """Without --master every node's launcher starts its own rendezvous server ("Copy the
    following command to other nodes") and waits for peers that never come. srun may leave it
    to the job (its first node); the local stand-in's master is this host's loopback, which is
    the address the launcher recognises as its own (127.0.0.1, not "localhost")."""
    if not _multi_node(cfg):
        return []
    name, sec = _launch_keys(cfg)
    master = sec.get("master")
    if not master:
        if _node_launcher(cfg) == "srun":
            return []
        return [f"{name}.nodes ({sec['nodes']}) > 1 with {name}.node_launcher local needs {name}.master "
                f"(127.0.0.1:<port>: every node's launcher runs on this host)"]
    hp = _split_host_port(master)
    if not hp:
        return [f"{name}.master ({master!r}) is not host:port"]
    if _node_launcher(cfg) == "local" and hp[0] != IPS_LOOPBACK:
        return [f"{name}.master ({master!r}) with {name}.node_launcher local must be {IPS_LOOPBACK}:<port>: "
                f"the launchers all run on this host, and only that address makes one of them the master"]
    return []


def local_nodes_stay_off_the_cards(cfg: dict) -> list[str]:
    """The local stand-in starts every node's launcher on this host: on real cards that is
    npu.nodes launchers over the same devices."""
    if not (_on_npu(cfg) and _multi_node(cfg) and _node_launcher(cfg) == "local"):
        return []
    if _npu(cfg).get("device", "npu") == "cpu":
        return []
    return [f"npu.node_launcher local with npu.nodes ({_npu(cfg)['nodes']}) > 1 starts every node's launcher "
            f"on this host's cards: set npu.node_launcher: srun (a SLURM job over the nodes, profiles/slurm)"]


def nodes_are_listed(cfg: dict) -> list[str]:
    """npu.ips, when given (srun), is passed as --ips: one address per node, each once;
    paddle.distributed.launch raises for 127.0.0.1 among several (and ranks nodes by their index
    in the list). The local stand-in has no addresses to list."""
    if not _multi_node(cfg) or not _on_npu(cfg) or not _ips(cfg):
        return []
    npu, ips = _npu(cfg), _ips(cfg)
    if _node_launcher(cfg) == "local":
        return [f"npu.ips ({npu['ips']}) with npu.node_launcher local: every node is this host, leave it null"]
    problems = []
    if len(ips) != npu["nodes"]:
        problems.append(f"npu.ips ({npu['ips']}) lists {len(ips)} address(es) for npu.nodes ({npu['nodes']})")
    if len(set(ips)) != len(ips):
        problems.append(f"npu.ips ({npu['ips']}) lists an address twice: two nodes would take the same ranks")
    if IPS_LOOPBACK in ips:
        problems.append(f"npu.ips ({npu['ips']}) holds {IPS_LOOPBACK}: other nodes cannot reach it "
                        f"(paddle.distributed.launch refuses it)")
    return problems


def master_is_a_node(cfg: dict) -> list[str]:
    """Only the launcher whose node address equals the master host starts the rendezvous server:
    a master outside the nodes (or a hostname instead of the address) leaves every node waiting."""
    if not _on_npu(cfg) or not _multi_node(cfg) or not _ips(cfg) or not _split_host_port(_npu(cfg).get("master") or ""):
        return []
    host = _split_host_port(_npu(cfg)["master"])[0]
    if host not in _ips(cfg):
        return [f"npu.master host {host} is not one of npu.ips ({_npu(cfg)['ips']})"]
    return []


def nodes_share_the_host_network(cfg: dict) -> list[str]:
    """The launchers and HCCL connect to each other's addresses: a container on network none or
    bridge (no published ports) cannot be reached from the other nodes."""
    if not _on_npu(cfg) or not _multi_node(cfg) or cfg.get("runtime") != "container" or _node_launcher(cfg) != "srun":
        return []
    network = _npu(cfg).get("network", "host")
    if network != "host":
        return [f"npu.nodes ({_npu(cfg)['nodes']}) > 1 needs npu.network: host (got {network}): "
                f"the nodes must reach each other"]
    return []


# --- download source ---------------------------------------------------------------------------


def _url_scheme(url: str) -> str:
    return urlparse(url).scheme.lower()


def url_scheme_is_fetchable(cfg: dict) -> list[str]:
    """stages/download.py fetches http(s):// and file: only."""
    url = cfg["data"]["url"]
    if _url_scheme(url) not in DOWNLOAD_SCHEMES:
        return [f"{_key(cfg, 'data.url')} ({url}): scheme {_url_scheme(url) or '(none)'!r} cannot be fetched; "
                f"use http://, https:// or file:"]
    return []


def url_names_a_file(cfg: dict) -> list[str]:
    """The download caches the archive under the url's file name and refuses a url without one."""
    url = cfg["data"]["url"]
    if _url_scheme(url) in DOWNLOAD_SCHEMES and not posixpath.basename(urlparse(url).path):
        return [f"{_key(cfg, 'data.url')} ({url}) names no file: the download needs the archive's file name"]
    return []


def _local_archive_problem(url: str) -> str | None:
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        return f"names host {parsed.netloc!r}; use file:///absolute/path or file:relative/path"
    try:
        found = locate_file_url(url)
    except PipelineError as err:
        return str(err)
    path = found.path
    if not found.exists:
        return found.missing()
    if not os.path.isfile(path):
        return f"{path} is not a regular file"
    try:
        is_tar = tarfile.is_tarfile(path)
    except OSError as err:
        return f"{path} cannot be read: {err.strerror or err}"
    if not is_tar:
        return f"{path} is not a tar archive (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz)"
    return None


def local_archive_exists(cfg: dict) -> list[str]:
    """A file: url is read when download_data runs, after preflight: check it now. A relative path
    is the project directory's (the working directory of Snakemake and of every job, ``-d``) or,
    if not there, the workflow's (the checkout: ``file:assets/...`` under ``snakemake -d OTHER``),
    as the download resolves it (``llamapipe.config.paths.file_url_path``). The content is
    checked, as extract opens it (tarfile "r:*"), not the file name."""
    url = cfg["data"]["url"]
    if _url_scheme(url) != "file" or not posixpath.basename(urlparse(url).path):
        return []
    problem = _local_archive_problem(url)
    return [f"{_key(cfg, 'data.url')} ({url}): {problem}"] if problem else []


def sha256_is_hex(cfg: dict) -> list[str]:
    """The download verifies the archive against 64 hex digits and refuses anything else. null is
    trust on first use, which only a download has: a file: url is on this host, so it is pinned
    (the message gives its sha256)."""
    url, digest, key = cfg["data"]["url"], cfg["data"]["sha256"], _key(cfg, "data.sha256")
    if digest is None:
        if _url_scheme(url) != "file":
            return []
        try:
            path = file_url_path(url)
        except PipelineError:
            return []  # local_archive_exists names the url's problem
        try:
            now = f"its sha256 is {sha256_file(path)}"
        except OSError:
            now = f"sha256sum {path} prints it"
        return [f"{key} is null, but {_key(cfg, 'data.url')} ({url}) is a local file: there is no download to "
                f"trust on first use, so pin it ({now})"]
    digest = str(digest).strip()
    if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
        return [f"{key} ({digest!r}) must be 64 hex digits (got {len(digest)} characters)"]
    return []


def npu_trains_on_real_data(cfg: dict) -> list[str]:
    """The bundled sample (480 synthetic records, for the cpu target's tests) teaches llama2-13b
    nothing: on target npu it is refused unless data.allow_sample says so. The rehearsal runs the
    npu DAG at the cpu target's sizes, on the sample, by design."""
    data = cfg["data"]
    if not _on_npu(cfg) or cfg.get("rehearsal") or data.get("allow_sample"):
        return []
    url, digest = data["url"], str(data.get("sha256") or "").strip().lower()
    if posixpath.basename(urlparse(url).path) != SAMPLE_ARCHIVE and digest != SAMPLE_SHA256:
        return []
    return [f"{_key(cfg, 'data.url')} ({url}) is the bundled sample: 480 synthetic records written for the "
            f"cpu target's tests, from which llama2-13b learns nothing. Target npu trains on the guide's archive "
            f"(config.yaml's npu.data: url {ADVERTISEGEN_URL}, sha256 null until pinned); to train on the sample "
            f"on purpose (e.g. a first pass through the whole DAG on the cards), set data.allow_sample: true "
            f"(--config 'data={{allow_sample: true}}')"]


Rule = Callable[[dict], "list[str]"]
RULES: tuple[Rule, ...] = (
    rehearsal_needs_npu_target,
    pretrain_needs_npu_target,
    tiny_model_shape,
    prompt_leaves_room_for_target,
    training_fits_positions,
    decoding_fits_positions,
    decoding_fits_upstream_predictor,
    predict_within_export,
    warmup_ends_before_training,
    checkpoints_are_written,
    losses_are_logged,
    lora_rank_is_low_rank,
    cards_are_listed_once,
    cards_are_ascending,
    cards_are_on_one_node,
    smoke_test_covers_the_cards,
    pairing_is_the_pinned_set,
    layout_divides_cards,
    tensor_parallel_splits_heads,
    launch_layout_keys_match_the_target,
    nodes_have_a_master,
    local_nodes_stay_off_the_cards,
    nodes_are_listed,
    master_is_a_node,
    nodes_share_the_host_network,
    url_scheme_is_fetchable,
    url_names_a_file,
    local_archive_exists,
    sha256_is_hex,
    npu_trains_on_real_data,
)
