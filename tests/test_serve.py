"""``llamapipe serve`` for real: the process on a loopback port over the session's finished run,
asked with httpx and with the official ``openai`` client (issue 23).

- the dev prompts get exactly the text ``results/predictions.json`` has for them (one engine:
  predict's static graph, greedy), 16 at once too, and those are batched (the server says so);
- streaming gives the text non-streaming gives, in more than one piece;
- every bad request gets its status and a message naming the field, the limit or the key that
  sets it, and the server answers the next request;
- a full queue is 503, a token is required when set, SIGTERM answers what is in flight, exit 0.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import serve_process
from llamapipe.serving.openai_api import cut_at_stop

pytestmark = pytest.mark.e2e


def _dev(project: Path) -> list[dict]:
    return json.loads((project / "results/predictions.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def server(finished_run):
    s = serve_process.start(finished_run)
    yield s
    assert s.stop() == 0, s.output()


def _complete(url: str, prompt: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"prompt": prompt, **extra}, timeout=120)


def test_models_and_health(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-llama-sft"
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok"
    assert health["limits"] == {"src_length": 48, "max_new_tokens": 96, "max_batch_size": 16, "max_queue": 64}


def test_16_concurrent_dev_prompts_are_batched_and_match_predictions(server, finished_run):
    records = _dev(finished_run)[:16]
    before = httpx.get(f"{server.url}/health").json()["batch_sizes"]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda r: _complete(server.url, r["src"]), records))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    texts = [a.json()["choices"][0]["text"] for a in answers]
    assert texts == [r["prediction"] for r in records]
    sizes = [int(a.headers["x-batch-size"]) for a in answers]
    assert max(sizes) > 1, sizes  # decoded together, not one by one
    after = httpx.get(f"{server.url}/health").json()["batch_sizes"]
    decoded = {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    assert sum(size * n for size, n in decoded.items()) == 16 and max(decoded) > 1, decoded
    usage = answers[0].json()["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_openai_client_completions_chat_and_streaming(server, finished_run):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    record = _dev(finished_run)[1]
    done = client.completions.create(model="tiny-llama-sft", prompt=record["src"])
    assert done.choices[0].text == record["prediction"]
    chat = client.chat.completions.create(model="tiny-llama-sft",
                                          messages=[{"role": "user", "content": record["src"]}])
    assert chat.choices[0].message.content == record["prediction"]
    assert chat.choices[0].finish_reason in ("stop", "length")
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny-llama-sft", messages=[{"role": "user", "content": record["src"]}], stream=True)]
    assert "".join(pieces) == record["prediction"] and sum(1 for p in pieces if p) > 1


@pytest.mark.parametrize("stop", [None, "，", ["。", "色"]])
def test_streaming_gives_the_text_non_streaming_gives(server, finished_run, stop):
    for record in _dev(finished_run)[2:6]:
        extra = {"stop": stop} if stop else {}
        whole = _complete(server.url, record["src"], **extra).json()["choices"][0]
        pieces, reasons = [], []
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=120,
                          json={"prompt": record["src"], "stream": True, **extra}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line[6:])["choices"][0]
                    pieces.append(choice["text"])
                    reasons.append(choice["finish_reason"])
        assert "".join(pieces) == whole["text"] and reasons[-1] == whole["finish_reason"]
        if stop:
            assert cut_at_stop(record["prediction"], [stop] if isinstance(stop, str) else stop)[0] == whole["text"]


def test_max_tokens_cuts_the_answer_and_says_length(server, finished_run):
    record = _dev(finished_run)[0]
    short = _complete(server.url, record["src"], max_tokens=3).json()
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 3
    assert record["prediction"].startswith(short["choices"][0]["text"])


BAD = [  # (what, how it is sent, status, words the message must hold)
    ("prompt over the source length", {"json": {"prompt": "长" * 400}}, 400, ["48", "sft.src_length"]),
    ("max_tokens over the export", {"json": {"prompt": "hi", "max_tokens": 97}}, 400,
     ["max_tokens=97", "96", "export.max_new_tokens"]),
    ("body over the cap", {"content": json.dumps({"prompt": "x" * 70000})}, 413, ["65536", "serve.max_body_bytes"]),
    ("malformed JSON", {"content": b'{"prompt": "hi",'}, 400, ["not valid JSON"]),
    ("not UTF-8", {"content": b'{"prompt": "\xff\xfe"}'}, 400, ["not UTF-8"]),
    ("missing field", {"json": {"max_tokens": 5}}, 400, ["prompt", "required"]),
    ("wrong type", {"json": {"prompt": "hi", "max_tokens": "ten"}}, 400, ["max_tokens"]),
    ("negative max_tokens", {"json": {"prompt": "hi", "max_tokens": 0}}, 400, ["max_tokens"]),
    ("stream not a boolean", {"json": {"prompt": "hi", "stream": "yes"}}, 400, ["stream"]),
    ("n above 1", {"json": {"prompt": "hi", "n": 2}}, 400, ["n=2", "greedy"]),
    ("unknown model", {"json": {"prompt": "hi", "model": "gpt-4"}}, 404, ["gpt-4", "tiny-llama-sft"]),
    ("not an object", {"json": ["hi"]}, 400, ["JSON object"]),
]


@pytest.mark.parametrize("what,send,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_status_and_message_and_the_server_lives_on(server, what, send, status, words):
    r = httpx.post(f"{server.url}/v1/completions", timeout=60, headers={"content-type": "application/json"}, **send)
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert all(w in message for w in words), message
    assert _complete(server.url, "类型#裙", max_tokens=2).status_code == 200


def test_bad_chat_requests(server):
    url = f"{server.url}/v1/chat/completions"
    r = httpx.post(url, json={"messages": [{"role": "robot", "content": "hi"}]})
    assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["message"]
    r = httpx.post(url, json={"messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(url, json={"messages": [{"role": "user", "content": "长" * 400}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.get(f"{server.url}/nowhere").status_code == 404
    assert httpx.get(f"{server.url}/v1/completions").status_code == 405


def test_chat_turns_are_joined_as_sft_joins_a_multi_turn_source(server, finished_run):
    a, b = _dev(finished_run)[:2]
    msgs = [{"role": "system", "content": "ignored"}, {"role": "user", "content": a["src"]},
            {"role": "assistant", "content": a["prediction"]}, {"role": "user", "content": "好"}]
    chat = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": msgs}, timeout=60).json()
    joined = _complete(server.url, "\n".join([a["src"], a["prediction"], "好"])).json()
    assert chat["choices"][0]["message"]["content"] == joined["choices"][0]["text"]


def test_full_queue_is_503_naming_the_key_and_token_is_required(finished_run):
    s = serve_process.start(finished_run, "--config", "serve={max_queue: 1, max_batch_size: 1, batch_window_ms: 0}",
                            env={"LLAMAPIPE_API_KEY": "s3cret"})
    try:
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.post(f"{s.url}/v1/completions", json={"prompt": "hi"}).status_code == 401
        assert httpx.post(f"{s.url}/v1/completions", json={"prompt": "hi"},
                          headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(f"{s.url}/v1/models").status_code == 401
        from openai import OpenAI

        assert OpenAI(base_url=f"{s.url}/v1", api_key="s3cret").models.list().data[0].id == "tiny-llama-sft"
        srcs = [r["src"] for r in _dev(finished_run)[:12]]
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda p: httpx.post(f"{s.url}/v1/completions", headers=auth, timeout=120,
                                                         json={"prompt": p, "max_tokens": 96}), srcs))
        codes = [a.status_code for a in answers]
        assert 503 in codes and 200 in codes, codes
        full = next(a for a in answers if a.status_code == 503)
        assert "serve.max_queue" in full.json()["error"]["message"] and full.headers["retry-after"] == "1"
        assert httpx.post(f"{s.url}/v1/completions", headers=auth, json={"prompt": "hi"}).status_code == 200
    finally:
        assert s.stop() == 0, s.output()


def test_sigterm_answers_the_request_in_flight_then_exits_0(finished_run):
    record = _dev(finished_run)[3]
    # a long collection window keeps the request in flight while the signal arrives
    s = serve_process.start(finished_run, "--config", "serve={batch_window_ms: 3000}")
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(r=_complete(s.url, record["src"])))
    t.start()
    deadline = time.monotonic() + 30
    while httpx.get(f"{s.url}/health").json()["in_flight"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert s.stop() == 0, s.output()
    t.join(60)
    assert box["r"].status_code == 200 and box["r"].json()["choices"][0]["text"] == record["prediction"]
    assert "stopped on SIGTERM after answering 1 requests" in s.output(), s.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{s.url}/health")


def test_refuses_other_than_loopback_without_a_token_and_a_taken_port(finished_run, server):
    import subprocess

    cmd = [*serve_process.LLAMAPIPE, "serve", "--host", "0.0.0.0"]
    env = {k: v for k, v in __import__("os").environ.items() if k != "LLAMAPIPE_API_KEY"}
    p = subprocess.run(cmd, cwd=finished_run, capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2 and "LLAMAPIPE_API_KEY" in p.stderr + p.stdout
    port = server.url.rsplit(":", 1)[1]
    p = subprocess.run([*serve_process.LLAMAPIPE, "serve", "--port", port], cwd=finished_run, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and f"127.0.0.1:{port}" in p.stderr + p.stdout and "serve.port" in p.stderr + p.stdout


def _readme_example(name: str) -> str:
    from conftest import ROOT

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text.split(f"<!-- serve-example: {name} -->", 1)[1]
    return after.split("```", 2)[1].split("\n", 1)[1]  # the fenced block's body, language tag dropped


def test_readme_curl_and_openai_examples_run_verbatim(finished_run):
    """README's serve command (its default port, 8000), then its curl and openai examples as written."""
    import subprocess
    import sys

    serve_line = next(line for line in (Path(__file__).parents[1] / "README.md").read_text().splitlines()
                      if line.startswith("llamapipe serve"))
    argv = serve_line.split("#")[0].split()
    bindir = Path(sys.executable).parent
    proc = subprocess.Popen([str(bindir / argv[0]), *argv[1:]], cwd=finished_run, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    s = serve_process.Server(proc, "http://127.0.0.1:8000")
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{s.url}/health")
                break
            except httpx.ConnectError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.2)
        curl = subprocess.run(["bash", "-c", _readme_example("curl")], capture_output=True, text=True, timeout=120)
        assert curl.returncode == 0, curl.stderr
        answer = json.loads(curl.stdout)["choices"][0]["message"]["content"]
        direct = _complete(s.url, "类型#裙*颜色#红色*风格#复古", max_tokens=64).json()["choices"][0]["text"]
        assert answer == direct and answer
        client = subprocess.run([sys.executable, "-c", _readme_example("openai")], capture_output=True, text=True,
                                timeout=120)
        assert client.returncode == 0, client.stderr
        plain = _complete(s.url, "类型#裙*颜色#红色*风格#复古").json()["choices"][0]["text"]
        assert client.stdout.removesuffix("\n") == plain
    finally:
        assert s.stop() == 0


def test_rows_joining_and_leaving_between_steps_decode_as_alone(finished_run):
    """Continuous batching (serving.continuous): rows that join a running batch late, with longer
    or shorter prompts, and leave at their own limits, get the tokens they get decoded alone."""
    from llamapipe.core.paddle_env import prepare
    from llamapipe.serving.engine import LocalEngine

    prepare(1)
    engine = LocalEngine(str(finished_run / "results/inference"), {}, threads=1)
    srcs = [r["src"] for r in _dev(finished_run)[:6]]
    alone = [engine.generate([s], [40])[0] for s in srcs]
    steps, done = engine.step_batch(), {}
    limits = [40, 40, 7, 40, 40, 3]

    def admit(idx):
        for row in steps.admit([srcs[i] for i in idx], [limits[i] for i in idx], idx,
                               [engine.prompt_tokens(srcs[i]) for i in idx]):
            done[row.owner] = steps.completion(row)

    admit([0, 1])
    for _ in range(3):
        for row in steps.step():
            done[row.owner] = steps.completion(row)
    admit([2, 3])
    for row in steps.step():
        done[row.owner] = steps.completion(row)
    admit([4, 5])
    while len(steps):
        for row in steps.step():
            done[row.owner] = steps.completion(row)
    for i in range(6):
        cut = engine.generate([srcs[i]], [limits[i]])[0]
        assert done[i] == cut, (i, done[i], cut)
    assert [done[i].text for i in (0, 1, 3, 4)] == [alone[i].text for i in (0, 1, 3, 4)]
