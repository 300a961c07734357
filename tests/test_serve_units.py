"""The serving logic without a model: batching, limits, streaming's settled text, the app's
refusals. The engine here is a stand-in (``EchoEngine``: it decodes by reversing the prompt),
so these run in seconds; tests/test_serve.py runs the same app on the real exported model."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from llamapipe.core.errors import PipelineError
from llamapipe.serving.batcher import Batcher, QueueFull
from llamapipe.serving.engine import Completion, Engine, EngineInfo, Limits, prompt_of_messages
from llamapipe.serving.openai_api import Api, create_app, cut_at_stop, settled_prefix
from llamapipe.serving.server import api_key_from, is_loopback, serve_settings

SETTINGS = serve_settings({})


class EchoEngine(Engine):
    """Answers a prompt with it reversed, a character a step; records the batches it was given."""

    def __init__(self, delay: float = 0.0):
        self.info = EngineInfo(model="echo", limits=Limits(src_length=10, max_new_tokens=8, default_max_tokens=6))
        self.batches: list[list[str]] = []
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()

    def prompt_tokens(self, prompt: str) -> int:
        return len(prompt) + 1

    def generate(self, prompts, max_new_tokens, on_text=None):
        self.gate.wait()
        self.batches.append(list(prompts))
        answers = [p[::-1][:n] for p, n in zip(prompts, max_new_tokens)]
        for step in range(1, max(len(a) for a in answers) + 1):
            time.sleep(self.delay)
            if on_text:
                on_text([a[:step] for a in answers])
        return [Completion(a, len(p) + 1, len(a), "length" if len(a) == n else "stop")
                for p, a, n in zip(prompts, answers, max_new_tokens)]


def _client(engine: Engine, **settings) -> tuple[httpx.AsyncClient, Batcher]:
    s = {**SETTINGS, **settings}
    batcher = Batcher(engine, s["max_batch_size"], s["batch_window_ms"] / 1000, s["max_queue"])
    batcher.start()
    app = create_app(Api(engine, batcher, s, api_key=s.get("key")))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test"), batcher


def test_concurrent_requests_share_one_batch_and_each_gets_its_own_answer():
    engine = EchoEngine()

    async def go():
        client, batcher = _client(engine, batch_window_ms=200)
        rs = await asyncio.gather(*[client.post("/v1/completions", json={"prompt": f"ab{i}"}) for i in range(5)])
        batcher.stop()
        return rs

    rs = asyncio.run(go())
    assert [r.json()["choices"][0]["text"] for r in rs] == [f"{i}ba" for i in range(5)]
    assert engine.batches == [[f"ab{i}" for i in range(5)]]
    assert {r.headers["x-batch-size"] for r in rs} == {"5"}


def test_batch_cap_splits_a_burst():
    engine = EchoEngine()
    engine.gate.clear()  # hold the first batch until all are queued

    async def go():
        client, batcher = _client(engine, batch_window_ms=50, max_batch_size=3)
        tasks = [asyncio.create_task(client.post("/v1/completions", json={"prompt": str(i)})) for i in range(7)]
        await asyncio.sleep(0.3)
        engine.gate.set()
        await asyncio.gather(*tasks)
        batcher.stop()
        return batcher.batch_sizes

    sizes = asyncio.run(go())
    assert max(len(b) for b in engine.batches) == 3 and sum(len(b) for b in engine.batches) == 7, engine.batches
    assert sum(k * v for k, v in sizes.items()) == 7


def test_queue_full_is_refused_at_submit():
    engine = EchoEngine()
    engine.gate.clear()

    async def go():
        batcher = Batcher(engine, max_batch=1, window_s=0, max_queue=1)
        batcher.start()
        first = batcher.submit("a", 1)
        await asyncio.sleep(0.1)  # the thread has taken it: the queue is empty again
        batcher.submit("b", 1)
        with pytest.raises(QueueFull, match="serve.max_queue"):
            batcher.submit("c", 1)
        engine.gate.set()
        await first.result
        batcher.stop()

    asyncio.run(go())


def test_limits_name_the_key_and_the_stream_settles_to_the_whole_text():
    engine = EchoEngine(delay=0.001)

    async def go():
        client, batcher = _client(engine)
        long = await client.post("/v1/completions", json={"prompt": "x" * 10})
        over = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 9})
        default = await client.post("/v1/completions", json={"prompt": "abcdefgh"})
        stream = await client.post("/v1/chat/completions",
                                   json={"messages": [{"role": "user", "content": "a b c d"}], "stream": True})
        batcher.stop()
        return long, over, default, stream

    long, over, default, stream = asyncio.run(go())
    assert long.status_code == 400 and "sft.src_length" in long.json()["error"]["message"]
    assert over.status_code == 400 and "export.max_new_tokens" in over.json()["error"]["message"]
    assert default.json()["choices"][0] == {"index": 0, "text": "hgfedc", "logprobs": None, "finish_reason": "length"}
    events = [line[6:] for line in stream.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    import json

    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert chunks[0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["delta"].get("content", "") for c in chunks) == "d c b "  # 6 tokens of "d c b a"
    assert chunks[-1]["finish_reason"] == "length"


def test_token_required_when_set():
    async def go():
        client, batcher = _client(EchoEngine(), key="k")
        out = [(await client.get("/v1/models")).status_code,
               (await client.get("/v1/models", headers={"Authorization": "Bearer k"})).status_code,
               (await client.get("/health")).status_code]
        batcher.stop()
        return out

    assert asyncio.run(go()) == [401, 200, 200]


def test_settled_prefix_holds_back_what_clean_up_or_a_stop_may_still_change():
    assert settled_prefix("I do n", []) == "I do"  # " n't" may still fold into "don't"
    assert settled_prefix("red dress", []) == "red dress"
    assert settled_prefix("红色的裙子", []) == "红色的裙子"
    assert settled_prefix("红色\ufffd", []) == "红色"
    assert settled_prefix("红色的裙子", ["的裙子呀"]) == "红色"
    assert cut_at_stop("a，b。c", ["。", "，"]) == ("a", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


def test_turns_join_like_a_multi_turn_source_and_binding_rules():
    assert prompt_of_messages(["q1", "a1", "q2"]) == "q1\na1\nq2"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    with pytest.raises(PipelineError, match="LLAMAPIPE_TEST_UNSET_KEY_VAR"):
        api_key_from("LLAMAPIPE_TEST_UNSET_KEY_VAR", "0.0.0.0", allow_no_key=False)
    assert api_key_from("LLAMAPIPE_TEST_UNSET_KEY_VAR", "0.0.0.0", allow_no_key=True) is None


class BrokenEngine(EchoEngine):
    def generate(self, prompts, max_new_tokens, on_text=None):
        raise RuntimeError("out of device memory")


def test_a_failed_batch_is_a_500_in_openais_shape_and_the_next_request_is_answered():
    engine = BrokenEngine()

    async def go():
        client, batcher = _client(engine)
        failed = await client.post("/v1/completions", json={"prompt": "ab"})
        streamed = await client.post("/v1/completions", json={"prompt": "ab", "stream": True})
        engine.__class__ = EchoEngine  # mended
        ok = await client.post("/v1/completions", json={"prompt": "ab"})
        batcher.stop()
        return failed, streamed, ok

    failed, streamed, ok = asyncio.run(go())
    assert failed.status_code == 500 and "out of device memory" in failed.json()["error"]["message"]
    assert "out of device memory" in streamed.text and streamed.text.rstrip().endswith("data: [DONE]")
    assert ok.json()["choices"][0]["text"] == "ba"


def test_serve_without_an_exported_model_says_what_to_run(tmp_path):
    import subprocess
    import sys

    from conftest import copy_project

    tmp_path = copy_project(tmp_path / "project")
    p = subprocess.run([sys.executable, "-m", "llamapipe", "serve", "--port", "0"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "results/inference holds no exported model" in p.stderr and "make run" in p.stderr, p.stderr
    p = subprocess.run([sys.executable, "-m", "llamapipe", "serve", "--config", "serve={port: -1}"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "serve.port" in p.stderr, p.stderr


def test_serve_reads_the_config_as_snakemake_does(tmp_path):
    """--config strings typed by the schema, --configfile merged, CLI flags over both."""
    import json
    import shlex
    import subprocess
    import sys

    from conftest import copy_project

    project = copy_project(tmp_path / "project")
    (project / "my.yaml").write_text("predict:\n  batch_size: 4\n")
    p = subprocess.run([sys.executable, "-m", "llamapipe", "serve", "--dry-run", "--configfile", "my.yaml",
                        "--config", "serve={max_queue: 8, batch_window_ms: 2.5}", "--port", "9001"],
                       cwd=project, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    argv = shlex.split(p.stdout.strip().splitlines()[0])
    serve = json.loads(argv[argv.index("--serve") + 1])
    predict = json.loads(argv[argv.index("--predict") + 1])
    assert (serve["max_queue"], serve["batch_window_ms"], serve["port"]) == (8, 2.5, 9001)
    assert predict["batch_size"] == 4 and argv[argv.index("--model-name") + 1] == "tiny-llama-sft"


class EchoSteps:
    """A stand-in StepBatch: each row emits its prompt reversed, a character a step."""

    def __init__(self):
        self.rows, self.sizes = [], []

    def __len__(self):
        return len(self.rows)

    def admit(self, prompts, limits, owners, counts):
        from llamapipe.serving.continuous import Row

        for p, n, o, c in zip(prompts, limits, owners, counts):
            self.rows.append(Row(o, n, c, [p[::-1][0]]))
        return self._leave()

    def step(self):
        time.sleep(0.02)  # long enough for a request sent meanwhile to join
        self.sizes.append(len(self.rows))
        for r in self.rows:
            r.generated.append(r.owner.prompt[::-1][len(r.generated)])
        return self._leave()

    def _leave(self):
        done = [r for r in self.rows if len(r.generated) >= min(r.limit, len(r.owner.prompt))]
        self.rows = [r for r in self.rows if r not in done]
        return done

    def text(self, row):
        return "".join(row.generated)

    def completion(self, row):
        return Completion(self.text(row), row.prompt_tokens, len(row.generated), "length")


class EchoStepEngine(EchoEngine):
    def __init__(self):
        super().__init__()
        self.steps = EchoSteps()

    def step_batch(self):
        return self.steps


def test_continuous_batching_answers_short_requests_first_and_drains_on_stop():
    engine = EchoStepEngine()

    async def go():
        client, batcher = _client(engine, batch_window_ms=0)
        long = asyncio.create_task(client.post("/v1/completions", json={"prompt": "abcdefgh", "max_tokens": 8}))
        await asyncio.sleep(0.05)
        short = await client.post("/v1/completions", json={"prompt": "xy"})
        streamed = await client.post("/v1/completions", json={"prompt": "hello", "stream": True})
        queued = batcher.submit("stop", 4)  # queued before stop(): still answered
        batcher.stop(timeout=10)
        return await long, short, streamed, await queued.result, batcher

    long, short, streamed, queued, batcher = asyncio.run(go())
    assert long.json()["choices"][0]["text"] == "hgfedcba" and short.json()["choices"][0]["text"] == "yx"
    assert "olleh" in "".join(streamed.text.split('"text": "')[i].split('"')[0]
                              for i in range(1, streamed.text.count('"text": "') + 1))
    assert queued.text == "pots"
    assert not batcher._thread.is_alive()
    assert max(engine.steps.sizes) >= 2  # the short one joined the long one's steps
