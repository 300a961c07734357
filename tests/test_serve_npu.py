"""``llamapipe serve`` on target npu: our server over upstream's predictor, placed as predict is.

- The command (fast, anywhere): upstream's predictor gets exactly the predict rule's flags (but
  the dev/output files), the script is predict's (Ascend env, ops wheel, checkout), the container
  is predict's (image, cards, device nodes, mounts, env), the cards follow ``devices``; on the
  rehearsal it is predict's local process with predict's CPU shims. Always compared against the
  predict rule's own command (``rule_command``), never hard-coded.
- The engine's batch logic on a stand-in predictor (fast): rows cut to their own ``max_tokens``,
  finish reasons, sub-batches of upstream's ``batch_size``.
- End to end on the rehearsal (``@pytest.mark.e2e``, needs a PaddleNLP checkout named by
  LLAMAPIPE_PADDLENLP_SRC): ``UpstreamEngine`` reproduces the predict rule's predictions
  (written by upstream's own predictor.py), and the whole serve command answers
  ``/v1/completions`` with them and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, copy_project, snakemake
from llamapipe.config import rehearsal
from llamapipe.core.errors import PipelineError
from npu_commands import flags, parse

CHECKOUT = os.environ.get(rehearsal.CHECKOUT_ENV)
needs_checkout = pytest.mark.skipif(
    not CHECKOUT,
    reason=f"set {rehearsal.CHECKOUT_ENV}=<PaddleNLP checkout at the pinned commit> to run upstream's predictor")

SERVER = ["python", "-m", "llamapipe.serving.server"]
NOT_SERVED = ("--data_file", "--output_file")


def _config(monkeypatch, project: Path, *overrides: str, env: dict | None = None) -> dict:
    from llamapipe.config import load

    monkeypatch.chdir(project)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    return load("config.yaml", overrides=list(overrides))


def _serve_argv(port: int = 8123, graceful: float = 60, max_new_tokens: int = 96) -> list[str]:
    """What ``llamapipe serve`` passes (``serving.cli.server_argv``): the server's own flags."""
    return ["--serve", json.dumps({"host": "127.0.0.1", "port": port, "graceful_shutdown_s": graceful}),
            "--predict", json.dumps({"max_new_tokens": max_new_tokens}), "--model-name", "tiny-sft"]


def _split_runner(command: str) -> tuple[str, float | None]:
    """The command without container-run's ``--stop-timeout N`` and ``--stopped-exit container``
    (what ``npu_commands.parse`` reads), and N."""
    argv = shlex.split(command)
    if "--stop-timeout" not in argv[:8]:
        return command, None
    at = argv.index("--stop-timeout")
    timeout = float(argv[at + 1])
    argv = argv[:at] + argv[at + 2:]
    at = argv.index("--stopped-exit")
    assert argv[at + 1] == "container"  # the server's own exit code (0 after a graceful stop) is serve's
    return shlex.join(argv[:at] + argv[at + 2:]), timeout


def _commands(cfg: dict, project: Path, serve_argv: list[str]):
    from llamapipe.npu.serve_script import serve_command
    from llamapipe.runners.commands import rule_command

    threads = cfg["predict"]["threads"] or cfg["threads"]  # as serve.smk gives the predict rule
    predict = parse(rule_command("predict", cfg, str(project), threads=threads))
    text, timeout = _split_runner(serve_command(cfg, str(project), serve_argv))
    return predict, parse(text), timeout


def _predictor_step(cmd) -> list[str]:
    (step,) = [s for s in cmd.steps if "predict/predictor.py" in s]
    return step


def _sent(cfg: dict, serve_argv: list[str]) -> list[str]:
    """The server's flags as serve_command puts them in the script: ``--serve`` the whole serve
    section (the config's, the given keys over it: the stage image has no schema to fill one in)."""
    from llamapipe.npu.serve_script import _serve_settings

    whole = {**cfg["serve"], **json.loads(serve_argv[serve_argv.index("--serve") + 1])}
    assert _serve_settings(cfg, serve_argv) == whole
    rest = serve_argv[:serve_argv.index("--serve")] + serve_argv[serve_argv.index("--serve") + 2:]
    return ["--serve", json.dumps(whole, sort_keys=True), *rest]


def _served(step: list[str], serve_argv: list[str]) -> tuple[list[str], list[str]]:
    """(what starts the server, upstream's predictor flags) of serve's last step."""
    assert step[0] == "exec", step  # the server replaces the script's shell: SIGTERM reaches it
    cut = step.index("--engine")
    assert step[cut:cut + 2 + len(serve_argv) + 1] == ["--engine", "upstream", *serve_argv, "--"], step
    return step[1:cut], step[cut + 2 + len(serve_argv) + 1:]


def _check_same_as_predict(predict, serve, serve_argv: list[str]) -> list[str]:
    """serve's script is predict's with the server in place of predictor.py and its collector;
    returns the server's runner (what precedes ``--engine``)."""
    upstream = _predictor_step(predict)
    at = predict.steps.index(upstream)
    # before predictor.py: the same prelude and ops install; predict's "rm -f <raw>" is its own
    assert serve.steps[:-1] == [s for s in predict.steps[:at] if s[:2] != ["rm", "-f"]]
    assert predict.steps[at + 1:] and all(s[:3] == ["python", "-m", "llamapipe"] for s in predict.steps[at + 1:])
    runner, predictor = _served(serve.steps[-1], serve_argv)
    # upstream's predictor flags: the predict rule's, in its order, but the file loop's two
    pairs = flags(upstream[upstream.index("predict/predictor.py") + 1:])
    assert flags(predictor) == {k: v for k, v in pairs.items() if k not in NOT_SERVED}
    expected = upstream[upstream.index("predict/predictor.py") + 1:]
    for name in NOT_SERVED:
        i = expected.index(name)
        del expected[i:i + 2]
    assert predictor == expected
    # ... and the runner is predict's (``python``, or the rehearsal's ``python -m cpu_shims --shims=...``)
    head = upstream[:upstream.index("predict/predictor.py")]
    assert runner[:len(head)] == head
    return runner


def test_serve_on_npu_is_predicts_predictor_in_predicts_container(monkeypatch):
    cfg = _config(monkeypatch, ROOT, "target=npu")
    argv = _serve_argv(port=8123, graceful=60)
    predict, serve, timeout = _commands(cfg, ROOT, argv)
    runner = _check_same_as_predict(predict, serve, _sent(cfg, argv))
    assert runner == SERVER
    predictor = flags(_served(serve.steps[-1], _sent(cfg, argv))[1])
    # the guide's predict_npu.sh flags, as the predict rule gives them (values from the rule, not typed here)
    for name in ("--inference_model", "--block_attn"):
        assert name in predictor and predictor[name] is None
    assert predictor["--mode"] == "static" and predictor["--device"] == "npu"
    assert predictor["--model_name_or_path"] == str(ROOT / "results/inference")
    for name in ("--dtype", "--src_length", "--max_length", "--batch_size", "--decode_strategy"):
        assert predictor[name] == flags(_predictor_step(predict)[2:])[name]
    # in the stage image, on predict's card, with its device nodes, mounts, env and network
    assert serve.spec is not None and predict.spec is not None
    assert {**serve.spec, "rule": "predict"} == predict.spec
    assert serve.spec["rule"] == "serve-8123"  # predict's runs never remove a live server, nor it theirs
    assert serve.spec["network"] == "host"
    assert serve.spec["env"]["ASCEND_RT_VISIBLE_DEVICES"] == predict.spec["env"]["ASCEND_RT_VISIBLE_DEVICES"] == "0"
    assert "/dev/davinci0" in serve.spec["devices"]
    assert ["python", "-c", "import paddlenlp_ops"] in serve.steps  # the ops gate of --inference_model
    assert timeout == 2 * 60 + 10  # container-run waits for the server's graceful shutdown


def test_serve_follows_the_cards(monkeypatch):
    cfg = _config(monkeypatch, ROOT, "target=npu", "devices=4,5", "sft={lora: true}")
    argv = _serve_argv(port=9000, graceful=5)
    predict, serve, timeout = _commands(cfg, ROOT, argv)
    _check_same_as_predict(predict, serve, _sent(cfg, argv))
    assert {**serve.spec, "rule": "predict"} == predict.spec
    assert serve.spec["env"]["ASCEND_RT_VISIBLE_DEVICES"] == "4"  # predict's one card: the first of 4,5
    assert "/dev/davinci4" in serve.spec["devices"] and "/dev/davinci0" not in serve.spec["devices"]
    assert serve.spec["rule"] == "serve-9000" and timeout == 2 * 5 + 10


def test_serve_on_the_rehearsal_is_predicts_local_process_with_its_shims(monkeypatch, tmp_path):
    from test_rehearsal import fake_checkout

    checkout = fake_checkout(tmp_path / "PaddleNLP")
    cfg = _config(monkeypatch, ROOT, "target=npu", "rehearsal=cpu", env={rehearsal.CHECKOUT_ENV: str(checkout)})
    argv = _serve_argv()
    predict, serve, timeout = _commands(cfg, ROOT, argv)
    assert serve.spec is None and predict.spec is None and timeout is None  # local processes, no container
    runner = _check_same_as_predict(predict, serve, _sent(cfg, argv))
    shims = ["python", "-m", "llamapipe.npu.cpu_shims", "--shims=" + ",".join(rehearsal.CPU_SHIMS)]
    from llamapipe.entrypoints import package_src_dir
    from llamapipe.npu.scripts import SERVE_SCRIPT

    assert runner == [*shims, os.path.join(package_src_dir(), SERVE_SCRIPT)]
    predictor = flags(_served(serve.steps[-1], _sent(cfg, argv))[1])
    assert "--inference_model" not in predictor and predictor["--device"] == "cpu"
    assert ["cd", f"{checkout}/llm"] in serve.steps


def test_serve_needs_the_host_network_in_a_container(monkeypatch):
    from llamapipe.npu.serve_script import serve_command

    cfg = _config(monkeypatch, ROOT, "target=npu", "npu={network: bridge}")
    with pytest.raises(PipelineError, match=r"npu\.network=bridge.*port 8123.*set npu\.network: host"):
        serve_command(cfg, str(ROOT), _serve_argv(port=8123))


def test_serve_command_imports_no_paddle():
    code = ("import json, sys; from llamapipe.config import load; "
            "from llamapipe.npu.serve_script import serve_command; "
            "serve_command(load('config.yaml', overrides=['target=npu']), '.', []); "
            "print(json.dumps([m for m in sys.modules if m.split('.')[0] in ('paddle', 'paddlenlp')]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_the_upstream_engine_module_imports_no_paddle():
    code = ("import json, sys; import llamapipe.serving.upstream_engine; "
            "print(json.dumps([m for m in sys.modules if m.split('.')[0] in ('paddle', 'paddlenlp')]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_the_container_side_code_is_python_3_9():
    files = [ROOT / "src/llamapipe/serving/upstream_engine.py", ROOT / "src/llamapipe/entrypoints/serve_script.py"]
    vermin = Path(sys.executable).parent / "vermin"
    out = subprocess.run([str(vermin), "-t=3.9-", "--no-tips", "--violations", *map(str, files)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_container_run_stops_the_container_with_whole_seconds():
    """SIGTERM to container-run: ``docker stop`` with ``--stop-timeout`` as whole seconds (the engine
    refuses ``t=130.0``, and a failed stop left only the forced removal: SIGKILL, no graceful stop)."""
    import io

    from llamapipe.runners import container as runner

    stops: list = []

    class Container:
        id = short_id = name = "c0"

        def start(self):
            pass

        def logs(self, stream=False, **kw):
            if not stream:
                return b"serving\nbye\n"  # the whole log: the runner appends what it had not streamed

            def chunks():
                yield b"serving\n"
                os.kill(os.getpid(), signal.SIGTERM)  # the runner's handler raises in this thread
                time.sleep(10)
                yield b"never\n"
            return chunks()

        def stop(self, timeout):
            stops.append(timeout)

        def wait(self, timeout=None):
            return {"StatusCode": 0}  # drained and exited by itself

        def remove(self, force, v):
            pass

    class Containers:
        def list(self, **kw):
            return []

        def create(self, **kw):
            return Container()

    client = type("Client", (), {"containers": Containers(), "images": type("Images", (), {"get": lambda s, t: t})()})()
    spec = runner.ContainerSpec(image="img", rule="serve-8000", project="p")
    out = io.BytesIO()
    with pytest.raises(SystemExit) as stopped:
        runner.run_in_container(spec, ["true"], out=out, client=client, stop_timeout=19.5)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert stops == [20] and isinstance(stops[0], int)
    # a server: the stopped container's own exit code is container-run's
    assert runner.run_in_container(spec, ["true"], out=io.BytesIO(), client=client, stop_timeout=1,
                                   stopped_exit="container") == 0
    assert out.getvalue() == b"serving\nbye\n"


# --- the engine's batch logic on a stand-in for upstream's predictor --------------------------

class _Tokenizer:
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [10 + len(w) for w in text.split()]}

    def batch_decode(self, rows, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return [" ".join(f"t{t}" for t in row if t not in (0, 2)) for row in rows]


class _StaticPredictor:
    """Upstream's StaticGraphPredictor as the engine sees it: ``config.max_length`` is the batch's
    decode length; a row ends with eos (2) and is padded with pad (0)."""

    def __init__(self, script: dict, batch_size: int, max_length: int):
        self.script, self.tokenizer = script, _Tokenizer()
        self.config = type("Config", (), {"max_length": max_length, "batch_size": batch_size})()
        self.calls: list = []

    def predict(self, texts, return_tokens=False):
        n = self.config.max_length
        self.calls.append((list(texts), n))
        rows = []
        for text in texts:
            ids = self.script[text][:n]
            rows.append(ids + [0] * (n - len(ids)))
        decoded = self.tokenizer.batch_decode(rows)
        return (decoded, rows) if return_tokens else decoded


def _engine(script: dict, batch_size: int = 2, max_length: int = 6):
    from llamapipe.serving import upstream_engine
    from llamapipe.serving.engine import EngineInfo, Limits

    engine = upstream_engine.UpstreamEngine.__new__(upstream_engine.UpstreamEngine)
    engine.predictor = _StaticPredictor(script, batch_size, max_length)
    engine.upstream = type("Upstream", (), {"StaticGraphPredictor": _StaticPredictor})
    engine.tokenizer, engine.eos_ids = engine.predictor.tokenizer, {2}
    engine.batch_size, engine.max_length, engine.block = batch_size, max_length, False
    engine.info = EngineInfo(model="m", limits=Limits(src_length=8, max_new_tokens=max_length))
    return engine


def test_rows_are_cut_to_their_own_max_tokens_and_batches_to_upstreams_batch_size():
    script = {"a": [5, 6, 7, 2], "bb b": [8, 9, 10, 11, 12, 13], "c": [2]}
    engine = _engine(script, batch_size=2, max_length=6)
    seen: list = []
    done = engine.generate(["a", "bb b", "c"], [2, 6, 6], on_text=seen.append)
    # upstream's batch_size 2: two calls, each decoded no longer than its longest row needs
    assert engine.predictor.calls == [(["a", "bb b"], 6), (["c"], 6)]
    assert engine.predictor.config.max_length == 6  # restored after each call
    assert [(d.text, d.completion_tokens, d.finish_reason) for d in done] == [
        ("t5 t6", 2, "length"),  # cut to its 2 tokens, re-decoded
        ("t8 t9 t10 t11 t12 t13", 6, "length"),  # reached max_length without eos
        ("", 0, "stop"),  # eos first
    ]
    assert [d.prompt_tokens for d in done] == [2, 3, 2]  # bos + words, untruncated
    assert seen == [["t5 t6", "t8 t9 t10 t11 t12 t13", ""], ["t5 t6", "t8 t9 t10 t11 t12 t13", ""]]
    short = engine.generate(["a", "c"], [3, 1])
    assert engine.predictor.calls[-1] == (["a", "c"], 3)  # the batch's longest limit, not max_length
    assert [(d.text, d.completion_tokens, d.finish_reason) for d in short] == [("t5 t6 t7", 3, "length"),
                                                                                ("", 0, "stop")]
    assert [(d.text, d.finish_reason) for d in engine.generate(["a"], [4])] == [("t5 t6 t7", "stop")]


def test_predictor_file_flags_are_refused():
    from llamapipe.serving.upstream_engine import UpstreamEngine

    with pytest.raises(PipelineError, match="--data_file"):
        UpstreamEngine(["--model_name_or_path", "x", "--data_file", "dev.json"], {}, "m")


# --- end to end on the rehearsal ----------------------------------------------------------------

@pytest.fixture(scope="module")
def rehearsed(tmp_path_factory) -> Path:
    """A finished rehearsal up to predict: upstream's exported model and its predictor's predictions."""
    if not CHECKOUT:
        pytest.skip(f"set {rehearsal.CHECKOUT_ENV}=<PaddleNLP checkout at the pinned commit> to run upstream's "
                    "predictor")
    project = copy_project(tmp_path_factory.mktemp("serve_npu") / "project")
    snakemake(project, "--cores", "2", "--config", "target=npu", "rehearsal=cpu", "--", "results/predictions.json",
              env={rehearsal.CHECKOUT_ENV: CHECKOUT}, timeout=2400)
    return project


DRIVER = """
import json, sys
from llamapipe.serving.upstream_engine import UpstreamEngine
cases = json.loads(sys.argv[1])
engine = UpstreamEngine(sys.argv[2:], {"max_new_tokens": cases["default"]}, "tiny-sft")
out = {"limits": vars(engine.info.limits), "details": engine.info.details, "runs": []}
for prompts, limits in cases["runs"]:
    chunks = []
    done = engine.generate(prompts, limits, on_text=chunks.append)
    out["runs"].append({"done": [vars(d) for d in done], "chunks": chunks})
print("RESULT " + json.dumps(out))
"""


def _drive_engine(cfg: dict, project: Path, cases: dict, tmp_path: Path) -> dict:
    """The serve command's own script with a driver of UpstreamEngine in place of the server:
    the same environment, checkout, CPU shims and predictor flags as ``llamapipe serve``."""
    from llamapipe.npu.serve_script import serve_command

    driver = tmp_path / "drive_engine.py"
    driver.write_text(DRIVER)
    command = serve_command(cfg, str(project), _serve_argv())
    runner, predictor = _served(parse(command).steps[-1], _sent(cfg, _serve_argv()))
    run = [*runner[:-1], str(driver), json.dumps(cases), *predictor]  # the shims' script path -> the driver
    bash, dash_c, script = shlex.split(command)  # the rehearsal's local runtime: bash -c SCRIPT
    steps = script.split("; ")
    proc = subprocess.run([bash, dash_c, "; ".join(steps[:-1] + [shlex.join(run)])], cwd=project,
                          capture_output=True, text=True, timeout=900, env=_venv_first())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def _venv_first() -> dict:
    """The scripts call ``python`` (and ``llamapipe``): this venv's, as under Snakemake (common.smk)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _predictions(project: Path) -> list[dict]:
    return json.loads((project / "results/predictions.json").read_text())


@pytest.mark.e2e
@needs_checkout
def test_upstream_engine_reproduces_the_predict_rules_predictions(rehearsed, tmp_path, monkeypatch):
    cfg = _config(monkeypatch, rehearsed, "target=npu", "rehearsal=cpu", env={rehearsal.CHECKOUT_ENV: CHECKOUT})
    batch, new = cfg["predict"]["batch_size"], cfg["predict"]["max_new_tokens"]
    predictions = _predictions(rehearsed)
    first = [p["src"] for p in predictions[:batch]]  # predictor.py's first batch, as it decoded it
    short = [1, 3, 8, new, 2, 5, new, 16][:batch]
    out = _drive_engine(cfg, rehearsed, {"default": new, "runs": [[first, [new] * batch], [first, short]]}, tmp_path)
    assert out["limits"]["src_length"] == cfg["sft"]["src_length"] and out["limits"]["max_new_tokens"] == new
    assert out["limits"]["default_max_tokens"] == new and out["details"]["upstream_batch_size"] == batch
    assert "StaticGraphPredictor" in out["details"]["engine"]  # the rehearsal: no --inference_model
    full, cut = (run["done"] for run in out["runs"])
    # upstream's predictor wrote predictions.json: the engine gives its texts, row for row
    assert [d["text"] for d in full] == [p["prediction"] for p in predictions[:batch]]
    assert out["runs"][0]["chunks"] == [[d["text"] for d in full]]  # static graph: one chunk when decoded
    for whole, part, limit in zip(full, cut, short):
        assert part["completion_tokens"] == min(limit, whole["completion_tokens"])
        assert part["finish_reason"] == ("length" if whole["completion_tokens"] >= limit else whole["finish_reason"])
        assert whole["text"].startswith(part["text"].rstrip("\ufffd"))
    assert {d["finish_reason"] for d in full} <= {"stop", "length"}
    assert all(d["completion_tokens"] <= new and d["prompt_tokens"] > 0 for d in full)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_and_stop(command: str, project: Path, port: int, new: int, env: dict) -> tuple[int, str]:
    """Start the serve command, check its completions against predict's (``new``: predict.max_new_tokens),
    SIGTERM it: (exit code, its log)."""
    import httpx

    log = project / "results/logs" / f"serve_test_{port}.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(shlex.split(command), cwd=project, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.time() + 600
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-5000:]
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        else:
            raise AssertionError("the server did not come up:\n" + log.read_text()[-5000:])
        health = httpx.get(f"{base}/health", timeout=5).json()
        assert "StaticGraphPredictor" in health["engine"] and health["upstream_batch_size"] == 8
        prediction = _predictions(project)[0]
        reply = httpx.post(f"{base}/v1/completions", timeout=300,
                           json={"model": "tiny-sft", "prompt": prediction["src"], "max_tokens": new})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        # a batch of one (predictor.py decoded it in a batch of 8, left-padded): the same greedy text
        assert body["choices"][0]["text"] == prediction["prediction"]
        assert 0 < body["usage"]["completion_tokens"] <= new
        short = httpx.post(f"{base}/v1/completions", timeout=300,
                           json={"prompt": prediction["src"], "max_tokens": 2}).json()
        assert short["usage"]["completion_tokens"] <= 2
        assert prediction["prediction"].startswith(short["choices"][0]["text"].rstrip("\ufffd"))
    finally:
        proc.send_signal(signal.SIGTERM)  # the host process: the server itself, or container-run
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    return code, log.read_text(errors="replace")


@pytest.mark.e2e
@needs_checkout
def test_the_serve_command_answers_completions_on_the_rehearsal(rehearsed, monkeypatch):
    if not (ROOT / "src/llamapipe/serving/server.py").is_file():
        pytest.skip("the server (llamapipe.serving.server) is not there yet")
    from llamapipe.npu.serve_script import serve_command

    cfg = _config(monkeypatch, rehearsed, "target=npu", "rehearsal=cpu", env={rehearsal.CHECKOUT_ENV: CHECKOUT})
    port, new = _free_port(), cfg["predict"]["max_new_tokens"]
    command = serve_command(cfg, str(rehearsed), _serve_argv(port=port, graceful=5, max_new_tokens=new))
    code, log = _serve_and_stop(command, rehearsed, port, new, _venv_first())
    assert code == 0, log[-3000:]  # the script exec'd the server: SIGTERM reached it, it stopped gracefully
    assert "on SIGTERM" in log


@pytest.mark.e2e
@pytest.mark.container
@needs_checkout
def test_serve_in_the_stage_image_is_stopped_gracefully_by_sigterm(rehearsed, monkeypatch, docker_engine, cpu_image):
    """runtime=container: container-run starts the server in the stage image on the host network;
    SIGTERM to container-run stops the container (docker stop: SIGTERM to its PID 1, the exec'd
    server), which answers it gracefully; the container is removed."""
    if not (ROOT / "src/llamapipe/serving/server.py").is_file():
        pytest.skip("the server (llamapipe.serving.server) is not there yet")
    from llamapipe.npu.serve_script import serve_command

    cfg = _config(monkeypatch, rehearsed, "target=npu", "rehearsal=cpu", "runtime=container",
                  "container={network: host}", env={rehearsal.CHECKOUT_ENV: CHECKOUT})
    assert cfg["npu"]["image"]["tag"] == cpu_image
    port, new = _free_port(), cfg["predict"]["max_new_tokens"]
    command = serve_command(cfg, str(rehearsed), _serve_argv(port=port, graceful=5, max_new_tokens=new))
    assert shlex.split(command)[:2] == ["llamapipe", "container-run"]
    code, log = _serve_and_stop(command, rehearsed, port, new, docker_engine.env(PATH=_venv_first()["PATH"]))
    assert code == 0, log[-3000:]  # the server drained and exited 0: so does serve (--stopped-exit container)
    assert "stopping container" in log and "on SIGTERM" in log  # the server inside got it, and stopped
    left = docker_engine.client.containers.list(all=True, filters={"label": f"llamapipe.rule=serve-{port}"})
    assert not left
