"""Serving throughput: `llamapipe serve` at concurrency 1, 4 and 16 against one-at-a-time decoding and upstream's
flask_server.py (requests/s, p50/p95 latency).

    .venv/bin/python bench/serve_throughput.py --checkout /tmp/PaddleNLP     # 64 requests a pass, 5 rounds
    .venv/bin/python bench/serve_throughput.py --quick                       # 16 requests of 16 tokens, 1 round
    .venv/bin/python bench/serve_throughput.py --project <cpu run> --rehearsal <rehearsal run> --checkout DIR \
        [--probe-nodelay] [--serve-config 'serve={batch_window_ms: 60}']

(``--checkout``: a PaddleNLP checkout at the pinned commit, else $LLAMAPIPE_PADDLENLP_SRC; without one the
flask variant is skipped, and the result says so.)

The models: a finished cpu run (``--project``: its results/inference, our export) and a finished rehearsal
(``--rehearsal``: ``--config target=npu rehearsal=cpu``, results/inference written by upstream's
export_model.py). Without them, each is made here from a fresh copy of the project with ``snakemake --cores 2
results/predictions.json`` (--quick: sft 20 steps, and the one-process rehearsal with 10). Both are the same
tiny LLaMA config, trained apart; upstream's predictor cannot load our export, so flask serves the rehearsal's.
The prompts: the cpu run's dev ``src``, the first --requests of them (cycled past the end), every request with
the predict section's ``max_new_tokens`` (--quick: 16).

Variants, each a pass of --requests requests, all passes of a round in rotating order in this one run (every
process started once, warmed with one untimed pass per concurrency before round 1):
- sequential: the predict engine (``llamapipe.serving.engine.LocalEngine``, built as ``llamapipe chat`` builds
  it) called with one prompt at a time, in a child process of its own, no HTTP: one-at-a-time serving.
- batched: the same engine in the same process given 16 prompts at a time (a request's latency: its batch's):
  the most any batcher can get from this engine at concurrency 16.
- server: ``python -m llamapipe serve --port 0`` in the cpu run (the local engine, config.yaml's serve section),
  ``POST /v1/completions`` at concurrency 1, 4, 16 (closed loop: c clients, each sends its next request when
  its answer is in; httpx, asyncio). Batch sizes: the difference of ``GET /health``'s ``batch_sizes`` around
  each pass.
- flask: upstream's ``llm/predict/flask_server.py`` on the rehearsal's export, started as the rehearsal's
  predict rule starts predictor.py (its command from ``snakemake -n -p``: PYTHONPATH, the ops wheels, the CPU
  shims, the same predictor flags without the data and output files) plus ``--flask_port``;
  ``POST /v1/chat/completions`` with the prompt as one user message. Its ``start_ui_service`` imports
  ``gradio_ui`` (gradio is not installed): a stand-in ``gradio_ui`` whose ``main`` returns at once is put first
  on that process's PYTHONPATH. Single-threaded (``threaded=False``): concurrent requests queue.
- server_upstream: when ``llamapipe.serving.upstream_engine`` and ``llamapipe.npu.serve_script`` exist, our
  server on the rehearsal's export too (``llamapipe serve --config target=npu rehearsal=cpu`` in the rehearsal):
  same model and export as flask.
- server_nodelay (``--probe-nodelay``): the server of ``llamapipe serve --dry-run`` through a wrapper (written
  to the work directory) that sets TCP_NODELAY on the listening socket ``server.bind`` makes; nothing else.
- server_baseline (``--baseline-src TREE``): ``llamapipe serve`` as server, but with TREE/src first on
  PYTHONPATH instead of this checkout's src (TREE: another version of the project, e.g. ``git archive HEAD``
  unpacked): a before/after of serving changes paired per round under the same machine load.
``--serve-config 'serve={batch_window_ms: 30}'``: more --config values for every ``llamapipe serve`` here.
Every process decodes on one thread (OMP/MKL_NUM_THREADS=1; predict.threads: 1; upstream's
StaticGraphPredictor keeps paddle.inference's default of 1; the shared --threads option is not used here); the
client runs in this process.
Ratios of requests/s are paired per round: median (min - max) over the rounds.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import _common as C

CONCURRENCY = (1, 4, 16)
REHEARSAL = ["--config", "target=npu", "rehearsal=cpu"]
QUICK_CPU = ["--config", "sft={max_steps: 20, warmup_steps: 2, save_steps: 10}"]
QUICK_REHEARSAL = [*REHEARSAL, "sft={max_steps: 10, warmup_steps: 2, save_steps: 10}",
                   "npu={parallel: {tensor_parallel_degree: 1, sequence_parallel: false}}"]
GRADIO_STANDIN = '''"""Stand-in for PaddleNLP's llm/predict/gradio_ui.py (gradio is not installed):
bench/serve_throughput.py puts it first on flask_server.py's PYTHONPATH, so start_ui_service
starts a process that returns at once."""


def main(args, predictor_args):
    return None
'''
NODELAY_PROBE = '''"""bench/serve_throughput.py --probe-nodelay: llamapipe.serving.server with TCP_NODELAY on the socket
its bind() makes (accepted connections inherit it); nothing else differs."""
import socket
import sys

import llamapipe.serving.server as server

_bind = server.bind


def bind(host, port):
    sock = _bind(host, port)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


server.bind = bind
server.main(sys.argv[1:])
'''
SNAKEMAKE = str(Path(C.PYTHON).parent / "snakemake")


# ---------------------------------------------------------------- the sequential engine (child process)

def worker_main(argv: list[str]) -> None:
    """``--worker --project DIR``: LocalEngine as ``llamapipe chat`` builds it; one JSON line a job on stdin
    (``{"prompts": [...], "max_tokens": n, "batch": b}``), one JSON line back: the prompts decoded b at a time
    (1: each alone), each with its seconds, completion tokens and text."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--project", required=True)
    a = ap.parse_args(argv)
    os.chdir(a.project)
    from llamapipe.config import load
    from llamapipe.config.stage_params import stage_params
    from llamapipe.core.paddle_env import prepare

    cfg = load("config.yaml")
    predict = stage_params("predict", cfg)
    threads = predict.get("threads") or cfg["threads"]
    prepare(threads)
    from llamapipe.serving.engine import LocalEngine

    engine = LocalEngine("results/inference", predict, threads=threads)
    print(json.dumps({"ready": True, "threads": threads}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        out, prompts, n = [], job["prompts"], job.get("batch", 1)
        for i in range(0, len(prompts), n):
            start = time.perf_counter()
            done = engine.generate(prompts[i: i + n], [job["max_tokens"]] * len(prompts[i: i + n]))
            seconds = time.perf_counter() - start  # every row of a batch is answered when the batch is done
            out += [{"s": seconds, "tokens": d.completion_tokens, "text": d.text} for d in done]
        print(json.dumps(out), flush=True)


class Sequential:
    def __init__(self, project: Path, env: dict, log: Path):
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([C.PYTHON, str(Path(__file__).resolve()), "--worker", "--project", str(project)],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True)
        self.info = self._reply()

    def run(self, prompts: list[str], max_tokens: int, batch: int = 1) -> dict:
        start = time.perf_counter()
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens, "batch": batch}) + "\n")
        self.proc.stdin.flush()
        rows = self._reply()
        return {"wall": time.perf_counter() - start, "rows": rows, "errors": 0}

    def _reply(self) -> Any:
        """The worker's next JSON line (anything else a library prints to stdout is skipped)."""
        for line in self.proc.stdout:
            if line.startswith(("{", "[")):
                return json.loads(line)
        raise RuntimeError(f"the sequential worker exited: see {self.log.name}")

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


# ---------------------------------------------------------------- servers (child processes) and the client

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process of its own session (stopped by its process group id: this process started it)."""

    def __init__(self, name: str, cmd: list[str], cwd: Path, env: dict, log: Path, kind: str,
                 port: int | None = None, timeout: float = 300):
        self.name, self.kind, self.log_path, self.cmd = name, kind, log, cmd
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        self.url = f"http://127.0.0.1:{port}" if port else None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode} at start:\n{self.tail()}")
            if self.url is None:
                m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", log.read_text(errors="replace"))
                if m:
                    self.url = f"http://127.0.0.1:{m.group(1)}"
            if self.url and self._answers():
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{name} did not answer within {timeout}s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def _answers(self) -> bool:
        import httpx

        try:
            httpx.get(self.url + ("/health" if self.kind == "ours" else "/"), timeout=2)
            return True
        except httpx.HTTPError:
            return False

    def batch_sizes(self) -> dict[str, int]:
        if self.kind != "ours":
            return {}
        import httpx

        return httpx.get(self.url + "/health", timeout=10).json()["batch_sizes"]

    def request(self, prompt: str, max_tokens: int) -> tuple[str, dict]:
        if self.kind == "ours":
            return "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens}
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}

    def answer(self, body: dict) -> tuple[str, int | None]:
        if self.kind == "ours":
            return body["choices"][0]["text"], body["usage"]["completion_tokens"]
        return body["choices"][0]["message"]["content"], None  # flask_server reports no token counts

    def run(self, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
        before = self.batch_sizes()
        wall, rows = asyncio.run(drive(self, prompts, max_tokens, concurrency))
        after = self.batch_sizes()
        sizes = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        return {"wall": wall, "rows": rows, "errors": sum(r["status"] != 200 for r in rows),
                "batch_sizes": {k: v for k, v in sorted(sizes.items(), key=lambda kv: int(kv[0])) if v}}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


async def drive(server: Server, prompts: list[str], max_tokens: int, concurrency: int) -> tuple[float, list]:
    """A closed loop: ``concurrency`` clients, each sending the next prompt when its answer is in."""
    import httpx

    rows: list[dict] = [{}] * len(prompts)
    todo = list(range(len(prompts)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as client:
        async def client_loop() -> None:
            while todo:
                i = todo.pop(0)
                path, body = server.request(prompts[i], max_tokens)
                start = time.perf_counter()
                r = await client.post(path, json=body)
                seconds = time.perf_counter() - start
                row = {"s": seconds, "status": r.status_code, "tokens": None, "text": None}
                if r.status_code == 200:
                    row["text"], row["tokens"] = server.answer(r.json())
                rows[i] = row

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        return time.perf_counter() - start, rows


# ---------------------------------------------------------------- projects and commands

def snakemake(project: Path, args: list[str], env: dict, log: Path) -> float:
    return C.run_measured([SNAKEMAKE, "--cores", "2", *args], cwd=project, env=env, log=log)["seconds"]


def finished_run(given: str | None, work: Path, env: dict, config: list[str], log: Path) -> tuple[Path, str]:
    if given:
        return Path(given).resolve(), f"given: {Path(given).resolve()}"
    project = C.fresh_copy(work)
    seconds = snakemake(project, ["results/predictions.json", *config], env, log)
    return project, f"made here: snakemake --cores 2 results/predictions.json {shlex.join(config)} ({seconds:.0f} s)"


def predict_rule_script(project: Path, env: dict, config: list[str]) -> str:
    """The rehearsal's predict rule, as ``snakemake -n -p`` prints it (the bash -c script)."""
    out = subprocess.run([SNAKEMAKE, "-n", "-p", "-f", "results/predictions.json", *config], cwd=project, env=env,
                         capture_output=True, text=True, check=True).stdout
    shell = next(line for line in out.splitlines() if "predict/predictor.py" in line and "bash -c" in line)
    return shlex.split(shell[shell.index("bash -c"):])[2]


def flask_script(rule_script: str, standin_dir: Path, port: int) -> str:
    """The predict rule's script with flask_server.py in predictor.py's place: the same exports, ops wheels,
    shims and predictor flags (not --data_file/--output_file), plus --flask_port; the gradio_ui stand-in first
    on PYTHONPATH; collect-predictions and the rm of its input left out."""
    steps = rule_script.split("; ")
    at = next(i for i, s in enumerate(steps) if "predict/predictor.py" in s)
    argv = shlex.split(steps[at])
    out: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in ("--data_file", "--output_file"):
            skip = True
        else:
            out.append("predict/flask_server.py" if word == "predict/predictor.py" else word)
    before = [s for s in steps[:at] if not s.startswith("rm -f")]
    return "; ".join([*before, f"export PYTHONPATH={shlex.quote(str(standin_dir))}:$PYTHONPATH",
                      "exec " + shlex.join([*out, "--flask_port", str(port)])])


def nodelay_probe(project: Path, env: dict, work: Path, extra: list[str]) -> list[str]:
    """``llamapipe serve``'s own server command (from ``--dry-run``) through a wrapper that sets TCP_NODELAY on
    the listening socket ``server.bind`` makes (a probe of this bench, for --probe-nodelay)."""
    out = subprocess.run([C.PYTHON, "-m", "llamapipe", "serve", "--port", "0", "--dry-run", *extra], cwd=project,
                         env=env, capture_output=True, text=True, check=True).stdout
    argv = shlex.split(next(line for line in out.splitlines() if "llamapipe.serving.server" in line))
    at = argv.index("llamapipe.serving.server")
    wrapper = work / "nodelay_server.py"
    wrapper.write_text(NODELAY_PROBE)
    return [C.PYTHON, str(wrapper), *argv[at + 1:]]


def dev_prompts(project: Path, n: int) -> list[str]:
    srcs = []
    for line in (project / "results/data/dev.json").read_text().splitlines():
        if line.strip():
            src = json.loads(line)["src"]
            srcs.append("\n".join(src) if isinstance(src, list) else src)  # tokenizer_io.join_text
    return [srcs[i % len(srcs)] for i in range(n)]


def has_upstream_engine() -> bool:
    return all(importlib.util.find_spec(m) is not None
               for m in ("llamapipe.serving.upstream_engine", "llamapipe.npu.serve_script"))


# ---------------------------------------------------------------- measurement

def pass_stats(p: dict) -> dict:
    lat = sorted(r["s"] for r in p["rows"] if r.get("status", 200) == 200)
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    tokens = [r["tokens"] for r in p["rows"] if r.get("tokens") is not None]
    return {"wall_s": round(p["wall"], 3), "requests_per_s": round(len(p["rows"]) / p["wall"], 3),
            "p50_s": round(q[49], 3), "p95_s": round(q[94], 3), "errors": p["errors"],
            "batch_sizes": p.get("batch_sizes", {}),
            "mean_completion_tokens": round(sum(tokens) / len(tokens), 1) if tokens else None}


def same_texts(a: dict, b: dict) -> float:
    pairs = [(x.get("text"), y.get("text")) for x, y in zip(a["rows"], b["rows"])]
    return round(sum(x == y and x is not None for x, y in pairs) / len(pairs), 3)


def measure(units: dict[str, Callable[[], dict]], rounds: int) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Every unit once per round, the order rotated each round; the passes, and the first pass's raw rows."""
    names = list(units)
    passes: dict[str, list[dict]] = {n: [] for n in names}
    first: dict[str, dict] = {}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            raw = units[name]()
            first.setdefault(name, raw)
            passes[name].append(pass_stats(raw))
            s = passes[name][-1]
            print(f"round {r + 1}/{rounds} {name}: {s['requests_per_s']} req/s, p50 {s['p50_s']} s, "
                  f"p95 {s['p95_s']} s, batches {s['batch_sizes']}", file=sys.stderr, flush=True)
    return passes, first


def add_server_units(units: dict, warm: list, server: Server, prompts: list[str], max_tokens: int) -> None:
    for c in CONCURRENCY:
        units[f"{server.name}@{c}"] = lambda c=c: server.run(prompts, max_tokens, c)
        warm.append(lambda c=c: server.run(prompts[: max(c, 4)], max_tokens, c))


def summarise(passes: list[dict]) -> dict:
    sizes: dict[str, int] = {}
    for p in passes:
        for k, v in p["batch_sizes"].items():
            sizes[k] = sizes.get(k, 0) + v
    tokens = [p["mean_completion_tokens"] for p in passes if p["mean_completion_tokens"] is not None]
    return {"requests_per_s": C.summary([p["requests_per_s"] for p in passes]),
            "p50_s": C.summary([p["p50_s"] for p in passes]), "p95_s": C.summary([p["p95_s"] for p in passes]),
            "errors": sum(p["errors"] for p in passes),
            "batch_sizes": dict(sorted(sizes.items(), key=lambda kv: int(kv[0]))),
            "mean_completion_tokens": round(statistics.mean(tokens), 1) if tokens else None}


def ratio(passes: dict[str, list[dict]], numer: str, denom: str) -> dict | None:
    if numer not in passes or denom not in passes:
        return None
    return C.paired_ratio([p["requests_per_s"] for p in passes[numer]],
                          [p["requests_per_s"] for p in passes[denom]])


def table(summary: dict[str, dict], requests: int, rounds: int) -> str:
    def rng(s: dict) -> str:
        return f"{s['median']:.2f} ({s['min']:.2f} - {s['max']:.2f})" if s["runs"] > 1 else f"{s['median']:.2f}"

    lines = ["| variant | concurrency | requests | req/s | p50 s | p95 s | batch sizes (size: batches) |",
             "|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        variant, _, c = name.rpartition("@")
        sizes = ", ".join(f"{k}: {v}" for k, v in s["batch_sizes"].items()) or "-"
        lines.append(f"| {variant} | {c} | {requests} x {rounds} | {rng(s['requests_per_s'])} | "
                     f"{s['p50_s']['median']:.3f} | {s['p95_s']['median']:.3f} | {sizes} |")
    return "\n".join(lines)


def main() -> None:
    ap = C.parser(__doc__)
    ap.add_argument("--project", help="a finished cpu run (results/inference, results/data/dev.json)")
    ap.add_argument("--rehearsal", help="a finished rehearsal run (upstream's export in results/inference)")
    ap.add_argument("--checkout", default=os.environ.get("LLAMAPIPE_PADDLENLP_SRC"),
                    help="PaddleNLP checkout at the pinned commit (default $LLAMAPIPE_PADDLENLP_SRC)")
    ap.add_argument("--requests", type=int, default=64, help="requests a pass (default 64; --quick: 16)")
    ap.add_argument("--max-tokens", type=int, default=None, help="default: the predict section's max_new_tokens")
    ap.add_argument("--serve-config", nargs="+", default=[], metavar="KEY=VALUE",
                    help="more --config values for every `llamapipe serve` here, e.g. 'serve={batch_window_ms: 30}'")
    ap.add_argument("--baseline-src", metavar="TREE",
                    help="also `llamapipe serve` from TREE/src (another version of the project): variant "
                         "server_baseline")
    ap.add_argument("--probe-nodelay", action="store_true",
                    help="also the server with TCP_NODELAY on its listening socket (variant server_nodelay)")
    args = ap.parse_args()
    rounds, requests = (1, 16) if args.quick else (args.runs, args.requests)
    checkout = os.path.abspath(args.checkout) if args.checkout else None
    env = C.thread_env(1, **({"LLAMAPIPE_PADDLENLP_SRC": checkout} if checkout else {}))
    env["PATH"] = f"{Path(C.PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"
    result: dict[str, Any] = {"machine": C.machine(), "quick": args.quick, "rounds": rounds, "requests": requests,
                              "concurrency": list(CONCURRENCY), "serve_config": args.serve_config, "skipped": {},
                              "commands": {}}
    started: list[Any] = []
    with C.workdir(args.keep, "bench-serve-") as tmp:
        work = Path(tmp)
        try:
            cpu, result["cpu_run"] = finished_run(args.project, work, env, QUICK_CPU if args.quick else [],
                                                  work / "cpu.log")
            sys.path.insert(0, str(C.ROOT / "src"))
            from llamapipe.config import load

            cfg = load(str(cpu / "config.yaml"))
            max_tokens = args.max_tokens or (16 if args.quick else int(cfg["predict"]["max_new_tokens"]))
            prompts = dev_prompts(cpu, requests)
            result["max_tokens"] = max_tokens
            units: dict[str, Callable[[], dict]] = {}
            warm: list[Callable[[], Any]] = []

            seq = Sequential(cpu, env, work / "sequential.log")
            started.append(seq)
            units["sequential@1"] = lambda: seq.run(prompts, max_tokens)
            warm.append(lambda: seq.run(prompts[:4], max_tokens))
            units["batched@16"] = lambda: seq.run(prompts, max_tokens, 16)
            warm.append(lambda: seq.run(prompts[:16], max_tokens, 16))

            extra = ["--config", *args.serve_config] if args.serve_config else []
            cmd = [C.PYTHON, "-m", "llamapipe", "serve", "--port", "0", *extra]
            server = Server("server", cmd, cpu, env, work / "server.log", "ours")
            started.append(server)
            result["commands"]["server"] = f"cd {cpu} && {shlex.join(cmd)}"
            add_server_units(units, warm, server, prompts, max_tokens)
            if args.baseline_src:
                base_src = str(Path(args.baseline_src).resolve() / "src")
                rest = [q for q in env["PYTHONPATH"].split(os.pathsep) if q != str(C.ROOT / "src")]
                base_env = {**env, "PYTHONPATH": os.pathsep.join([base_src, *rest])}
                cmd = [C.PYTHON, "-m", "llamapipe", "serve", "--port", "0", *extra]
                base = Server("server_baseline", cmd, cpu, base_env, work / "server_baseline.log", "ours")
                started.append(base)
                result["commands"]["server_baseline"] = f"cd {cpu} && PYTHONPATH={base_src}:... {shlex.join(cmd)}"
                add_server_units(units, warm, base, prompts, max_tokens)
            if args.probe_nodelay:
                cmd = nodelay_probe(cpu, env, work, extra)
                probe = Server("server_nodelay", cmd, cpu, env, work / "server_nodelay.log", "ours")
                started.append(probe)
                result["commands"]["server_nodelay"] = f"cd {cpu} && {shlex.join(cmd)}"
                add_server_units(units, warm, probe, prompts, max_tokens)

            rehearsal_config = QUICK_REHEARSAL if args.quick else REHEARSAL
            if not checkout and not args.rehearsal:
                result["skipped"]["flask"] = "no PaddleNLP checkout (--checkout or $LLAMAPIPE_PADDLENLP_SRC)"
            else:
                rehearsal, result["rehearsal_run"] = finished_run(args.rehearsal, work, env, rehearsal_config,
                                                                  work / "rehearsal.log")
                result["same_prompts_in_rehearsal"] = dev_prompts(rehearsal, requests) == prompts
                standin = work / "gradio_standin"
                standin.mkdir(exist_ok=True)
                (standin / "gradio_ui.py").write_text(GRADIO_STANDIN)
                port = free_port()
                script = flask_script(predict_rule_script(rehearsal, env, REHEARSAL), standin, port)
                flask_env = {**env, "TMPDIR": str(work), "PADDLE_LOG_DIR": str(work)}
                flask = Server("flask", ["bash", "-c", script], rehearsal, flask_env, work / "flask.log", "flask",
                               port=port)
                started.append(flask)
                result["commands"]["flask"] = f"cd {rehearsal} && bash -c {shlex.quote(script)}"
                add_server_units(units, warm, flask, prompts, max_tokens)
                if not has_upstream_engine():
                    result["skipped"]["server_upstream"] = ("llamapipe.serving.upstream_engine / "
                                                            "llamapipe.npu.serve_script not there yet")
                else:
                    cmd = [C.PYTHON, "-m", "llamapipe", "serve", *REHEARSAL, f"paddlenlp_src={checkout}",
                           *args.serve_config, "--port", "0"]
                    try:
                        up = Server("server_upstream", cmd, rehearsal, env, work / "server_upstream.log", "ours")
                    except RuntimeError as err:
                        result["skipped"]["server_upstream"] = f"did not start: {str(err)[-1500:]}"
                    else:
                        started.append(up)
                        result["commands"]["server_upstream"] = f"cd {rehearsal} && {shlex.join(cmd)}"
                        add_server_units(units, warm, up, prompts, max_tokens)

            for w in warm:  # first calls (graph, kernels, connections), untimed
                w()
            passes, first = measure(units, rounds)
        finally:
            for proc in reversed(started):
                proc.stop()
        summary = {name: summarise(p) for name, p in passes.items()}
        result["results"] = summary
        result["passes"] = passes
        ours = ("server@", "server_nodelay@", "server_baseline@", "batched@")
        result["same_text_as_sequential"] = {n: same_texts(first[n], first["sequential@1"])
                                             for n in first if n.startswith(ours)}
        if "flask@1" in first and "server_upstream@1" in first:
            result["same_text_server_upstream_as_flask"] = same_texts(first["server_upstream@1"], first["flask@1"])
        pairs = {"server@16 / sequential": ("server@16", "sequential@1"),
                 "batched@16 / sequential": ("batched@16", "sequential@1"),
                 "server@16 / batched@16": ("server@16", "batched@16"),
                 "server@1 / sequential": ("server@1", "sequential@1"),
                 "server@16 / server@1": ("server@16", "server@1"),
                 "server@16 / flask@16": ("server@16", "flask@16"),
                 "server@16 / server_baseline@16": ("server@16", "server_baseline@16"),
                 "server_baseline@16 / sequential": ("server_baseline@16", "sequential@1"),
                 "server@4 / server_baseline@4": ("server@4", "server_baseline@4"),
                 "server@1 / server_baseline@1": ("server@1", "server_baseline@1"),
                 "server_nodelay@16 / sequential": ("server_nodelay@16", "sequential@1"),
                 "server_nodelay@1 / sequential": ("server_nodelay@1", "sequential@1"),
                 "flask@16 / flask@1": ("flask@16", "flask@1"),
                 "server_upstream@16 / flask@16": ("server_upstream@16", "flask@16"),
                 "server_upstream@16 / server_upstream@1": ("server_upstream@16", "server_upstream@1")}
        result["ratios"] = {k: r for k, (a, b) in pairs.items() if (r := ratio(passes, a, b)) is not None}
        result["table"] = table(summary, requests, rounds)
    print(result["table"], file=sys.stderr)
    for k, r in result["ratios"].items():
        print(f"{k}: {r['median']:.2f}x ({r['min']:.2f} - {r['max']:.2f}, {r['runs']} rounds)", file=sys.stderr)
    C.emit(result, args.json_out)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main(sys.argv[1:])
    else:
        main()
