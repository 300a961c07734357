"""``llamapipe chat``: a conversation with the fine-tuned model in the terminal (works over ssh).

Two ways to reach the model, same conversation either way:

- in process (``engine``, target cpu): the predict stage's greedy decoder on ``results/inference``;
  the answer is printed as it is decoded, token by token;
- client of a running ``llamapipe serve`` (``url``; on target npu the model lives in the stage
  image on the cards, so this is how to chat there): ``POST {url}/v1/chat/completions`` with
  ``stream: true``, the server-sent events printed as they come.

The conversation is the list of turns (user, assistant, user, ...); the prompt is
``prompt_of_messages(turns)``, the way sft joined multi-turn sources. When it is longer than the
model's source length (``sft.src_length``) the oldest exchanges are forgotten until it fits (one
dim note line says so); a message that alone is too long is not sent.

Keys: ``/reset`` forgets the conversation, ``/help`` lists the commands, ``/quit`` or Ctrl-D
leaves. Ctrl-C during an answer stops that answer (the exchange is forgotten, the chat goes on);
Ctrl-C at the ``you>`` prompt leaves, as Ctrl-D does (exit 0): what a user pressing Ctrl-C in a
terminal program expects, and nothing is lost that /quit would keep.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, TextIO

API_KEY_ENV = "LLAMAPIPE_API_KEY"  # the variable `llamapipe serve` reads its token from, by default
YOU, MODEL = "you> ", "model> "
HELP = """commands:
  /reset   forget the conversation (the next message starts a new one)
  /help    this list
  /quit    leave (also Ctrl-D, or Ctrl-C at the prompt)
Ctrl-C while the model answers stops the answer. Earlier turns are forgotten, oldest first, when the
conversation no longer fits the model's source length (sft.src_length)."""


class ChatError(Exception):
    """One line to show; the conversation goes on."""


class Fatal(Exception):
    """Chat cannot start (exit 2)."""


class TooLong(Exception):
    """The prompt is longer than the model takes; the message says how long and the limit."""


def _settled(text: str) -> str:
    """What of a partly decoded answer will not change as decoding goes on: an unfinished character
    shows as U+FFFD, and the tokenizer's clean-up may still remove a space among the last 4
    characters (" ." -> "."), as the server's streaming holds them back too."""
    text = text.split("\ufffd", 1)[0]
    space = text.find(" ", max(len(text) - 4, 0))
    return text[:space] if space >= 0 else text


class LocalModel:
    """The engine in this process (target cpu)."""

    def __init__(self, engine: Any, max_tokens: int | None):
        limits = engine.info.limits
        self.engine, self.limits = engine, limits
        self.max_tokens = max_tokens or limits.default_max_tokens or limits.max_new_tokens
        if self.max_tokens > limits.max_new_tokens:
            raise Fatal(f"--max-tokens {self.max_tokens} is more than the {limits.max_new_tokens} tokens the model "
                        f"was exported to decode ({limits.max_new_tokens_key}; rerun export to change it)")

    def describe(self) -> str:
        return (f"{self.engine.info.model} in this process: prompts up to {self.limits.src_length} tokens "
                f"({self.limits.src_length_key}), answers up to {self.max_tokens} tokens")

    def reply(self, turns: list[str], write: Callable[[str], None]) -> str:
        from llamapipe.serving.engine import prompt_of_messages

        prompt = prompt_of_messages(turns)
        tokens = self.engine.prompt_tokens(prompt)
        if tokens > self.limits.src_length:  # generate would cut it: refuse, as the server does
            raise TooLong(f"the prompt is {tokens} tokens; the model takes at most {self.limits.src_length} "
                          f"({self.limits.src_length_key}, then rerun sft and export)")
        shown = [""]

        def on_text(texts: list[str]) -> None:
            ready = _settled(texts[0])
            if len(ready) > len(shown[0]) and ready.startswith(shown[0]):
                write(ready[len(shown[0]):])
                shown[0] = ready

        # Ctrl-C: Python raises KeyboardInterrupt only between Paddle calls, so a step graph stops
        # after the token being decoded, a loop graph (one call for the whole decode) only once
        # it has finished; either way the answer is discarded, and the next decode starts afresh.
        text = self.engine.generate([prompt], [self.max_tokens], on_text=on_text)[0].text
        if text.startswith(shown[0]):
            write(text[len(shown[0]):])
        else:  # a shown piece changed after all (should not happen): show the whole answer again
            write("\n" + MODEL + text)
        return text


class RemoteModel:
    """A running ``llamapipe serve`` (any OpenAI-compatible chat completions server)."""

    def __init__(self, url: str, api_key: str | None, max_tokens: int | None, model: str | None):
        import httpx

        self.url = url.rstrip("/") if "://" in url else "http://" + url.rstrip("/")
        if self.url.endswith("/v1"):  # accept the API's base url as well as the server's
            self.url = self.url[: -len("/v1")]
        self.max_tokens, self.model = max_tokens, model
        self.limits: dict = {}
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # connecting is quick or fails; an answer may wait behind other requests. A server on this
        # host is reached directly, whatever http(s)_proxy the shell has (common on cluster hosts).
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(600.0, connect=10.0),
                                 trust_env=not _loopback(self.url))

    def start(self) -> None:
        import httpx

        try:
            r = self.http.get(self.url + "/v1/models")
        except httpx.ConnectError as err:
            raise Fatal(f"cannot reach {self.url} ({err}): start the server first (`llamapipe serve`) "
                        "or give its address with --url") from None
        except httpx.HTTPError as err:
            raise Fatal(f"cannot reach {self.url}: {type(err).__name__}: {err}") from None
        if r.status_code == 401:
            raise Fatal(f"{self.url} refused the API key ({_error_of(r)}): put the server's token in "
                        f"${API_KEY_ENV} (or name the variable with --api-key-env)")
        if r.status_code == 200 and self.model is None:
            try:
                self.model = r.json()["data"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                pass
        try:  # llamapipe serve's /health has the model's limits (another server may not)
            self.limits = self.http.get(self.url + "/health").json()["limits"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            self.limits = {}
        most = self.limits.get("max_new_tokens")
        if self.max_tokens and isinstance(most, int) and self.max_tokens > most:
            raise Fatal(f"--max-tokens {self.max_tokens} is more than the {most} tokens the model was exported to "
                        "decode (export.max_new_tokens; rerun export to change it)")

    def describe(self) -> str:
        shown = f"{self.model or 'the model'} at {self.url}"
        if self.limits.get("src_length"):
            shown += f": prompts up to {self.limits['src_length']} tokens (sft.src_length)"
        return shown

    def reply(self, turns: list[str], write: Callable[[str], None]) -> str:
        import httpx

        messages = [{"role": "assistant" if i % 2 else "user", "content": t} for i, t in enumerate(turns)]
        body: dict = {"messages": messages, "stream": True}
        if self.model:
            body["model"] = self.model
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        try:
            with self.http.stream("POST", self.url + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    self._refused(r)
                return self._read_stream(r, write)
        except httpx.ConnectError:
            raise ChatError(f"cannot reach {self.url}: is `llamapipe serve` still running?") from None
        except httpx.TimeoutException:
            raise ChatError(f"{self.url} did not answer in time") from None
        except httpx.HTTPError as err:
            raise ChatError(f"the connection to {self.url} broke: {type(err).__name__}: {err}") from None

    @staticmethod
    def _refused(r: Any) -> None:
        message = _error_of(r)
        code = ""
        try:
            code = r.json()["error"].get("code") or ""
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        if r.status_code == 400 and code == "context_length_exceeded":
            raise TooLong(message)
        if r.status_code == 401:
            raise ChatError(f"the server refused the API key (401): {message}")
        raise ChatError(f"the server answered {r.status_code}: {message}")

    @staticmethod
    def _read_stream(r: Any, write: Callable[[str], None]) -> str:
        text = ""
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, event: lines
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return text
            try:
                event = json.loads(data)
            except ValueError:
                raise ChatError(f"the server sent an event that is not JSON: {data[:200]}") from None
            if "error" in event:
                err = event["error"]
                raise ChatError(f"the server failed: {err.get('message', err) if isinstance(err, dict) else err}")
            piece = ((event.get("choices") or [{}])[0].get("delta") or {}).get("content") or ""
            if piece:
                write(piece)
                text += piece
        raise ChatError("the answer was cut off (the stream ended without [DONE])")


def _loopback(url: str) -> bool:
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _error_of(r: Any) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return (r.text or r.reason_phrase or "").strip()[:300]


class Terminal:
    def __init__(self, stdin: TextIO, stdout: TextIO):
        self.stdin, self.out = stdin, stdout
        tty = bool(getattr(stdout, "isatty", lambda: False)())
        self.styled = tty and os.environ.get("TERM") != "dumb"
        self.use_input = stdin is sys.stdin and stdout is sys.stdout and stdin.isatty()
        if self.use_input:
            try:
                import readline  # noqa: F401  (line editing and this session's history for input())
            except ImportError:
                pass

    def read(self) -> str:
        if self.use_input:
            return input(YOU)
        self.write(YOU)
        line = self.stdin.readline()
        if not line:
            raise EOFError
        if not self.stdin.isatty():  # no terminal echoed it: show it, for a readable transcript
            self.write(line if line.endswith("\n") else line + "\n")
        return line.rstrip("\n")

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def note(self, text: str) -> None:
        self.write(f"\033[2m{text}\033[0m\n" if self.styled else text + "\n")


def _exchange(model: Any, term: Terminal, turns: list[str], message: str) -> list[str]:
    """Send ``message`` after ``turns``; the conversation afterwards (unchanged if nothing came back)."""
    history, dropped = list(turns), 0
    started = [False]

    def write(piece: str) -> None:
        if not started[0]:
            started[0] = True
            if dropped:
                term.note(f"(forgot the oldest {dropped} turns to fit the model's source length, sft.src_length)")
            term.write(MODEL)
        term.write(piece)

    while True:
        try:
            answer = model.reply(history + [message], write)
            if not started[0]:  # an empty answer
                write("")
            term.write("\n")
            return history + [message, answer]
        except TooLong as err:
            if not history:
                term.note(f"message not sent, it is too long for the model: {err}")
                return turns
            history, dropped = history[2:], dropped + 2  # the oldest exchange: its user and assistant turns
        except ChatError as err:
            term.write(("\n" if started[0] else "") + f"error: {err}\n")
            return turns
        except KeyboardInterrupt:
            term.write("\n" if started[0] else "")
            term.note("(answer stopped; this exchange is forgotten)")
            return turns


def run_chat(engine: Any = None, url: str | None = None, api_key: str | None = None,
             max_tokens: int | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None,
             model: str | None = None) -> int:
    """The chat loop on ``engine`` (in process) or the server at ``url``; the exit code.
    ``stdin``/``stdout``: the process's (when the call is made) unless given."""
    if (engine is None) == (url is None):
        raise ValueError("run_chat: give either an engine or a url")
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    term = Terminal(stdin, stdout)
    try:
        if max_tokens is not None and max_tokens < 1:
            raise Fatal(f"--max-tokens {max_tokens}: an answer needs 1 token or more")
        if engine is not None:
            backend: Any = LocalModel(engine, max_tokens)
        else:
            backend = RemoteModel(url, api_key, max_tokens, model)
            backend.start()
    except Fatal as err:
        print(f"llamapipe chat: {err}", file=sys.stderr if stdout is sys.stdout else stdout, flush=True)
        return 2
    except KeyboardInterrupt:  # while reaching the server
        return 130
    try:
        return _loop(backend, term)
    finally:
        if isinstance(backend, RemoteModel):
            backend.http.close()


def _loop(backend: Any, term: Terminal) -> int:
    term.note(f"chatting with {backend.describe()}. /help lists the commands; /quit or Ctrl-D leaves.")
    turns: list[str] = []
    while True:
        try:
            line = term.read()
        except (EOFError, KeyboardInterrupt):
            term.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        command = text.split()[0].lower() if text.startswith("/") else ""
        if command in ("/quit", "/exit"):
            return 0
        if command == "/reset":
            turns = []
            term.note("(conversation forgotten)")
        elif command == "/help":
            term.write(HELP + "\n")
        elif command:
            term.note(f"unknown command {command}; /help lists them")
        else:
            turns = _exchange(backend, term, turns, text)


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """``--url``, ``--api-key-env``, ``--max-tokens``: what ``run_chat`` takes from the command line."""
    parser.add_argument("--url", default=None,
                        help="a running `llamapipe serve` (e.g. http://127.0.0.1:8000); needed on target npu")
    parser.add_argument("--api-key-env", default=API_KEY_ENV, metavar="NAME",
                        help=f"environment variable with the server's bearer token (default {API_KEY_ENV}; "
                             "unset: none sent)")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N",
                        help="longest answer in tokens (default predict.max_new_tokens)")


def main(argv: list[str] | None = None) -> int:
    """``python -m llamapipe.serving.chat``: chat without the project's config (``llamapipe chat``
    reads it); in process on ``--inference DIR`` with predict's default settings, or ``--url``."""
    p = argparse.ArgumentParser(prog="python -m llamapipe.serving.chat",
                                description="chat with the exported model, in process or through llamapipe serve")
    p.add_argument("--inference", default="results/inference", metavar="DIR", help="the exported model directory")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of the in-process engine")
    add_chat_arguments(p)
    a = p.parse_args(argv)
    if a.url:
        return run_chat(url=a.url, api_key=os.environ.get(a.api_key_env) or None, max_tokens=a.max_tokens)
    if not os.path.isfile(os.path.join(a.inference, "export_config.json")):
        print(f"llamapipe chat: {a.inference} holds no exported model (no export_config.json): run `make run` "
              "first, or give --inference DIR or --url", file=sys.stderr)
        return 2
    from llamapipe.core.paddle_env import prepare

    prepare(a.threads)
    from llamapipe.serving.engine import LocalEngine

    print(f"loading {a.inference} ...", file=sys.stderr, flush=True)
    try:
        engine = LocalEngine(a.inference, {}, threads=a.threads)
    except KeyboardInterrupt:
        return 130
    return run_chat(engine=engine, max_tokens=a.max_tokens)


if __name__ == "__main__":
    sys.exit(main())
