"""Every snakemake command in README.md and docs/*.md runs as written (issue 20).

A command is a line of a fenced code block that starts with ``snakemake`` (after ``VAR=value``
assignments; a trailing ``# comment`` is dropped, a trailing backslash continues the line), or an
inline code span in the prose that does (`snakemake --profile profiles/slurm ...`, possibly broken
over two lines). Each one is dry-run in a fresh copy of the project, verbatim but for a ``-n``
inserted after ``snakemake``. The npu target dry-runs without hardware; what a command needs from
outside the project is provided, and listed here:

- ``LLAMAPIPE_PADDLENLP_SRC=<relative path>``: a stand-in PaddleNLP checkout at that path
  (``fake_checkout``); the test's own environment never leaks such a variable into a command;
- a file named by a command and shipped in the repository (``npu-guide-pins.yaml``) is copied in;
  one the reader is told to write (``my.yaml``) is written from ``READER_FILES``;
- ``--report FILE`` renders results that a dry-run never makes: the option is left out and the
  rest of the command dry-run (tests/test_pipeline_e2e.py builds the report for real);
- a template (``...`` or ``<placeholder>`` in it) is not a command: skipped, saying so.

The ``llamapipe plan`` lines of the fenced blocks run too (for real: the planner needs no cards).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, SNAKEMAKE, copy_project
from llamapipe.config import rehearsal
from test_rehearsal import fake_checkout

DOCS = ("README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")))
FENCE = re.compile(r"^\s*(```|~~~)")
SPAN = re.compile(r"`([^`]+)`")
PARAGRAPH = re.compile(r"(?:[^\n]*\S[^\n]*(?:\n|$))+")
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")
TEMPLATE = re.compile(r"\.\.\.|<[^>]*>")
DRY_RUN = {"-n", "--dry-run", "--dryrun"}

# Options that select a mode a dry-run cannot show, and why: left out, the rest is dry-run.
NOT_DRY_RUNNABLE = {
    "--report": "renders the finished results into HTML; before a run there is nothing to render "
                "(tests/test_pipeline_e2e.py builds results/report.html for real)",
}
# Files the docs tell the reader to write, as a reader might write them.
READER_FILES = {"my.yaml": "sft:\n  lora: true\n  learning_rate: 1.0e-3\n"}


@dataclass(frozen=True)
class Command:
    where: str  # "README.md:152"
    text: str  # as written, comments dropped and continuations joined
    env: tuple  # the leading VAR=value assignments, as (name, value)
    argv: tuple  # the program and its arguments
    inline: bool = False  # a code span in the prose, not a line of a fenced block


def parse(where: str, text: str, inline: bool = False) -> Command | None:
    """The command on ``text``, or None when it is not one (in prose, a bare `snakemake` is a name)."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote: prose, not a command
        return None
    if words[:1] == ["$"]:
        words = words[1:]
    as_written = shlex.join(words)
    env = []
    while words and ASSIGNMENT.fullmatch(words[0]):
        name, value = words.pop(0).split("=", 1)
        env.append((name, value))
    if len(words) < (2 if inline else 1):
        return None
    return Command(where, as_written, tuple(env), tuple(words), inline)


def commands_in(text: str, name: str) -> list:
    """Every command in a markdown file's fenced blocks and inline code spans, in order."""
    found, prose = [], []
    inside, start, pending = False, 0, []
    for no, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside, pending = not inside, []
            prose.append("")
            continue
        if not inside:
            prose.append(line)
            continue
        prose.append("")
        if not pending:
            start = no
        if line.rstrip().endswith("\\"):
            pending.append(line.rstrip()[:-1])
            continue
        cmd = parse(f"{name}:{start}", " ".join([*pending, line]))
        pending = []
        if cmd:
            found.append(cmd)
    outside = "\n".join(prose)
    for paragraph in PARAGRAPH.finditer(outside):  # a code span does not cross paragraphs
        for m in SPAN.finditer(paragraph.group()):
            line = outside.count("\n", 0, paragraph.start() + m.start()) + 1
            cmd = parse(f"{name}:{line}", m.group(1).replace("\n", " "), inline=True)
            if cmd:
                found.append(cmd)
    return sorted(found, key=lambda c: int(c.where.rsplit(":", 1)[1]))


def is_snakemake(cmd: Command) -> bool:
    return Path(cmd.argv[0]).name == "snakemake"


def documented(program=is_snakemake) -> list:
    """The commands of README.md and docs/*.md; one per distinct command (the first place named)."""
    seen: dict = {}
    for name in DOCS:
        for cmd in commands_in((ROOT / name).read_text(), name):
            if program(cmd):
                key = (cmd.env, (Path(cmd.argv[0]).name, *cmd.argv[1:]))
                seen.setdefault(key, []).append(cmd)
    return [replace(cmds[0], where=", ".join(c.where for c in cmds)) for cmds in seen.values()]


SNAKEMAKE_COMMANDS = documented()
# Variables a documented command sets: only the command sets them (the test's own are dropped).
COMMAND_ENV = {rehearsal.CHECKOUT_ENV} | {name for cmd in SNAKEMAKE_COMMANDS for name, _ in cmd.env}


def dry_run_argv(cmd: Command) -> list:
    """The command's arguments with ``-n`` right after ``snakemake`` and non-run modes left out."""
    args = list(cmd.argv[1:])
    for option in NOT_DRY_RUNNABLE:
        if option in args:
            i = args.index(option)
            del args[i:i + (2 if i + 1 < len(args) and not args[i + 1].startswith("-") else 1)]
    return args if DRY_RUN & set(args) else ["-n", *args]


def provide(cmd: Command, project: Path) -> None:
    """What the command needs from outside the project (see the module docstring)."""
    for name, value in cmd.env:
        if name == rehearsal.CHECKOUT_ENV:
            assert not Path(value).is_absolute(), f"{cmd.where}: use a path relative to the project, not {value}"
            fake_checkout((project / value).resolve())
    for word in cmd.argv[1:]:
        if word in READER_FILES:
            (project / word).write_text(READER_FILES[word])
        elif shipped(word) and not (project / word).exists():
            shutil.copy2(ROOT / word, project / word)


def shipped(word: str) -> bool:
    """A file of the repository (not a run's output, not outside the project) that the copy lacks."""
    path = Path(word)
    return (not word.startswith("-") and not path.is_absolute() and ".." not in path.parts
            and path.parts[:1] not in (("results",), ("data",), (".cache",), (".snakemake",))
            and (ROOT / path).is_file())


def tail(proc: subprocess.CompletedProcess, lines: int = 25) -> str:
    """The end of each stream (Snakemake prints some errors on stdout, some on stderr)."""
    parts = []
    for name, text in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        kept = [ln for ln in (text or "").splitlines() if ln.strip()][-lines:]
        parts += [f"--- {name}:", *kept] if kept else []
    return "\n".join(parts)


def test_the_docs_commands_are_found():
    """A broken extraction would run nothing: the README's own commands must be among the found."""
    readme = [c for c in SNAKEMAKE_COMMANDS if "README.md:" in c.where]
    assert len(readme) >= 10, [c.text for c in readme]
    assert any({"results/metrics.json", "target=npu"} <= set(c.argv) for c in readme)  # the NPU run
    assert any(c.env for c in SNAKEMAKE_COMMANDS)  # the rehearsal with a given checkout


def test_the_extraction():
    md = "\n".join([
        "Run `snakemake --cores 2 --config",
        "target=npu` or `make run`; `snakemake` alone is a name, snakemake in prose is prose.",
        "```bash",
        "snakemake --cores 2 results/x.json   # a comment",
        "A=../B snakemake -n \\",
        "    --config 'sft={processes: 2}'",
        "tail -f log",
        "```",
        "```",
        "check  where  result",
        "```",
    ])
    got = [(c.where, c.env, c.argv) for c in commands_in(md, "X.md") if is_snakemake(c)]
    assert got == [
        ("X.md:1", (), ("snakemake", "--cores", "2", "--config", "target=npu")),
        ("X.md:4", (), ("snakemake", "--cores", "2", "results/x.json")),
        ("X.md:5", (("A", "../B"),), ("snakemake", "-n", "--config", "sft={processes: 2}")),
    ]
    cmd = Command("X.md:1", "", (), ("snakemake", "--report", "results/report.html", "--cores", "1"))
    assert dry_run_argv(cmd) == ["-n", "--cores", "1"]


@pytest.mark.parametrize("cmd", SNAKEMAKE_COMMANDS, ids=[c.where.split(",")[0] for c in SNAKEMAKE_COMMANDS])
def test_every_snakemake_command_in_the_docs_dry_runs_as_written(tmp_path, cmd):
    if TEMPLATE.search(cmd.text):
        pytest.skip(f"{cmd.where}: a template, not a command: {cmd.text}")
    project = copy_project(tmp_path / "project")
    provide(cmd, project)
    args = dry_run_argv(cmd)
    env = {k: v for k, v in os.environ.items() if k not in COMMAND_ENV}
    proc = subprocess.run([*SNAKEMAKE, *args], cwd=project, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONUNBUFFERED": "1", **dict(cmd.env)})
    left_out = [f"{o} ({why})" for o, why in NOT_DRY_RUNNABLE.items() if o in cmd.argv]
    if proc.returncode != 0:
        pytest.fail(f"{cmd.where}: `{cmd.text}` fails as a dry-run (exit {proc.returncode})\n"
                    f"ran: {shlex.join([*(f'{k}={v}' for k, v in cmd.env), 'snakemake', *args])}"
                    + (f"\nleft out: {'; '.join(left_out)}" if left_out else "") + f"\n{tail(proc)}", pytrace=False)


PLAN_COMMANDS = documented(lambda c: list(c.argv[:2]) == ["llamapipe", "plan"] and not c.inline)


@pytest.mark.parametrize("cmd", PLAN_COMMANDS, ids=[c.where.split(",")[0] for c in PLAN_COMMANDS])
def test_every_plan_command_in_the_docs_runs_anywhere(tmp_path, cmd):
    """``llamapipe plan`` needs no cards: the README shows it for planning before booking them."""
    proc = subprocess.run([PYTHON, "-m", "llamapipe", *cmd.argv[1:]], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 0 or "chosen: tp" not in proc.stdout:
        pytest.fail(f"{cmd.where}: `{cmd.text}` exits {proc.returncode}\n{tail(proc)}", pytrace=False)
