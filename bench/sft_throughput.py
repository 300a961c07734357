"""SFT throughput (tokens/s): the sft stage vs a bare Paddle loop vs PyTorch + transformers.

    .venv/bin/python bench/sft_throughput.py               # 5 rounds of 300 steps each
    .venv/bin/python bench/sft_throughput.py --quick       # 1 round of 20 steps (the tests run this)

Same tiny LLaMA (config.yaml `model:`), same tokenized examples (the bundled sample through
download -> prepare_data -> init_model, encoded by llamapipe.core.tokenizer_io.encode_example), batch
8, AdamW with linear warm-up/decay and global-norm clipping 1.0 (what the Trainer does by default),
the same number of steps, OMP_NUM_THREADS=2. Each contender runs in its own process; one round
runs all three back to back (rotating the order), so their ratio is taken under the same load.

- stage: `llamapipe sft` (PaddleNLP Trainer, checkpoints every save_steps, a loss line per step)
  as the rule runs it; its own train_summary.json tokens_per_second.
- paddle: a hand-written loop, the same model loaded with from_pretrained, right-padded batches.
- torch: transformers.LlamaForCausalLM of the same shape, the same batches, torch.set_num_threads.
All three count tokens the same way: mean example length x batch x steps / training seconds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import _common as C

WORKERS = ("stage", "paddle", "torch")


def batches(examples: list[dict], batch: int, steps: int, seed: int) -> list[dict]:
    """Right-padded numpy batches, shuffled epochs (pad id 0, labels -100), shared by the loops."""
    import numpy as np

    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < batch * steps:
        order += rng.permutation(len(examples)).tolist()
    out = []
    for s in range(steps):
        rows = [examples[i] for i in order[s * batch:(s + 1) * batch]]
        width = max(len(r["input_ids"]) for r in rows)
        ids = np.zeros((batch, width), dtype="int64")
        labels = np.full((batch, width), -100, dtype="int64")
        mask = np.zeros((batch, width), dtype="int64")
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return out


def lr_at(step: int, lr: float, warmup: int, steps: int) -> float:
    """The Trainer's `linear` schedule: warm-up to lr, then linear decay to 0."""
    if step < warmup:
        return lr * step / max(1, warmup)
    return lr * max(0.0, (steps - step) / max(1, steps - warmup))


def tokens_per_step(examples: list[dict], batch: int) -> float:
    """What the sft stage counts (llamapipe.stages.sft): mean example length x batch."""
    return sum(len(e["input_ids"]) for e in examples) / len(examples) * batch


# ---------------------------------------------------------------- workers (child processes)

def worker_encode(a) -> dict:
    from llamapipe.core.tokenizer_io import load_tokenizer
    from llamapipe.stages.sft import load_examples

    sft = json.loads(a.sft_params)
    examples = load_examples(a.train, load_tokenizer(a.base), sft["src_length"], sft["max_length"])
    Path(a.tokens).write_text(json.dumps(examples))
    return {"examples": len(examples)}


def worker_paddle(a) -> dict:
    import paddle
    from paddlenlp.transformers import AutoModelForCausalLM

    sft = json.loads(a.sft_params)
    examples = json.loads(Path(a.tokens).read_text())
    data = batches(examples, sft["per_device_train_batch_size"], a.steps, a.seed)
    paddle.seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(a.base, dtype="float32")
    model.train()
    lr, warmup = sft["learning_rate"], sft["warmup_steps"]
    sched = paddle.optimizer.lr.LambdaDecay(1.0, lambda s: lr_at(s, lr, warmup, a.steps))
    opt = paddle.optimizer.AdamW(learning_rate=sched, parameters=model.parameters(), weight_decay=0.0,
                                 grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0))
    losses = []
    start = time.perf_counter()
    for b in data:
        out = model(**{k: paddle.to_tensor(v) for k, v in b.items()})
        loss = out[0] if isinstance(out, (tuple, list)) else out.loss
        loss.backward()
        opt.step()
        sched.step()
        opt.clear_grad()
        losses.append(float(loss))
    seconds = time.perf_counter() - start
    return _throughput(examples, sft, a.steps, seconds, losses)


def worker_torch(a) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    sft = json.loads(a.sft_params)
    examples = json.loads(Path(a.tokens).read_text())
    data = batches(examples, sft["per_device_train_batch_size"], a.steps, a.seed)
    base = json.loads((Path(a.base) / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "pad_token_id", "bos_token_id",
            "eos_token_id")
    model = LlamaForCausalLM(LlamaConfig(**{k: base[k] for k in keys}, tie_word_embeddings=False))
    model.train()
    lr, warmup = sft["learning_rate"], sft["warmup_steps"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, lr, warmup, a.steps) / lr)
    losses = []
    start = time.perf_counter()
    for b in data:
        t = {k: torch.from_numpy(v) for k, v in b.items()}
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        # labels are already shifted (tokenizer_io.encode_example), as the Paddle criterion expects
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t["labels"].reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    seconds = time.perf_counter() - start
    return {**_throughput(examples, sft, a.steps, seconds, losses), "torch_threads": torch.get_num_threads(),
            "attn_implementation": model.config._attn_implementation}


def _throughput(examples, sft, steps, seconds, losses) -> dict:
    tps = tokens_per_step(examples, sft["per_device_train_batch_size"]) * steps / seconds
    return {"seconds": round(seconds, 3), "tokens_per_second": round(tps, 1), "steps": steps,
            "first_loss": round(losses[0], 4), "final_loss": round(losses[-1], 4)}


def worker_main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["encode", "paddle", "torch"], required=True)
    for flag in ("--base", "--train", "--tokens", "--sft-params", "--result"):
        ap.add_argument(flag)
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args(argv)
    result = {"encode": worker_encode, "paddle": worker_paddle, "torch": worker_torch}[a.worker](a)
    Path(a.result).write_text(json.dumps(result))


# ---------------------------------------------------------------- the benchmark

def torch_available() -> str | None:
    """None if torch and transformers import, else why not."""
    import importlib.util

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)} (run `make bench-setup`)" if missing else None


def main(argv=None) -> dict:
    ap = C.parser(__doc__)
    ap.add_argument("--steps", type=int, default=300, help="training steps per measurement (--quick: 20)")
    ap.add_argument("--no-torch", action="store_true", help="leave the PyTorch peer out")
    args = ap.parse_args(argv)
    runs, steps = (1, 20) if args.quick else (args.runs, args.steps)
    cfg = C.load_config()
    sft = {**cfg["sft"], "max_steps": steps}
    torch_missing = "left out (--no-torch)" if args.no_torch else torch_available()
    contenders = [w for w in WORKERS if w != "torch" or not torch_missing]
    me = Path(__file__).resolve()
    env = C.thread_env(args.threads)
    result: dict = {"machine": C.machine(), "quick": args.quick, "steps": steps, "threads": args.threads,
                    "batch": sft["per_device_train_batch_size"], "model": cfg["model"]}
    with C.workdir(args.keep, "bench-sft-") as tmp:
        work = Path(tmp)
        ws = C.build_workspace(work, threads=args.threads)
        logs = ws["logs"]
        tokens = work / "tokens.json"
        enc = C.run_worker(me, ["--worker", "encode", "--base", str(ws["base"]), "--train", str(ws["train"]),
                                "--tokens", str(tokens), "--sft-params", json.dumps(sft)], env, logs / "encode.log")
        examples = json.loads(tokens.read_text())
        result["examples"] = enc["examples"]
        result["tokens_per_step"] = round(tokens_per_step(examples, sft["per_device_train_batch_size"]), 1)
        per: dict[str, list[dict]] = {w: [] for w in contenders}
        for r in range(runs):
            for w in contenders[r % len(contenders):] + contenders[: r % len(contenders)]:  # rotate the order
                if w == "stage":
                    out, ckpt = work / f"sft-{r}", work / f"ckpt-{r}"
                    cost = C.llamapipe("sft", sft, "--train", ws["train"], "--base", ws["base"], "--out", out,
                                       "--ckpt-dir", ckpt, threads=args.threads, log=logs / f"sft-{r}.log")
                    s = json.loads((out / "train_summary.json").read_text())
                    per[w].append({"tokens_per_second": s["tokens_per_second"], "seconds": s["train_seconds_this_run"],
                                   "first_loss": s["first_loss"], "final_loss": s["final_loss"],
                                   "process_seconds": round(cost["seconds"], 3),
                                   "max_rss_mib": round(cost["max_rss_mib"], 1)})
                else:
                    per[w].append(C.run_worker(me, ["--worker", w, "--base", str(ws["base"]), "--tokens", str(tokens),
                                                    "--sft-params", json.dumps(sft), "--steps", str(steps),
                                                    "--threads", str(args.threads)], env, logs / f"{w}-{r}.log"))
                print(f"round {r + 1}/{runs} {w}: {per[w][-1]['tokens_per_second']} tokens/s", file=sys.stderr)
    tps = {w: [m["tokens_per_second"] for m in per[w]] for w in contenders}
    result["tokens_per_second"] = {w: C.summary(v, 1) for w, v in tps.items()}
    result["ratios"] = {"stage_over_paddle_bare": C.paired_ratio(tps["stage"], tps["paddle"])}
    if "torch" in tps:
        result["ratios"]["stage_over_torch"] = C.paired_ratio(tps["stage"], tps["torch"])
        result["ratios"]["torch_over_paddle_bare"] = C.paired_ratio(tps["torch"], tps["paddle"])
    result["torch"] = torch_missing or "measured"
    result["runs"] = per
    return C.emit(result, args.json_out)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main(sys.argv[1:])
    else:
        main()
