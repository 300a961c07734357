"""``llamapipe chat`` typed at through a real terminal (a pty), as a user over ssh would.

In process (e2e: a pipeline run's exported model): a dev prompt prints exactly its prediction,
later turns see earlier ones, /reset forgets them, old turns are dropped to fit sft.src_length.
As a client: against a stand-in OpenAI-style server started here (fixed SSE chunks, scripted
refusals), and (e2e) against the real ``python -m llamapipe.serving.server``.
"""

from __future__ import annotations

import codecs
import fcntl
import http.server
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT

PYTHON = sys.executable
CHAT = ["-m", "llamapipe.serving.chat"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")
DIM = "\x1b[2m"


class Pty:
    """A process on a fresh terminal: what it printed, keys typed into it."""

    def __init__(self, args: list[str], env: dict | None = None, cwd: Path | None = None):
        env = {**os.environ, "TERM": "xterm", **(env or {})}
        pid, fd = pty.fork()
        if pid == 0:  # the child: its terminal is wide (no readline line wrapping), then the chat
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 1000, 0, 0))
                if cwd:
                    os.chdir(cwd)
                os.execve(PYTHON, [PYTHON, *args], env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.raw = ""  # everything printed, escape codes included
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span reads
        self.seen = 0  # how much of self.text() read_until has consumed
        self.code: int | None = None

    def text(self) -> str:
        return ANSI.sub("", self.raw).replace("\r", "")

    def _pump(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the process closed the terminal
            data = b""
        if not data:
            return False
        self.raw += self._decoder.decode(data)
        return True

    def read_until(self, pattern: str, timeout: float = 120) -> re.Match:
        """Wait for ``pattern`` (regex) in the printed text, past what earlier calls consumed."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.compile(pattern, re.S).search(self.text(), self.seen)
            if found:
                self.seen = found.end()
                return found
            if time.monotonic() > deadline or not self._pump(min(1.0, max(deadline - time.monotonic(), 0.01))):
                found = re.compile(pattern, re.S).search(self.text(), self.seen)
                if found:
                    self.seen = found.end()
                    return found
                raise AssertionError(f"no {pattern!r} in:\n{self.text()[self.seen:][-3000:]}")

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode("utf-8"))

    def at_prompt(self, keys: str) -> None:
        """Wait for the next ``you>`` prompt, then type. A Ctrl-C typed the instant the prompt is
        printed can be lost in CPython's readline (the SIGINT lands after its handler is armed but
        before its select() waits, and select() then waits for a key: seen in 2 of 7 runs here);
        a person's Ctrl-C comes later, so the test waits a moment as a person would."""
        self.read_until(r"you> ")
        if "\x03" in keys:
            time.sleep(0.5)
        self.type(keys)

    def send(self, line: str) -> None:
        self.at_prompt(line + "\r")

    def say(self, message: str) -> str:
        """Type a message at the prompt; the answer printed after ``model> `` (the rest of its line)."""
        self.send(message)
        return self.read_until(r"model> ([^\n]*)\n").group(1)

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self.code is None:
            self._pump(0.1)
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                while self._pump(0.05) and select.select([self.fd], [], [], 0)[0]:
                    pass
                self.code = os.waitstatus_to_exitcode(status)
            elif time.monotonic() > deadline:
                raise AssertionError(f"still running after {timeout}s:\n{self.text()[-3000:]}")
        return self.code

    def close(self) -> None:
        if self.code is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(self.fd)


@pytest.fixture
def terminals():
    opened: list[Pty] = []

    def start(*args: str, env: dict | None = None, cwd: Path | None = None, python: tuple = tuple(CHAT)) -> Pty:
        term = Pty([*python, *args], env=env, cwd=cwd)
        opened.append(term)
        return term

    yield start
    for term in opened:
        term.close()


# -- the conversation's bookkeeping, on a stand-in engine (no terminal: a piped transcript) ----------


class EchoEngine:
    """Not the model: its tokens are characters, its answer is #<how many prompts it has seen>."""

    def __init__(self) -> None:
        from llamapipe.serving.engine import EngineInfo, Limits

        self.info = EngineInfo("echo", Limits(src_length=30, max_new_tokens=10, default_max_tokens=10))
        self.prompts: list[str] = []

    def prompt_tokens(self, prompt: str) -> int:
        return 1 + len(prompt)

    def generate(self, prompts, max_new_tokens, on_text=None):
        from llamapipe.serving.engine import Completion

        self.prompts.append(prompts[0])
        text = f"#{len(self.prompts)}"
        for i in range(1, len(text) + 1):
            on_text([text[:i]])
        return [Completion(text, self.prompt_tokens(prompts[0]), len(text), "stop")]


def test_turns_fit_the_source_length_oldest_first_with_a_stand_in_engine():
    import io

    from llamapipe.serving.chat import run_chat

    engine, out = EchoEngine(), io.StringIO()
    typed = ["aaaa", "", "bbbb", "c" * 18, "/reset", "bbbb", "d" * 40, "/nope", "/quit", "never read"]
    assert run_chat(engine=engine, stdin=io.StringIO("\n".join(typed) + "\n"), stdout=out) == 0
    assert engine.prompts == ["aaaa", "aaaa\n#1\nbbbb", "bbbb\n#2\n" + "c" * 18, "bbbb"]
    assert out.getvalue().splitlines()[1:] == [
        "you> aaaa", "model> #1",
        "you> ",
        "you> bbbb", "model> #2",
        "you> " + "c" * 18, "(forgot the oldest 2 turns to fit the model's source length, sft.src_length)",
        "model> #3",
        "you> /reset", "(conversation forgotten)",
        "you> bbbb", "model> #4",
        "you> " + "d" * 40, "message not sent, it is too long for the model: the prompt is 41 tokens; the model "
        "takes at most 30 (sft.src_length, then rerun sft and export)",
        "you> /nope", "unknown command /nope; /help lists them",
        "you> /quit"]
    assert run_chat(engine=engine, stdin=io.StringIO(""), stdout=out) == 0  # end of input: as Ctrl-D


# -- client mode against a stand-in server --------------------------------------------------------


class StandIn(http.server.ThreadingHTTPServer):
    """Not llamapipe serve: answers /v1/chat/completions in OpenAI's streaming shape with the
    reply ``echo: <last message> (<n> messages)`` in a few chunks. Scripted: more than
    ``max_messages`` messages, or a message containing LONG, get 400 context_length_exceeded;
    BOOM gets a 500; SLOW streams one chunk, then waits until the client hangs up."""

    daemon_threads = True
    key = "stand-in-key"
    max_messages = 3

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), StandInHandler)
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.hung_up = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class StandInHandler(http.server.BaseHTTPRequestHandler):
    server: StandIn

    def log_message(self, *args):  # quiet
        pass

    def _json(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        given = self.headers.get("Authorization")
        self.server.auth.append(given)
        if given != f"Bearer {self.server.key}":
            self._json(401, {"error": {"message": "missing or wrong API key", "code": "invalid_api_key"}})
            return False
        return True

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/health":
            self._json(200, {"status": "ok", "limits": {"src_length": 48, "max_new_tokens": 96}})
        elif self._authorized():
            self._json(200, {"object": "list", "data": [{"id": "stand-in", "object": "model"}]})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self._authorized():
            return
        self.server.bodies.append(body)
        messages = body["messages"]
        last = messages[-1]["content"]
        if len(messages) > self.server.max_messages or any("LONG" in m["content"] for m in messages):
            self._json(400, {"error": {"message": "the prompt is 99 tokens; the exported model takes at most 48 "
                                       "(sft.src_length, then rerun sft and export)", "type": "invalid_request_error",
                                       "param": "messages", "code": "context_length_exceeded"}})
            return
        if last == "BOOM":
            self._json(500, {"error": {"message": "decoding failed: out of cheese", "type": "server_error"}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

        def event(delta: dict, reason: str | None = None) -> None:
            chunk = {"object": "chat.completion.chunk", "model": "stand-in",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
            self.wfile.flush()

        event({"role": "assistant", "content": ""})
        if last == "SLOW":
            event({"content": "thinking"})
            try:
                while True:  # until the client hangs up
                    time.sleep(0.05)
                    self.wfile.write(b": still thinking\n\n")
                    self.wfile.flush()
            except OSError:
                self.server.hung_up.set()
                return
        reply = f"echo: {last} ({len(messages)} messages)"
        for i in range(0, len(reply), 4):
            event({"content": reply[i:i + 4]})
        event({}, "stop")
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def stand_in():
    server = StandIn()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _client(terminals, url: str, key: str | None = StandIn.key, *args: str) -> Pty:
    # a proxy the shell may have set is not used for a server on this host (nothing listens on :9)
    env = {"http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}
    env.update({"CHAT_TEST_KEY": key} if key else {})
    return terminals("--url", url, "--api-key-env", "CHAT_TEST_KEY", *args, env=env)


def test_client_of_a_stand_in_server_streams_answers_and_sends_the_conversation(terminals, stand_in):
    term = _client(terminals, stand_in.url + "/v1", StandIn.key, "--max-tokens", "7")
    term.read_until(r"chatting with stand-in at " + re.escape(stand_in.url) + r": prompts up to 48 tokens")
    assert term.say("hello") == "echo: hello (1 messages)"
    assert term.say("  and you?  ") == "echo: and you? (3 messages)"
    assert stand_in.bodies[-1] == {
        "model": "stand-in", "stream": True, "max_tokens": 7,
        "messages": [{"role": "user", "content": "hello"},
                     {"role": "assistant", "content": "echo: hello (1 messages)"},
                     {"role": "user", "content": "and you?"}]}
    assert set(stand_in.auth) == {f"Bearer {StandIn.key}"}
    term.send("")  # an empty line: nothing sent
    term.send("/help")
    term.read_until(r"/reset +forget the conversation")
    term.send("/reset")
    term.read_until(r"conversation forgotten")
    assert term.say("again") == "echo: again (1 messages)"
    assert len(stand_in.bodies) == 3
    term.send("/quit")
    assert term.wait() == 0


def test_client_of_a_stand_in_server_drops_old_turns_on_context_length_exceeded(terminals, stand_in):
    term = _client(terminals, stand_in.url)
    assert term.say("one") == "echo: one (1 messages)"
    assert term.say("two") == "echo: two (3 messages)"
    assert term.say("three") == "echo: three (3 messages)"  # 5 messages refused, then the oldest 2 dropped
    assert re.search(re.escape(DIM) + r"\(forgot the oldest 2 turns [^\n]*sft\.src_length", term.raw)
    assert [len(b["messages"]) for b in stand_in.bodies] == [1, 3, 5, 3]
    assert stand_in.bodies[-1]["messages"][0]["content"] == "two"
    # a message too long on its own: not sent, said so, the conversation kept
    term.send("a LONG one")
    term.read_until(r"message not sent, it is too long for the model: [^\n]*48 \(sft\.src_length")
    assert term.say("four") == "echo: four (3 messages)"
    assert stand_in.bodies[-1]["messages"][0]["content"] == "three"
    term.at_prompt("\x04")  # Ctrl-D
    assert term.wait() == 0


def test_client_of_a_stand_in_server_survives_errors_and_ctrl_c(terminals, stand_in):
    term = _client(terminals, stand_in.url)
    assert term.say("hi") == "echo: hi (1 messages)"
    term.send("BOOM")
    term.read_until(r"error: the server answered 500: decoding failed: out of cheese\n")
    term.send("SLOW")
    term.read_until(r"model> thinking")
    term.type("\x03")  # Ctrl-C during the answer: stops it, the chat goes on
    term.read_until(r"answer stopped")
    assert stand_in.hung_up.wait(10)
    assert term.say("still there?") == "echo: still there? (3 messages)"  # BOOM and SLOW were forgotten
    stand_in.shutdown()
    stand_in.server_close()
    term.send("anyone?")
    term.read_until(r"error: cannot reach " + re.escape(stand_in.url) + r": is `llamapipe serve` still running\?")
    term.at_prompt("\x03")  # Ctrl-C at the prompt: leaves
    assert term.wait() == 0


def test_client_exits_2_when_no_server_listens_or_the_key_or_max_tokens_is_wrong(terminals, stand_in):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = f"http://127.0.0.1:{s.getsockname()[1]}"
    term = _client(terminals, free)
    assert term.wait() == 2
    assert re.search(r"cannot reach " + re.escape(free) + r" .*`llamapipe serve`", term.text()), term.text()
    term = _client(terminals, stand_in.url, "wrong")
    assert term.wait() == 2
    assert "refused the API key" in term.text() and "--api-key-env" in term.text()
    term = _client(terminals, stand_in.url, None)
    assert term.wait() == 2
    assert stand_in.auth[-1] is None and not stand_in.bodies
    term = _client(terminals, stand_in.url, StandIn.key, "--max-tokens", "97")  # more than /health's limit
    assert term.wait() == 2
    assert "--max-tokens 97 is more than the 96 tokens" in term.text() and "export.max_new_tokens" in term.text()


# -- in process, on a pipeline run's exported model -----------------------------------------------


@pytest.fixture(scope="module")
def engine(finished_run):
    from llamapipe.core.paddle_env import prepare
    from llamapipe.serving.engine import LocalEngine

    prepare(1)
    return LocalEngine(str(finished_run / "results/inference"), {}, threads=1)


@pytest.fixture(scope="module")
def dev(finished_run, engine):
    """Dev records (src, prediction) whose prediction is one line, shortest prompt first."""
    preds = json.loads((finished_run / "results/predictions.json").read_text(encoding="utf-8"))
    usable = [p for p in preds if p["prediction"] and "\n" not in p["prediction"]
              and engine.prompt_tokens(p["src"]) <= engine.info.limits.src_length]
    return sorted(usable, key=lambda p: engine.prompt_tokens(p["src"]))


def _answer(engine, turns: list[str], n: int) -> str:
    from llamapipe.serving.engine import prompt_of_messages

    return engine.generate([prompt_of_messages(turns)], [n])[0].text


def _local(terminals, finished_run, *args: str) -> Pty:
    term = terminals("--inference", str(finished_run / "results/inference"), *args)
    term.read_until(r"chatting with \S+ in this process: prompts up to 48 tokens \(sft\.src_length\)")
    return term


@pytest.mark.e2e
def test_dev_prompt_prints_its_prediction_and_ctrl_d_exits_0(terminals, finished_run, dev):
    term = _local(terminals, finished_run)
    first, other = dev[-1], dev[len(dev) // 2]  # the longest prompt that fits, and another
    assert term.say(first["src"]) == first["prediction"]
    term.send("/reset")
    assert term.say(other["src"]) == other["prediction"]
    term.at_prompt("\x04")
    assert term.wait() == 0


@pytest.mark.e2e
def test_later_turns_see_earlier_ones_and_reset_forgets_them(terminals, finished_run, engine, dev):
    from llamapipe.serving.engine import prompt_of_messages

    n, limit = 6, engine.info.limits.src_length
    # two short prompts whose answer depends on whether the other came first (the check has teeth)
    u1, u2 = next((a["src"], b["src"]) for a in dev for b in dev
                  if a is not b and _answer(engine, [b["src"]], n)
                  != _answer(engine, [a["src"], _answer(engine, [a["src"]], n), b["src"]], n))
    a1 = _answer(engine, [u1], n)
    a2 = _answer(engine, [u1, a1, u2], n)
    assert engine.prompt_tokens(prompt_of_messages([u1, a1, u2])) <= limit

    term = _local(terminals, finished_run, "--max-tokens", str(n))
    assert term.say(u1) == a1
    assert term.say(u2) == a2  # the prompt held the first exchange
    # a long third message: the conversation no longer fits, the oldest exchanges go first
    u3 = dev[-1]["src"]
    history = [u1, a1, u2, a2]
    while engine.prompt_tokens(prompt_of_messages([*history, u3])) > limit:
        history = history[2:]
    assert len(history) < 4
    before = len(term.raw)
    assert term.say(u3) == _answer(engine, [*history, u3], n)
    assert DIM + f"(forgot the oldest {4 - len(history)} turns" in term.raw[before:]
    term.send("/reset")
    term.read_until(r"conversation forgotten")
    assert term.say(u2) == _answer(engine, [u2], n) != a2
    term.send("/quit")
    assert term.wait() == 0


@pytest.mark.e2e
def test_a_message_longer_than_the_source_length_is_not_sent(terminals, finished_run, engine, dev):
    long = " ".join(p["src"] for p in dev[-3:])
    assert engine.prompt_tokens(long) > engine.info.limits.src_length
    term = _local(terminals, finished_run)
    term.send(long)
    found = term.read_until(r"message not sent, it is too long for the model: the prompt is (\d+) tokens; "
                            r"the model takes at most 48 \(sft\.src_length")
    assert int(found.group(1)) == engine.prompt_tokens(long)
    assert term.say(dev[0]["src"]) == dev[0]["prediction"]  # nothing of it stayed in the conversation
    term.at_prompt("\x03")  # Ctrl-C at the prompt leaves, exit 0
    assert term.wait() == 0


# the engine, slowed down (a tiny model answers faster than a key is pressed)
SLOW_CHAT = """
import sys, time
from llamapipe.core.paddle_env import prepare
prepare(1)
from llamapipe.serving.chat import run_chat
from llamapipe.serving.engine import LocalEngine
engine = LocalEngine(sys.argv[1], {})
generate = engine.generate
def slowly(prompts, limits, on_text=None):
    def step(texts):
        time.sleep(0.2)
        on_text(texts)
    return generate(prompts, limits, on_text=step)
engine.generate = slowly
sys.exit(run_chat(engine=engine))
"""


@pytest.mark.e2e
def test_ctrl_c_stops_an_answer_being_decoded_and_the_chat_goes_on(terminals, finished_run, dev):
    record = max(dev, key=lambda p: len(p["prediction"]))
    term = terminals(str(finished_run / "results/inference"), python=("-c", SLOW_CHAT))
    term.send(record["src"])
    term.read_until(r"model> \S")  # the first tokens are out
    term.type("\x03")
    term.read_until(r"answer stopped; this exchange is forgotten")
    assert record["prediction"] not in term.text()  # stopped part way
    assert term.say(record["src"]) == record["prediction"]  # the engine decodes afresh, and nothing stayed
    term.send("/quit")
    assert term.wait() == 0


# -- client mode against the real server ----------------------------------------------------------


def _server_ready() -> bool:
    serving = ROOT / "src/llamapipe/serving"
    if not (serving / "server.py").exists() or not (serving / "openai_api.py").exists():
        return False
    return subprocess.run([PYTHON, "-m", "llamapipe.serving.server", "--help"], capture_output=True).returncode == 0


@pytest.mark.e2e
def test_client_of_llamapipe_serve(terminals, finished_run, engine, dev, tmp_path):
    if not _server_ready():
        pytest.skip("python -m llamapipe.serving.server is not there yet")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LLAMAPIPE_API_KEY": "chat-test-key"}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([PYTHON, "-m", "llamapipe.serving.server", "--engine", "local", "--inference",
                               str(finished_run / "results/inference"), "--serve", json.dumps({"port": port})],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.3)
        term = terminals("--url", url, env={"LLAMAPIPE_API_KEY": "chat-test-key"})
        term.read_until(r"chatting with \S+ at " + re.escape(url))
        first = dev[-1]
        assert term.say(first["src"]) == first["prediction"]
        # the next message does not fit after that exchange: the server refuses, the oldest turns go
        second = dev[-2]
        assert engine.prompt_tokens("\n".join([first["src"], first["prediction"], second["src"]])) > 48
        assert term.say(second["src"]) == second["prediction"]
        assert DIM + "(forgot the oldest 2 turns" in term.raw
        term.send(" ".join(p["src"] for p in dev[-3:]))
        term.read_until(r"message not sent, it is too long for the model: [^\n]*sft\.src_length")
        term.at_prompt("\x04")
        assert term.wait() == 0
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
