"""Parallel-strategy planner: which tp x pp x sharding x dp layout trains a LLaMA on the cards we have.

PaddleNLP's 4D hybrid parallelism splits the world of ``nodes * cards_per_node`` cards into
tensor parallel (``tp``, PaddleNLP ``tensor_parallel_degree``), pipeline (``pp``,
``pipeline_parallel_degree``), sharding (``sharding``, ``sharding_parallel_degree``, ZeRO stage
``sharding_stage``) and data parallel (``dp``, derived by PaddleNLP as
``world // (tp * pp * sharding)``). This module

* rejects layouts PaddleNLP cannot run (:func:`check_layout`),
* estimates the memory one card needs (:func:`estimate_memory`, formulas in the docstrings),
* estimates a relative step time (:func:`estimate_cost`), and
* enumerates, ranks and picks a layout (:func:`plan`), printing a table (:func:`format_table`) and
  writing ``results/plan.json`` (:func:`to_json`).

Units: ``GB`` means 10**9 bytes everywhere, as in the ZeRO paper's numbers. A 910B's "64 GB" of
HBM are taken as 64e9 bytes, which under-states the card's 64 GiB by 7%: one more safety margin
on top of :data:`USABLE_FRACTION`.

Pure Python and stdlib; Python 3.9 compatible (it may run inside the py39 paddle-npu image).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from llamapipe.core.errors import PipelineError

GB = 1e9
"""Bytes in a GB (decimal, as the ZeRO paper counts: 7.5B params x 16 bytes = 120 GB)."""

ASCEND_910B_MEMORY_GB = 64.0
"""HBM per Ascend 910B card."""

FRAMEWORK_OVERHEAD_GB = 2.5
"""Fixed per-card memory outside the model: the Paddle/CANN runtime context, HCCL buffers,
kernel workspaces and allocator fragmentation. An assumption (2-3 GB is typical), not measured."""

USABLE_FRACTION = 0.9
"""A layout fits when its estimate is at most this share of the card's memory: the estimate
leaves out temporary buffers (e.g. fused-op workspaces, the fp32 cast of a gradient bucket)."""

COMPUTE_FLOPS_PER_S = 150e12
"""Effective bf16 matmul rate per card assumed by the cost model (about half of a 910B's nominal
~300 TFLOPS). Only ratios between the cost terms matter: the score is relative."""

INTRA_NODE_BYTES_PER_S = 100e9
"""Effective collective bandwidth per card inside a node (HCCS). An assumption, relative."""

INTER_NODE_BYTES_PER_S = 25e9
"""Effective collective bandwidth per card across nodes (one 200 Gb/s RoCE port). Relative."""

MC2_TP_OVERLAP = 0.95
"""Share of tensor-parallel communication hidden behind compute with ``FLAGS_NPU_MC2=1`` (the
guide: "95% of the communication is hidden in computation")."""

SCORE_TIE = 0.02
"""Layouts whose modelled time per sample is within 2% of the fastest are treated as equally
fast (the cost model is not that precise); among those the one with the most memory headroom
is chosen."""

DEGREES = ("tp", "pp", "sharding", "dp")
"""The four degrees of a layout, in PaddleNLP's ``tensor``/``pipeline``/``sharding``/``data`` terms."""

TOPOLOGY_ORDER = ("dp", "pp", "sharding", "tp")
"""Rank order of PaddleNLP's default ``hybrid_parallel_topo_order="pp_first"``
(``["dp", "pp", "sharding", "sep", "mp"]``, outermost first): tensor-parallel ranks are
neighbours, so a tp group sits inside one node whenever ``tp`` divides ``cards_per_node``."""

DTYPES = ("bf16", "fp16", "fp32")

KNOWN_MODELS: dict[str, dict[str, int]] = {
    "meta-llama/Llama-2-7b": {
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 32000, "intermediate_size": 11008,
    },
    "meta-llama/Llama-2-13b": {
        "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
        "num_key_value_heads": 40, "vocab_size": 32000, "intermediate_size": 13824,
    },
    "meta-llama/Llama-2-70b": {
        "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, "vocab_size": 32000, "intermediate_size": 28672,
    },
}
"""Shapes from the models' Hugging Face ``config.json`` files."""
KNOWN_MAX_POSITIONS = {name: 4096 for name in KNOWN_MODELS if name.startswith("meta-llama/Llama-2-")}


# --------------------------------------------------------------------------------------------
# validation helpers


def _int_field(where: str, name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PipelineError(f"{where}: {name} must be an integer, got {value!r}")
    if value < minimum:
        raise PipelineError(f"{where}: {name} must be >= {minimum}, got {value}")
    return value


def _bool_field(where: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise PipelineError(f"{where}: {name} must be true or false, got {value!r}")
    return value


def _fraction_field(where: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise PipelineError(f"{where}: {name} must be a number between 0 and 1, got {value!r}")
    return float(value)


def _known_fields(where: str, cls: type, data: Any, required: bool) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise PipelineError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise PipelineError(f"{where}: unknown field(s) {', '.join(map(str, unknown))} "
                            f"(known: {', '.join(names)})")
    if required:
        missing = [n for n in names if n not in data]
        if missing:
            raise PipelineError(f"{where}: missing field(s) {', '.join(missing)}")
    return dict(data)


# --------------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True)
class ModelShape:
    """The shape of a LLaMA decoder (the fields of its Hugging Face ``config.json``)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    intermediate_size: int

    def __post_init__(self) -> None:
        where = "model shape"
        for f in fields(self):
            _int_field(where, f.name, getattr(self, f.name))
        if self.hidden_size % self.num_attention_heads:
            raise PipelineError(f"{where}: hidden_size {self.hidden_size} is not divisible by "
                                f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise PipelineError(f"{where}: num_key_value_heads {self.num_key_value_heads} does not "
                                f"divide num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelShape:
        """Strict: every field present, no unknown field (a typo must not pass silently)."""
        return cls(**_known_fields("model shape", cls, data, required=True))

    @classmethod
    def from_hf_config(cls, data: Mapping[str, Any]) -> ModelShape:
        """From a Hugging Face/PaddleNLP ``config.json``: other keys are ignored, a missing
        ``num_key_value_heads`` means no GQA (as in ``LlamaConfig``)."""
        if not isinstance(data, Mapping):
            raise PipelineError("model config: expected a JSON object")
        values = {f.name: data.get(f.name) for f in fields(cls)}
        if values["num_key_value_heads"] is None:
            values["num_key_value_heads"] = values["num_attention_heads"]
        missing = [k for k, v in values.items() if v is None]
        if missing:
            raise PipelineError(f"model config: missing field(s) {', '.join(missing)}")
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_parameters(self) -> dict[str, int]:
        """Parameters of one decoder layer (LLaMA has no biases):

        * attention: q and o are ``h*h`` each; k and v are ``h * kv_heads*head_dim``
          (= ``h*h*kv/heads``, grouped-query attention);
        * MLP (SwiGLU): gate, up and down are ``h*ffn`` each, ``3*h*ffn``;
        * norms: two RMSNorm weights of ``h``.
        """
        h = self.hidden_size
        kv_dim = self.num_key_value_heads * self.head_dim
        return {"attention": 2 * h * h + 2 * h * kv_dim, "mlp": 3 * h * self.intermediate_size,
                "norms": 2 * h}

    def num_parameters(self) -> int:
        """All parameters: embedding ``V*h`` + layers + final norm ``h`` + untied lm head ``V*h``
        (Llama-2 has ``tie_word_embeddings: false``). Llama-2-13b: 13,015,864,320."""
        per_layer = sum(self.layer_parameters().values())
        vh = self.vocab_size * self.hidden_size
        return vh + self.num_hidden_layers * per_layer + self.hidden_size + vh

    def lora_layer_parameters(self, rank: int, tp: int = 1) -> dict[str, float]:
        """LoRA adapter parameters of one decoder layer on one card, rank ``r`` on every projection
        PaddleNLP's LLaMA targets (q, k, v, o, gate, up, down; ``stages/sft.py``
        ``LORA_TARGET_MODULES``). An adapter of a ``d_in x d_out`` weight is ``A: d_in x r`` and
        ``B: r x d_out``, ``r*(d_in + d_out)`` parameters. Under tensor parallelism PaddleNLP splits
        it with its weight (``paddlenlp/peft/lora/lora_layers.py``): a column-parallel projection
        (q, k, v, gate, up) keeps ``A`` whole and splits ``B`` (``r*d_in + r*d_out/tp``), a
        row-parallel one (o, down) splits ``A`` and keeps ``B`` whole (``r*d_in/tp + r*d_out``).

        With ``h`` hidden, ``kv`` the key/value width, ``f`` the MLP width, per card:
        attention ``r*(h + h/t) + 2*r*(h + kv/t) + r*(h/t + h)``, MLP ``2*r*(h + f/t) + r*(f/t + h)``;
        at ``tp`` 1, ``r*(9h + 2kv + 3f)``. The guide's run fuses q/k/v and gate/up into one
        projection each (``fuse_attention_qkv``/``fuse_attention_ffn``), whose single ``A`` makes
        ``r*3h`` fewer parameters: the count here is an upper bound by that much.
        """
        h, kv, f, r, t = self.hidden_size, self.num_key_value_heads * self.head_dim, self.intermediate_size, rank, tp
        attention = r * (h + h / t) + 2 * r * (h + kv / t) + r * (h / t + h)
        mlp = 2 * r * (h + f / t) + r * (f / t + h)
        return {"attention": attention, "mlp": mlp}

    def num_lora_parameters(self, rank: int) -> int:
        """All adapter parameters, ``L * r*(9h + 2kv + 3f)`` (Llama-2-13b, rank 32: 125,173,760)."""
        return int(round(self.num_hidden_layers * sum(self.lora_layer_parameters(rank).values())))

    def to_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def read_model_config(model_config: str, label: str = "--model-config") -> Any:
    """A model config.json path, or the JSON text itself (the rehearsal passes the tiny model's
    shape inline); ``label`` names the setting in messages."""
    try:
        if model_config.lstrip().startswith("{"):
            text = model_config
        else:
            with open(model_config, encoding="utf-8") as f:
                text = f.read()
        return json.loads(text)
    except OSError as exc:
        raise PipelineError(f"{label} {model_config}: cannot read: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{label} {model_config}: not JSON: {exc}") from exc


def shape_of(data: Any) -> ModelShape:
    """A Hugging Face/PaddleNLP config (``model_type`` or ``architectures`` present) is read
    leniently; anything else must hold exactly the six shape fields."""
    if isinstance(data, Mapping) and ("model_type" in data or "architectures" in data):
        return ModelShape.from_hf_config(data)
    return ModelShape.from_dict(data)


@dataclass(frozen=True)
class TrainSetup:
    """How a run trains, plus the hardware. Defaults are upstream's ``llama_npu_sft_N1C8.sh``:
    seq 4096 (``max_length``), per-device batch 2, gradient accumulation 64, bf16 O2 with
    ``amp_master_grad``, ``recompute false``, ``sharding stage1``, sequence parallel, flash
    attention, MC2 on, one node of 8 Ascend 910B (64 GB).

    * ``dtype``: ``bf16``/``fp16`` means AMP O2 (16-bit weights, fp32 master weights and Adam
      moments in the optimizer); ``fp32`` is plain fp32 training.
    * ``master_grad``: PaddleNLP's ``amp_master_grad`` (O2 only): weight gradients are kept in
      fp32 after backward (4 bytes instead of 2).
    * ``sharding_stage``: ZeRO stage of the sharding group, 0 (off), 1 (optimizer states),
      2 (+ gradients), 3 (+ parameters).
    * ``tp_overlap``/``dp_overlap``: the share of tensor-parallel / sharding+data-parallel
      communication hidden behind compute (see :func:`estimate_cost`).
    * ``lora``/``lora_rank``: LoRA fine-tuning (``llama_npu_lora_N1C8.sh``: rank 32): the base
      weights are frozen (no gradients, no optimizer state), rank ``lora_rank`` adapters train
      (:meth:`ModelShape.lora_layer_parameters`). Upstream's LoRA script runs without
      ``--sharding``: ``llamapipe plan --lora`` defaults to ``sharding_stage`` 0.
    """

    seq_length: int = 4096
    micro_batch_size: int = 2
    gradient_accumulation_steps: int = 64
    dtype: str = "bf16"
    master_grad: bool = True
    recompute: bool = False
    sharding_stage: int = 1
    sequence_parallel: bool = True
    flash_attention: bool = True
    cards_per_node: int = 8
    nodes: int = 1
    memory_per_card_gb: float = ASCEND_910B_MEMORY_GB
    tp_overlap: float = MC2_TP_OVERLAP
    dp_overlap: float = 0.0
    lora: bool = False
    lora_rank: int = 32

    def __post_init__(self) -> None:
        where = "train setup"
        for name in ("seq_length", "micro_batch_size", "gradient_accumulation_steps",
                     "cards_per_node", "nodes", "lora_rank"):
            _int_field(where, name, getattr(self, name))
        _int_field(where, "sharding_stage", self.sharding_stage, minimum=0)
        if self.sharding_stage > 3:
            raise PipelineError(f"{where}: sharding_stage must be 0, 1, 2 or 3, got {self.sharding_stage}")
        if self.dtype not in DTYPES:
            raise PipelineError(f"{where}: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("master_grad", "recompute", "sequence_parallel", "flash_attention", "lora"):
            _bool_field(where, name, getattr(self, name))
        mem = self.memory_per_card_gb
        if isinstance(mem, bool) or not isinstance(mem, (int, float)) or not mem > 0:
            raise PipelineError(f"{where}: memory_per_card_gb must be a positive number, got {mem!r}")
        _fraction_field(where, "tp_overlap", self.tp_overlap)
        _fraction_field(where, "dp_overlap", self.dp_overlap)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainSetup:
        """Missing fields take the upstream defaults; unknown fields are an error."""
        return cls(**_known_fields("train setup", cls, data, required=False))

    @property
    def total_cards(self) -> int:
        return self.nodes * self.cards_per_node

    @property
    def usable_gb(self) -> float:
        return self.memory_per_card_gb * USABLE_FRACTION

    def describe(self) -> str:
        amp = "fp32" if self.dtype == "fp32" else (
            f"{self.dtype} O2" + (" + master grad" if self.master_grad else ""))
        parts = [f"seq {self.seq_length}", f"micro-batch {self.micro_batch_size}",
                 f"grad-acc {self.gradient_accumulation_steps}", amp,
                 f"sharding stage {self.sharding_stage}",
                 "sequence parallel" if self.sequence_parallel else "no sequence parallel",
                 "flash attention" if self.flash_attention else "no flash attention",
                 "recompute" if self.recompute else "no recompute"]
        if self.lora:
            parts.insert(0, f"LoRA rank {self.lora_rank} (base frozen)")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, order=True)
class ParallelLayout:
    """One 4D layout; ``world = tp * pp * sharding * dp`` must equal the number of cards."""

    tp: int
    pp: int
    sharding: int
    dp: int

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.sharding * self.dp

    def label(self) -> str:
        return f"tp {self.tp}, pp {self.pp}, sharding {self.sharding}, dp {self.dp}"

    def to_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "pp": self.pp, "sharding": self.sharding, "dp": self.dp}


# --------------------------------------------------------------------------------------------
# feasibility


def _rank_coords(layout: ParallelLayout) -> list[dict[str, int]]:
    """Coordinates of every rank in PaddleNLP's pp_first topology (tp innermost)."""
    sizes = [getattr(layout, axis) for axis in TOPOLOGY_ORDER]
    return [dict(zip(TOPOLOGY_ORDER, combo)) for combo in itertools.product(*(range(n) for n in sizes))]


def group_spans_nodes(layout: ParallelLayout, axes: tuple[str, ...], cards_per_node: int) -> bool:
    """True when some communication group over ``axes`` (e.g. ``("tp",)`` or
    ``("sharding", "dp")``) has members on more than one node. Rank ``r`` lives on node
    ``r // cards_per_node``; ranks are numbered in :data:`TOPOLOGY_ORDER`."""
    groups: dict[tuple[int, ...], set[int]] = {}
    for rank, coords in enumerate(_rank_coords(layout)):
        key = tuple(coords[a] for a in TOPOLOGY_ORDER if a not in axes)
        groups.setdefault(key, set()).add(rank // cards_per_node)
    return any(len(nodes) > 1 for nodes in groups.values())


def check_layout(shape: ModelShape, setup: TrainSetup, layout: ParallelLayout) -> list[str]:
    """Reasons why PaddleNLP cannot run ``layout`` (empty list: possible).

    * the degrees must multiply to the cards (``nodes * cards_per_node``);
    * tp must divide ``num_attention_heads`` and ``num_key_value_heads`` (PaddleNLP's
      ``LlamaAttention`` asserts both);
    * pp must divide ``num_hidden_layers`` (decoder layers are split evenly over stages);
    * sequence parallel needs tp > 1 (it shards activations over the tp group);
    * ``sharding > 1`` needs ``sharding_stage`` 1-3 (stage 0 shards nothing: put those ranks in
      dp instead). The reverse, a stage with ``sharding == 1``, is allowed: PaddleNLP warns
      "sharding_parallel_degree=1 means no sharding" and clears ``sharding``; upstream N1C8 runs
      exactly that (``--sharding_parallel_degree 1 --sharding stage1``);
    * tensor parallel must stay within a node (its collectives run 4 times per layer per
      micro-batch; across nodes they would dominate the step).

    A vocabulary not divisible by tp is not a reason: PaddleNLP then keeps the embedding and
    lm head whole on every tp rank (see :func:`layout_notes`).
    """
    reasons: list[str] = []
    for axis in DEGREES:
        value = getattr(layout, axis)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return [f"{axis} must be a positive integer, got {value!r}"]
    cards = setup.total_cards
    if layout.world != cards:
        reasons.append(f"tp*pp*sharding*dp = {layout.tp}*{layout.pp}*{layout.sharding}*{layout.dp} = "
                       f"{layout.world}, but there are {cards} cards "
                       f"({setup.nodes} node(s) x {setup.cards_per_node})")
    if shape.num_attention_heads % layout.tp:
        reasons.append(f"tp {layout.tp} does not divide num_attention_heads {shape.num_attention_heads}")
    if shape.num_key_value_heads % layout.tp:
        reasons.append(f"tp {layout.tp} does not divide num_key_value_heads {shape.num_key_value_heads}")
    if shape.num_hidden_layers % layout.pp:
        reasons.append(f"pp {layout.pp} does not divide num_hidden_layers {shape.num_hidden_layers}")
    if setup.sequence_parallel and layout.tp == 1:
        reasons.append("sequence parallel needs tp > 1 (it splits activations across the "
                       "tensor-parallel group); turn sequence_parallel off for tp 1 layouts")
    if layout.sharding > 1 and setup.sharding_stage == 0:
        reasons.append(f"sharding {layout.sharding} with sharding_stage 0 shards nothing: set "
                       f"sharding_stage 1, 2 or 3, or give those ranks to dp")
    if layout.tp > setup.cards_per_node:
        reasons.append(f"tensor parallel must stay within a node: tp {layout.tp} > "
                       f"{setup.cards_per_node} cards per node")
    elif layout.world == cards and group_spans_nodes(layout, ("tp",), setup.cards_per_node):
        reasons.append(f"tensor parallel must stay within a node: tp {layout.tp} does not divide "
                       f"{setup.cards_per_node} cards per node, so some tp groups straddle two nodes")
    return reasons


def layout_notes(shape: ModelShape, setup: TrainSetup, layout: ParallelLayout) -> list[str]:
    """Things worth knowing about a possible layout that do not make it impossible."""
    notes: list[str] = []
    if layout.tp > 1 and shape.vocab_size % layout.tp:
        notes.append(f"vocab_size {shape.vocab_size} is not divisible by tp {layout.tp}: PaddleNLP "
                     f"keeps embed_tokens and lm_head whole on every tp rank")
    if layout.sharding == 1 and setup.sharding_stage > 0:
        notes.append(f"sharding stage {setup.sharding_stage} over sharding degree 1 shards nothing "
                     f"(PaddleNLP warns and clears `sharding`); optimizer states stay whole")
    return notes


# --------------------------------------------------------------------------------------------
# memory


def model_state_bytes_per_param(dtype: str, master_grad: bool, sharding_stage: int,
                                sharding_degree: int) -> dict[str, float]:
    """Bytes per parameter on one card for weights, gradients and Adam optimizer state.

    Mixed precision (AMP O2, ZeRO paper, Rajbhandari et al. 2020, §3.1): 2 (16-bit weights)
    + 2 (16-bit gradients) + 12 (optimizer: fp32 master weights, momentum, variance) = 16 bytes;
    the paper's 7.5B-parameter example needs 120 GB. With ``master_grad`` (PaddleNLP
    ``amp_master_grad``) gradients are fp32: 2 + 4 + 12 = 18 bytes. fp32 training: 4 + 4 + 8
    (momentum, variance) = 16 bytes.

    ZeRO over a sharding group of ``n`` cards (§5.1-5.3): stage 1 divides the optimizer bytes
    by ``n`` (the paper's P_os: 7.5B over 64 cards, 2 + 2 + 12/64 bytes = 31.4 GB), stage 2 also
    the gradients (P_os+g, 16.6 GB), stage 3 also the weights (P_os+g+p, 1.9 GB).
    """
    if dtype == "fp32":
        param, grad, optimizer = 4.0, 4.0, 8.0
    else:
        param, grad, optimizer = 2.0, (4.0 if master_grad else 2.0), 12.0
    n = max(sharding_degree, 1)
    if sharding_stage >= 1:
        optimizer /= n
    if sharding_stage >= 2:
        grad /= n
    if sharding_stage >= 3:
        param /= n
    return {"params": param, "grads": grad, "optimizer": optimizer}


def activation_bytes_per_layer(seq_length: int, micro_batch: int, hidden: int, heads: int, tp: int = 1,
                               sequence_parallel: bool = False, flash_attention: bool = False,
                               recompute: bool = False, element_scale: float = 1.0) -> float:
    """Activation bytes one transformer layer keeps for backward, per micro-batch (Korthikanti
    et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", §4, eqs. 1-5;
    16-bit activations, ``s`` = seq_length, ``b`` = micro-batch, ``h`` = hidden, ``a`` = heads,
    ``t`` = tp):

    * no parallelism: ``s*b*h*(34 + 5*a*s/h)``;
    * tensor parallel without sequence parallel: ``s*b*h*(10 + 24/t + 5*a*s/(h*t))``
      (layer norms and dropouts, the 10, are replicated on every tp rank);
    * tensor + sequence parallel: ``s*b*h*(34/t + 5*a*s/(h*t))``;
    * full recompute: only the layer input, ``2*s*b*h`` (``/t`` with sequence parallel).

    Flash attention never stores the ``a*s*s`` score/softmax/dropout tensors, so it drops the
    ``5*a*s/h`` term. The "34" was derived for GPT's 4h MLP; LLaMA's SwiGLU MLP with
    ``ffn ~ 2.7h`` stores about as much, so the formula is kept as an approximation.
    ``element_scale`` is 2 for fp32 activations (the formula counts 2-byte elements).
    """
    s, b, h, a, t = seq_length, micro_batch, hidden, heads, max(tp, 1)
    sbh = s * b * h
    if recompute:
        per_layer = 2.0 * sbh / (t if sequence_parallel and t > 1 else 1)
        return per_layer * element_scale
    attention = 0.0 if flash_attention else 5.0 * a * s / h
    if t == 1:
        per_layer = sbh * (34 + attention)
    elif sequence_parallel:
        per_layer = sbh * (34 + attention) / t
    else:
        per_layer = sbh * (10 + (24 + attention) / t)
    return per_layer * element_scale


@dataclass
class MemoryEstimate:
    """Memory one card needs, in GB, for the worst pipeline stage (``stage``).
    ``params_per_card`` counts every weight the card holds, ``trainable_per_card`` those that have
    gradients and optimizer state (all of them, or the LoRA adapters only)."""

    stage: str
    params_per_card: float
    trainable_per_card: float
    params_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float
    overhead_gb: float
    total_gb: float
    capacity_gb: float
    usable_gb: float

    @property
    def fits(self) -> bool:
        return self.total_gb <= self.usable_gb

    def breakdown(self) -> str:
        return (f"params {self.params_gb:.1f} + grads {self.grads_gb:.1f} + optimizer "
                f"{self.optimizer_gb:.1f} + activations {self.activations_gb:.1f} + overhead "
                f"{self.overhead_gb:.1f} = {self.total_gb:.1f} GB")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: (round(getattr(self, f.name), 3) if isinstance(getattr(self, f.name), float)
                        else getattr(self, f.name)) for f in fields(self)}
        out["params_per_card"] = int(round(self.params_per_card))
        out["trainable_per_card"] = int(round(self.trainable_per_card))
        out["fits"] = self.fits
        return out


def _vocab_split(shape: ModelShape, tp: int) -> int:
    """PaddleNLP splits embed_tokens/lm_head over tp only when tp divides the vocabulary."""
    return tp if tp > 1 and shape.vocab_size % tp == 0 else 1


def stage_parameters(shape: ModelShape, layout: ParallelLayout) -> dict[str, float]:
    """Parameters per card of the first and the last pipeline stage.

    Per layer: ``(attention + mlp) / tp + norms`` (RMSNorm weights are replicated over tp).
    Stages hold ``num_hidden_layers / pp`` layers each; the first stage adds the embedding
    ``V*h`` and the last the final norm ``h`` and the lm head ``V*h`` (each ``/tp`` when tp
    divides V). With ``pp == 1`` the one stage holds everything.
    """
    lp = shape.layer_parameters()
    per_layer = (lp["attention"] + lp["mlp"]) / layout.tp + lp["norms"]
    layers = shape.num_hidden_layers / layout.pp * per_layer
    vocab = shape.vocab_size * shape.hidden_size / _vocab_split(shape, layout.tp)
    first = vocab + layers
    last = layers + shape.hidden_size + vocab
    if layout.pp == 1:
        first = last = vocab + layers + shape.hidden_size + vocab
    return {"first": first, "last": last}


def stage_lora_parameters(shape: ModelShape, layout: ParallelLayout, rank: int) -> float:
    """LoRA adapter parameters per card of any pipeline stage: ``num_hidden_layers / pp`` layers of
    :meth:`ModelShape.lora_layer_parameters` (embeddings, norms and the lm head have none)."""
    return shape.num_hidden_layers / layout.pp * sum(shape.lora_layer_parameters(rank, layout.tp).values())


def estimate_memory(shape: ModelShape, setup: TrainSetup, layout: ParallelLayout) -> MemoryEstimate:
    """Memory per card (GB) = model states + activations + :data:`FRAMEWORK_OVERHEAD_GB`.

    * model states: :func:`stage_parameters` x :func:`model_state_bytes_per_param` (ZeRO over
      the ``sharding`` degree; dp replicas hold full copies);
    * LoRA (``setup.lora``): the frozen base weights cost only their weight bytes (the compute
      dtype, 2 bytes in bf16/fp16, 4 in fp32; ZeRO stage 3 shards them too): no gradient, no
      optimizer state (AMP O2 makes master weights for the parameters the optimizer updates
      only). The adapters (:func:`stage_lora_parameters`) cost weights + gradients + optimizer
      like any trained parameter. Activations are counted as without LoRA: backward still needs
      every layer's inputs to pass the gradient down to the adapters (the adapters' own rank-``r``
      intermediates are ``r/h`` of a layer input, left out);
    * activations: ``layers_per_stage`` x :func:`activation_bytes_per_layer` x micro-batches in
      flight. 1F1B pipelining keeps up to ``pp`` micro-batches in flight on the first stage
      (Narayanan et al. 2021, §2.2.1), so the first stage holds ``min(pp, grad_acc)`` and the
      last one. With full recompute a backward pass re-materialises one layer at a time: add
      one layer's full activations as working set;
    * the last stage also keeps the logits for the loss: ``4*s*b*V/t`` bytes (fp32 logits,
      Korthikanti et al. §4.3; PaddleNLP's ``tensor_parallel_output`` keeps them split over tp).

    With pp > 1 both the first and the last stage are estimated and the larger is reported.
    """
    s, b = setup.seq_length, setup.micro_batch_size
    scale = 2.0 if setup.dtype == "fp32" else 1.0
    sp = setup.sequence_parallel and layout.tp > 1
    stage = setup.sharding_stage if layout.sharding > 1 else 0
    per_param = model_state_bytes_per_param(setup.dtype, setup.master_grad, stage, layout.sharding)

    def activations(recompute: bool) -> float:
        return activation_bytes_per_layer(s, b, shape.hidden_size, shape.num_attention_heads, layout.tp,
                                          sp, setup.flash_attention, recompute, scale)

    layers_per_stage = shape.num_hidden_layers // layout.pp
    stored = layers_per_stage * activations(setup.recompute)
    working = activations(False) if setup.recompute else 0.0
    logits = 4.0 * s * b * shape.vocab_size / _vocab_split(shape, layout.tp)
    in_flight = {"first": min(layout.pp, setup.gradient_accumulation_steps), "last": 1}
    params = stage_parameters(shape, layout)
    adapters = stage_lora_parameters(shape, layout, setup.lora_rank) if setup.lora else 0.0
    estimates = []
    for name in ("first", "last") if layout.pp > 1 else ("first",):
        act = stored * in_flight[name] + working + (logits if name == "last" or layout.pp == 1 else 0.0)
        p = params[name] + adapters
        trainable = adapters if setup.lora else p
        parts = {"params": p * per_param["params"] / GB, "grads": trainable * per_param["grads"] / GB,
                 "optimizer": trainable * per_param["optimizer"] / GB}
        total = sum(parts.values()) + act / GB + FRAMEWORK_OVERHEAD_GB
        estimates.append(MemoryEstimate(
            stage=name if layout.pp > 1 else "only", params_per_card=p, trainable_per_card=trainable,
            params_gb=parts["params"],
            grads_gb=parts["grads"], optimizer_gb=parts["optimizer"], activations_gb=act / GB,
            overhead_gb=FRAMEWORK_OVERHEAD_GB, total_gb=total,
            capacity_gb=float(setup.memory_per_card_gb), usable_gb=setup.usable_gb))
    return max(estimates, key=lambda e: e.total_gb)


# --------------------------------------------------------------------------------------------
# cost


@dataclass
class CostEstimate:
    """Modelled seconds per optimizer step on one card; relative, see :func:`estimate_cost`."""

    compute_s: float
    bubble: float
    tp_comm_s: float
    pp_comm_s: float
    dp_comm_s: float
    exposed_comm_s: float
    step_s: float
    samples_per_step: int
    s_per_sample: float

    @property
    def comm_share(self) -> float:
        """Exposed communication as a share of the step."""
        return self.exposed_comm_s / self.step_s if self.step_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: (round(getattr(self, f.name), 6) if isinstance(getattr(self, f.name), float)
                        else getattr(self, f.name)) for f in fields(self)}
        out["comm_share"] = round(self.comm_share, 6)
        return out


def _bandwidth(layout: ParallelLayout, axes: tuple[str, ...], cards_per_node: int) -> float:
    spans = group_spans_nodes(layout, axes, cards_per_node)
    return INTER_NODE_BYTES_PER_S if spans else INTRA_NODE_BYTES_PER_S


def estimate_cost(shape: ModelShape, setup: TrainSetup, layout: ParallelLayout) -> CostEstimate:
    """A deterministic step-time proxy in seconds (relative units: only comparisons between
    layouts mean something; the constants are :data:`COMPUTE_FLOPS_PER_S`,
    :data:`INTRA_NODE_BYTES_PER_S`, :data:`INTER_NODE_BYTES_PER_S`).

    With ``s`` seq, ``b`` micro-batch, ``m`` grad-acc, ``N`` parameters, ``L`` layers,
    ``t, p, n_s, d`` the degrees, ``e`` bytes per activation element (2, or 4 in fp32):

    * compute: ``6*N + 12*L*s*h`` FLOPs per token (Kaplan et al. 2020's ``6N`` plus the attention
      score/context matmuls, Narayanan et al. 2021, eq. 3); full recompute repeats the forward,
      x4/3. A card does ``1/(t*p)`` of its replica's ``s*b*m`` tokens per step. LoRA: a frozen
      weight costs ``4`` FLOPs per token, not 6 (forward, and the input gradient backward needs;
      no weight gradient), the ``N_lora`` adapter weights 6: ``4*N + 6*N_lora + 12*L*s*h``;
      recompute adds a forward, ``2*(N + N_lora) + 4*L*s*h`` (which is the x4/3 above without LoRA).
    * pipeline bubble of 1F1B: ``(p-1)/(p-1+m)``; the busy time is ``compute / (1 - bubble)``.
    * tensor parallel: 4 all-reduce-sized collectives per layer and micro-batch (2 forward,
      2 backward; with sequence parallel each is a reduce-scatter + all-gather pair, the same
      volume, Korthikanti et al. §4.2.2); a ring all-reduce moves ``2*(t-1)/t`` of the buffer
      ``s*b*h*e``, so ``8*(t-1)/t*s*b*h*e`` bytes per layer per micro-batch (x6/4 with
      recompute), over ``L/p`` layers and ``m`` micro-batches. Exposed share:
      ``1 - tp_overlap`` (0.95 hidden with MC2, the guide's claim).
    * pipeline p2p: each micro-batch sends its activations forward and their gradient back,
      ``2*s*b*h*e`` bytes (``/t`` with sequence parallel), not overlapped.
    * sharding + data parallel gradient sync over ``n = n_s*d`` cards: ``2*(n-1)/n`` x the card's
      gradient bytes (LoRA: the adapters' only) once per step (ring all-reduce, or reduce-scatter
      + all-gather under ZeRO; same volume); ZeRO stage 3 also all-gathers the weights in forward
      and backward of every micro-batch, ``2*(n_s-1)/n_s*param_bytes*m``. Exposed share: ``1 - dp_overlap`` (default
      0: not assumed hidden).

    A group inside one node uses the intra-node bandwidth, otherwise the inter-node one.
    ``step = compute/(1 - bubble) + exposed communication``; layouts are compared by
    ``step / samples_per_step`` (``samples_per_step = b*m*n_s*d``: PaddleNLP's per-device batch and
    grad-acc stay as configured, so more data-parallel ranks mean a bigger global batch).
    """
    s, b, m, h = setup.seq_length, setup.micro_batch_size, setup.gradient_accumulation_steps, shape.hidden_size
    t, p, ns, d = layout.tp, layout.pp, layout.sharding, layout.dp
    e = 4.0 if setup.dtype == "fp32" else 2.0
    layers = shape.num_hidden_layers / p
    n_params = shape.num_parameters()
    n_lora = shape.num_lora_parameters(setup.lora_rank) if setup.lora else 0
    trained, frozen = (n_lora, n_params) if setup.lora else (n_params, 0)
    attention = 12.0 * shape.num_hidden_layers * s * h
    per_token = 6.0 * trained + 4.0 * frozen + attention
    if setup.recompute:  # one more forward
        per_token += 2.0 * (trained + frozen) + attention / 3.0
    compute = per_token * s * b * m / (t * p) / COMPUTE_FLOPS_PER_S
    bubble = (p - 1) / (p - 1 + m)
    cpn = setup.cards_per_node

    tp_comm = 0.0
    if t > 1:
        per_layer = 8.0 * (t - 1) / t * s * b * h * e * (1.5 if setup.recompute else 1.0)
        tp_comm = per_layer * layers * m / _bandwidth(layout, ("tp",), cpn)
    pp_comm = 0.0
    if p > 1:
        sp = setup.sequence_parallel and t > 1
        pp_comm = 2.0 * s * b * h * e / (t if sp else 1) * m / _bandwidth(layout, ("pp",), cpn)
    dp_comm = 0.0
    n = ns * d
    if n > 1:
        card_params = max(stage_parameters(shape, layout).values())
        card_trained = stage_lora_parameters(shape, layout, setup.lora_rank) if setup.lora else card_params
        grad_bytes = model_state_bytes_per_param(setup.dtype, setup.master_grad, 0, 1)["grads"]
        dp_comm = 2.0 * (n - 1) / n * card_trained * grad_bytes / _bandwidth(layout, ("sharding", "dp"), cpn)
        if ns > 1 and setup.sharding_stage == 3:
            param_bytes = model_state_bytes_per_param(setup.dtype, setup.master_grad, 0, 1)["params"]
            dp_comm += (2.0 * (ns - 1) / ns * card_params * param_bytes * m
                        / _bandwidth(layout, ("sharding",), cpn))
    exposed = tp_comm * (1 - setup.tp_overlap) + pp_comm + dp_comm * (1 - setup.dp_overlap)
    step = compute / (1 - bubble) + exposed
    samples = b * m * ns * d
    return CostEstimate(compute_s=compute, bubble=bubble, tp_comm_s=tp_comm, pp_comm_s=pp_comm,
                        dp_comm_s=dp_comm, exposed_comm_s=exposed, step_s=step,
                        samples_per_step=samples, s_per_sample=step / samples)


# --------------------------------------------------------------------------------------------
# plan


@dataclass
class Candidate:
    """One enumerated layout: impossible (``reasons``), or estimated (``memory``, ``cost``)."""

    layout: ParallelLayout
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    memory: MemoryEstimate | None = None
    cost: CostEstimate | None = None
    score: float | None = None
    """``s_per_sample`` relative to the fastest fitting layout (1.00 = fastest)."""

    @property
    def status(self) -> str:
        if self.reasons:
            return "impossible"
        assert self.memory is not None
        return "fits" if self.memory.fits else "too big"

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.layout.to_dict(), "status": self.status, "reasons": self.reasons, "notes": self.notes,
            "memory_gb": self.memory.to_dict() if self.memory else None,
            "cost": self.cost.to_dict() if self.cost else None,
            "score": round(self.score, 4) if self.score is not None else None,
        }


@dataclass
class PlanResult:
    shape: ModelShape
    setup: TrainSetup
    fixed: dict[str, int]
    fitting: list[Candidate]
    """Possible layouts that fit, fastest first."""
    not_fitting: list[Candidate]
    """Possible layouts that need more memory than usable, smallest need first."""
    rejected: list[Candidate]
    """Impossible layouts, with reasons."""
    chosen: Candidate | None
    why: str
    name: str = ""
    """The model's name, when known (e.g. ``meta-llama/Llama-2-13b``)."""
    preferred: dict[str, int] = field(default_factory=dict)
    """The degrees :func:`plan` was asked to prefer (empty: none)."""
    preferred_note: str = ""
    """Why the preferred layout was not chosen (empty: it was, or there was none)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": {"name": self.name or None, **self.shape.to_dict(),
                      "num_parameters": self.shape.num_parameters()},
            "setup": self.setup.to_dict(),
            "cards": self.setup.total_cards,
            "fixed": self.fixed,
            "constants": {
                "framework_overhead_gb": FRAMEWORK_OVERHEAD_GB, "usable_fraction": USABLE_FRACTION,
                "compute_flops_per_s": COMPUTE_FLOPS_PER_S, "intra_node_bytes_per_s": INTRA_NODE_BYTES_PER_S,
                "inter_node_bytes_per_s": INTER_NODE_BYTES_PER_S, "score_tie": SCORE_TIE,
            },
            "preferred": self.preferred or None,
            "preferred_note": self.preferred_note or None,
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "why": self.why,
            "fitting": [c.to_dict() for c in self.fitting],
            "not_fitting": [c.to_dict() for c in self.not_fitting],
            "rejected": [c.to_dict() for c in self.rejected],
        }


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _check_fixed(fixed: Mapping[str, Any] | None) -> dict[str, int]:
    if fixed is None:
        return {}
    if not isinstance(fixed, Mapping):
        raise PipelineError(f"fixed degrees: expected a mapping like {{'tp': 8}}, got {fixed!r}")
    out: dict[str, int] = {}
    for key, value in fixed.items():
        if key not in DEGREES:
            raise PipelineError(f"fixed degrees: unknown degree {key!r} (known: {', '.join(DEGREES)})")
        if value is None:
            continue
        out[key] = _int_field("fixed degrees", key, value)
    return out


def _evaluate(shape: ModelShape, setup: TrainSetup, layout: ParallelLayout) -> Candidate:
    reasons = check_layout(shape, setup, layout)
    if reasons:
        return Candidate(layout, reasons=reasons)
    return Candidate(layout, notes=layout_notes(shape, setup, layout),
                     memory=estimate_memory(shape, setup, layout), cost=estimate_cost(shape, setup, layout))


def _pinned(fixed: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in fixed.items())


def _matches(layout: ParallelLayout, degrees: Mapping[str, int]) -> bool:
    return all(getattr(layout, k) == v for k, v in degrees.items())


def _not_preferred(prefer: Mapping[str, int], candidates: list[Candidate], setup: TrainSetup) -> str:
    """Why no fitting layout has the preferred degrees, completing "the preferred tp 8, ... ___"."""
    cards = setup.total_cards
    matching = [c for c in candidates if _matches(c.layout, prefer)]
    product = 1
    for value in prefer.values():
        product *= value
    if not matching and cards % product:
        return (f"does not fit the {cards} cards ({' x '.join(map(str, prefer.values()))} = {product} "
                f"does not divide {cards})")
    if not matching:
        return "is ruled out by the pinned degrees"
    if all(c.reasons for c in matching):
        return f"is impossible here: {matching[0].reasons[0]}"
    smallest = min((c for c in matching if c.memory is not None), key=lambda c: c.memory.total_gb)
    assert smallest.memory is not None
    return (f"does not fit in memory: it needs {smallest.memory.total_gb:.1f} GB per card, "
            f"{setup.usable_gb:.1f} GB are usable")


def plan(shape: ModelShape, setup: TrainSetup, fixed: Mapping[str, int] | None = None, *,
         name: str = "", prefer: Mapping[str, int] | None = None) -> PlanResult:
    """Enumerate every ``(tp, pp, sharding, dp)`` whose degrees divide the card count and
    multiply to it (degrees pinned in ``fixed`` are taken as given), check each
    (:func:`check_layout`), estimate memory and cost for the possible ones, and choose.

    Choice: the fitting layouts are ranked by modelled time per sample (then memory, then
    degrees); every layout within :data:`SCORE_TIE` of the fastest counts as equally fast, and
    of those the one needing the least memory per card wins (headroom for what the estimate
    leaves out).

    ``prefer`` (degrees, e.g. the guide's ``{"tp": 8, "pp": 1, "sharding": 1}``) overrides that
    choice when a fitting layout has those degrees; otherwise the choice stands and
    ``preferred_note`` says why the preferred one was passed over.

    Raises :class:`PipelineError` when ``fixed`` pins degrees and no matching layout is
    possible, or none fits (with the memory needed, the memory available and the breakdown).
    Without ``fixed``, a plan where nothing fits returns ``chosen=None``. ``name`` only labels
    the output.
    """
    pins = _check_fixed(fixed)
    preferred = _check_fixed(prefer)
    cards = setup.total_cards
    options = {axis: ([pins[axis]] if axis in pins else _divisors(cards)) for axis in DEGREES}
    layouts = [ParallelLayout(*combo) for combo in itertools.product(*(options[a] for a in DEGREES))]
    layouts = [lay for lay in layouts if lay.world == cards]
    if not layouts:  # the pins alone rule out every layout: judge the pinned degrees, others 1
        layouts = [ParallelLayout(**{a: pins.get(a, 1) for a in DEGREES})]
    candidates = [_evaluate(shape, setup, lay) for lay in layouts]
    rejected = [c for c in candidates if c.reasons]
    possible = [c for c in candidates if not c.reasons]

    def speed_key(c: Candidate) -> tuple[Any, ...]:
        assert c.cost is not None and c.memory is not None
        return (c.cost.s_per_sample, c.memory.total_gb, c.layout)

    fitting = sorted((c for c in possible if c.status == "fits"), key=speed_key)
    not_fitting = sorted((c for c in possible if c.status != "fits"),
                         key=lambda c: (c.memory.total_gb if c.memory else 0.0, c.layout))
    if fitting:
        best = fitting[0].cost.s_per_sample if fitting[0].cost else 1.0
        for c in possible:
            if c.cost is not None:
                c.score = c.cost.s_per_sample / best

    where = f" with {_pinned(pins)} pinned" if pins else ""
    passed_over = "" if not preferred or any(_matches(c.layout, preferred) for c in fitting) else (
        _not_preferred(preferred, candidates, setup))
    if not possible:
        reasons: list[str] = []
        for c in rejected:
            reasons.extend(r for r in c.reasons if r not in reasons)
        if rejected[0].layout.world != cards and len(pins) < len(DEGREES):
            reasons[0] = (f"the pinned degrees ({_pinned(pins)}) multiply to a number that does not "
                          f"divide the {cards} cards ({setup.nodes} node(s) x {setup.cards_per_node})")
        raise PipelineError(f"no possible layout for {cards} cards{where}: {'; '.join(reasons)}")
    if not fitting:
        smallest = not_fitting[0]
        assert smallest.memory is not None
        why = (f"nothing fits in {setup.usable_gb:.1f} GB usable per card "
               f"({USABLE_FRACTION:.0%} of {setup.memory_per_card_gb:g} GB); the smallest, "
               f"{smallest.layout.label()}, needs {smallest.memory.total_gb:.1f} GB "
               f"({smallest.memory.breakdown()})")
        if pins and len(not_fitting) == 1:
            raise PipelineError(
                f"{smallest.layout.label()} does not fit: it needs {smallest.memory.total_gb:.1f} GB per "
                f"card, {setup.usable_gb:.1f} GB are usable ({USABLE_FRACTION:.0%} of "
                f"{setup.memory_per_card_gb:g} GB): {smallest.memory.breakdown()}")
        if pins:
            raise PipelineError(f"no layout{where} fits: {why}")
        return PlanResult(shape, setup, pins, fitting, not_fitting, rejected, None, why, name, preferred,
                          passed_over)

    fastest = fitting[0]
    assert fastest.cost is not None
    tied = [c for c in fitting if c.score is not None and c.score <= 1.0 + SCORE_TIE]
    chosen = min(tied, key=lambda c: (c.memory.total_gb if c.memory else 0.0, c.layout))
    if preferred and not passed_over:
        chosen = next(c for c in fitting if _matches(c.layout, preferred))
    assert chosen.memory is not None and chosen.cost is not None
    why = (f"needs {chosen.memory.total_gb:.1f} of {setup.usable_gb:.1f} GB usable per card, "
           f"modelled time per sample {chosen.score:.3f} x the fastest")
    if preferred and not passed_over:
        why = f"the preferred layout ({_pinned(preferred)}) fits: {why}"
    elif chosen is not fastest:
        why += (f"; within {SCORE_TIE:.0%} of the fastest ({fastest.layout.label()}, "
                f"{fastest.memory.total_gb if fastest.memory else 0:.1f} GB), it leaves the most "
                f"memory headroom")
    else:
        why += "; fastest of the fitting layouts"
    if pins:
        why += f" ({_pinned(pins)} pinned)"
    if passed_over:
        why = f"the preferred {_pinned(preferred)} {passed_over}; the planner's choice {why}"
    return PlanResult(shape, setup, pins, fitting, not_fitting, rejected, chosen, why, name, preferred,
                      passed_over)


# --------------------------------------------------------------------------------------------
# output


def format_table(result: PlanResult, top: int = 5) -> str:
    """Plain-text table of the ``top`` fitting layouts, fastest first (filled up with the smallest
    layouts that do not fit when fewer fit; the chosen one, marked ``*``, is always shown), then
    the chosen layout and why."""
    setup, shape = result.setup, result.shape
    ranked = result.fitting + result.not_fitting
    rows = ranked[:max(top, 0)]
    if result.chosen is not None and result.chosen not in rows:
        rows.append(result.chosen)
    head = [
        f"model: {result.name + ', ' if result.name else ''}hidden {shape.hidden_size}, "
        f"layers {shape.num_hidden_layers}, heads {shape.num_attention_heads} (kv {shape.num_key_value_heads}), "
        f"vocab {shape.vocab_size}, ffn {shape.intermediate_size}: {shape.num_parameters() / 1e9:.2f}B parameters",
        f"cards: {setup.nodes} node(s) x {setup.cards_per_node} = {setup.total_cards}, "
        f"{setup.memory_per_card_gb:g} GB each, usable {setup.usable_gb:.1f} GB ({USABLE_FRACTION:.0%})",
        f"setup: {setup.describe()}",
        f"layouts: {len(result.fitting)} fit, {len(result.not_fitting)} too big, "
        f"{len(result.rejected)} impossible" + (f" (pinned: {_pinned(result.fixed)})" if result.fixed else ""),
        "",
    ]
    cols = ["#", "tp", "pp", "shard", "dp", "params", "grads", "optim", "activ", "total GB", "fits",
            "bubble", "comm", "score"]
    table = [cols]
    for c in rows:
        mem, cost = c.memory, c.cost
        assert mem is not None and cost is not None
        rank = ranked.index(c) + 1
        table.append([
            f"*{rank}" if c is result.chosen else str(rank),
            str(c.layout.tp), str(c.layout.pp), str(c.layout.sharding), str(c.layout.dp),
            f"{mem.params_gb:.1f}", f"{mem.grads_gb:.1f}", f"{mem.optimizer_gb:.1f}",
            f"{mem.activations_gb:.1f}", f"{mem.total_gb:.1f}", "yes" if mem.fits else "no",
            f"{cost.bubble:.1%}", f"{cost.comm_share:.1%}",
            f"{c.score:.3f}" if c.score is not None else "-",
        ])
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    lines = head + ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in table]
    lines.append("")
    lines.append("* = chosen; GB per card; total = params + grads + optim + activ + "
                 f"{FRAMEWORK_OVERHEAD_GB:g} GB overhead")
    lines.append("bubble = 1F1B idle share; comm = exposed communication share of the step; "
                 "score = modelled time per sample / fastest fitting")
    if result.chosen is not None:
        lines.append(f"chosen: {result.chosen.layout.label()}: {result.why}")
        for note in result.chosen.notes:
            lines.append(f"  note: {note}")
    else:
        lines.append(f"chosen: none: {result.why}")
    return "\n".join(lines)


def to_json(result: PlanResult) -> str:
    """The whole plan (inputs, constants, every layout with its numbers or reasons) as JSON."""
    return json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n"
