"""The docs match the code.

- docs/API.md is what tools/gen_api_docs.py makes from the protos (also `make lint`).
- Every `cwm ...` command in a code block of README.md or docs/*.md parses with the real
  argument parser; blocks marked `<!-- exercised by tests/test_docs.py -->` run for real
  against a real manager, and every other documented subcommand is run by the test named
  in EXERCISED_ELSEWHERE (checked to mention it).
- The configuration table in docs/OPERATIONS.md lists every setting with its env and flag.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cwm_client import WindowClient
from cwm_server.cli.main import build_parser
from cwm_server.manager.config import ServerOptions
from cwm_server.settings.loading import load
from cwm_server.settings.serve import manager_config
from cwm_server.settings.table import SETTINGS
from tests.helpers import FINGERPRINT, ROOT, synthetic_chunks, token_ids
from tests.ops_helpers import OpsManager

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = "<!-- exercised by tests/test_docs.py -->"
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
PLACEHOLDERS = {"SECONDS": "60", "N": "1"}
SEPARATORS = {"&", "&&", "|", "||", ";", ">", ">>", "2>", "<"}
COMMAND = re.compile(r"(?:^|(?<=[;&|(]\s)|(?<=--\s)|(?<=[;&|]))\s*(?:\S*/)?cwm\s+([a-z].*)$")

# Subcommands documented but run by other tests (each file must mention the subcommand).
EXERCISED_ELSEWHERE = {
    "serve": "tests/test_config.py",
    "agent": "cwm_server/cli/demo_cmd.py",  # `cwm demo` (tests/e2e/test_demo.py) starts two
    "agents": "tests/e2e/test_agent_freeze_thaw.py",
    "sessions": "tests/e2e/test_agent_freeze_thaw.py",
    "freeze": "tests/e2e/test_agent_freeze_thaw.py",
    "thaw": "tests/e2e/test_agent_freeze_thaw.py",
    "mcp": "tests/e2e/test_mcp.py",
    "demo": "tests/e2e/test_demo.py",
    "export": "tests/client/test_archive.py",
    "import": "tests/client/test_archive.py",
    "fsck": "tests/test_fsck.py",
    "auth": "tests/manager/rpc/test_auth.py",
}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    text: str
    exercised: bool


def code_blocks(path: Path) -> Iterator[Block]:
    lines = path.read_text().splitlines()
    index = 0
    while index < len(lines):
        fence = lines[index].strip()
        if fence.startswith("```"):
            lang = fence[3:].strip().split(" ")[0]
            start = index
            body: list[str] = []
            index += 1
            while index < len(lines) and lines[index].strip() != "```":
                body.append(lines[index])
                index += 1
            previous = lines[start - 1].strip() if start else ""
            yield Block(path, start + 1, lang, "\n".join(body), previous == MARK)
        index += 1


def shell_lines(text: str) -> Iterator[str]:
    """Logical lines of a shell block (backslash continuations joined)."""
    pending = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield (pending + line).strip()
        pending = ""


def cwm_commands(block: Block) -> Iterator[list[str]]:
    for line in shell_lines(block.text):
        line = line.removeprefix("$ ")
        match = COMMAND.search(line)
        if match is not None:
            yield _tokens(match.group(1))


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


SUBCOMMANDS = set(_subparsers(build_parser()))
INLINE = re.compile(r"`(?:\S*/)?cwm ([a-z][^`]*)`")


def _tokens(command: str) -> list[str]:
    tokens = []
    for token in shlex.split(command, comments=True):
        if token in SEPARATORS:
            break
        token = token.strip("[]")
        tokens.append(PLACEHOLDERS.get(token, token))
    return tokens


def all_commands() -> list[tuple[str, list[str], bool]]:
    """(where, argv after `cwm`, exercised) for every command in a shell block or in an
    inline code span of the prose."""
    found = []
    for path in DOCS:
        for block in code_blocks(path):
            if block.lang not in SHELL_LANGS:
                continue
            for tokens in cwm_commands(block):
                where = f"{path.relative_to(ROOT)}:{block.line}"
                found.append((where, tokens, block.exercised))
        prose = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
        for match in INLINE.finditer(prose):
            tokens = _tokens(match.group(1))
            # In prose, `cwm <word> ...` is a command only when <word> is one (a log line
            # such as `cwm connector (worker) ...` is not).
            if tokens and tokens[0] in SUBCOMMANDS:
                found.append((f"{path.relative_to(ROOT)} (inline)", tokens, False))
    return found


def _check_mention(parser: argparse.ArgumentParser, tokens: list[str]) -> str:
    """An inline mention such as `cwm thaw` or `cwm fsck --data-dir DIR` names a command
    and maybe some of its options, not a whole command line: check that those exist."""
    rest = list(tokens)
    while rest and rest[0] in _subparsers(parser):
        parser = _subparsers(parser)[rest.pop(0)]
    if parser.prog == "cwm":
        return f"no command {tokens[0]!r}"
    for token in rest:
        option = token.split("=", 1)[0]
        if option.startswith("-") and option not in parser._option_string_actions:
            return f"{parser.prog} has no option {option}"
    return ""


def test_api_reference_is_fresh() -> None:
    proto_python = ROOT / ".venv-proto" / "bin" / "python"
    if not proto_python.exists():
        pytest.skip("needs .venv-proto (make proto); `make lint` checks this too")
    done = subprocess.run(
        [str(proto_python), "tools/gen_api_docs.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_every_documented_command_parses() -> None:
    commands = all_commands()
    assert len(commands) > 30, "the extractor found suspiciously few commands"
    parser = build_parser()
    failures = []
    for where, tokens, _ in commands:
        if where.endswith("(inline)"):
            problem = _check_mention(parser, tokens)
            if problem:
                failures.append(f"{where}: cwm {shlex.join(tokens)}: {problem}")
            continue
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                parser.parse_args(tokens)
        except SystemExit:
            failures.append(f"{where}: cwm {shlex.join(tokens)}")
    assert not failures, "commands in the docs that do not parse:\n" + "\n".join(failures)


def test_every_documented_subcommand_is_exercised() -> None:
    documented = {tokens[0] for _, tokens, _ in all_commands()}
    run_here = {tokens[0] for _, tokens, exercised in all_commands() if exercised}
    missing = []
    for sub in sorted(documented - run_here):
        test_file = EXERCISED_ELSEWHERE.get(sub)
        if test_file is None or f'"{sub}"' not in (ROOT / test_file).read_text():
            missing.append(sub)
    assert not missing, f"documented but never run by a test: {missing}"


def test_configuration_table_lists_every_setting() -> None:
    text = (ROOT / "docs" / "OPERATIONS.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in text.splitlines() if "| `" in line}
    for setting in SETTINGS:
        row = rows.get(setting.key)
        assert row is not None, f"{setting.key} is missing from the table in OPERATIONS.md"
        assert f"`{setting.env}`" in row and f"`{setting.flag}`" in row, row


def test_toml_examples_are_valid_configs(tmp_path: Path) -> None:
    blocks = [b for path in DOCS for b in code_blocks(path) if b.lang == "toml"]
    configs = [b for b in blocks if "[serve]" in b.text or "[client]" in b.text]
    assert configs, "no config example in the docs"
    for block in configs:
        path = tmp_path / f"example-{block.line}.toml"
        path.write_text(block.text)
        effective = load({}, str(path), environ={})
        assert not effective.ignored, f"{block.path.name}:{block.line}: {effective.ignored}"
        manager_config(effective)


@pytest.fixture
def docs_manager(tmp_path: Path) -> Iterator[OpsManager]:
    running = OpsManager(tmp_path / "data", ServerOptions(metrics_listen="127.0.0.1:0"))
    with WindowClient(running.target) as client:
        client.freeze(
            "my-window", synthetic_chunks(600), fingerprint=FINGERPRINT, token_ids=token_ids(600)
        )
    yield running
    running.stop()


def test_exercised_blocks_run(docs_manager: OpsManager, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CWM_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        CWM_MANAGER=docs_manager.target,
        CWM_METRICS=f"127.0.0.1:{docs_manager.server.metrics_port}",
        CWM_DATA_DIR=str(docs_manager.config.data_dir),
        XDG_CONFIG_HOME=str(tmp_path / "no-config"),
    )
    blocks = [b for path in DOCS for b in code_blocks(path) if b.exercised]
    assert len(blocks) >= 6
    for block in blocks:
        where = f"{block.path.relative_to(ROOT)}:{block.line}"
        if block.lang == "python":
            _run_python(block.text, docs_manager.target)
            continue
        assert block.lang in SHELL_LANGS, where
        workdir = tmp_path / f"block-{block.line}"
        workdir.mkdir()
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block.text],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"{where} failed:\n{block.text}\n{done.stdout}{done.stderr}"
    with WindowClient(docs_manager.target) as client:
        # The shell blocks cleaned up after themselves; the Python one left its window.
        assert [w.name for w in client.list()] == ["my-window", "python-window"]


def _run_python(source: str, target: str) -> None:
    """The USER_GUIDE snippet, with `kv` shaped as its fingerprint says (32 layers, 8 KV
    heads of 128, bf16 words) for 64 tokens, and the test manager's address."""
    tokens = 64
    kv = np.random.default_rng(0).integers(
        0, 1 << 16, size=(2, 32, tokens, 8 * 128), dtype=np.uint16
    )
    code = source.replace("127.0.0.1:50051", target).replace('"my-window"', '"python-window"')
    namespace = {"kv": kv, "ids": token_ids(tokens)}
    exec(compile(code, "USER_GUIDE.md", "exec"), namespace)
