"""Run the code blocks of a Markdown file, and regenerate the command outputs it shows.

Every fenced ``bash`` / ``sh`` / ``shell`` / ``python`` block runs, each in a fresh temporary
folder (the repository on PYTHONPATH, this interpreter's bin/ first on PATH): bash with
``set -euo pipefail``, python as a script. A block fails when it exits non-zero. HTML comments
right before a block (blank lines may come between) change that, and show in the source:

``<!-- readme-test: skip (REASON) -->``
    never run the next block (a reason is required: a GPU, the network, a cluster).
``<!-- readme-test: slow (REASON) -->``
    the test-suite skips it (``check --slow`` runs it); ``update`` runs it.
``<!-- readme-test: setup NAME -->``
    first run ``NAME()`` from tests/readme_setups.py in the block's folder: it writes the
    files the block reads; for python blocks, the names it returns are defined.
``<!-- readme-output: COMMAND -->`` (optionally ``readme-output (machine-dependent[: why]): ...``)
    the next block (any language, or none) shows COMMAND's stdout, after an optional first
    line ``$ ...`` (kept as written). ``update`` replaces it with what COMMAND prints now; the check runs
    COMMAND and compares line by line with numbers and byte sizes masked and counted words
    in the singular (so another machine's figures pass, a changed line does not);
    machine-dependent ones only have to run.

    python -m tests.readme_snippets check README.md     # exit 1 when a block fails
    python -m tests.readme_snippets update README.md    # rewrite the shown outputs

The test-suite (tests/test_readme.py) runs README.md's blocks once the file holds the line
``<!-- readme-test: on -->``.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNNABLE = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
TIMEOUT_S = 300
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*readme-(test|output)(\s*\(machine-dependent(?::[^)]*)?\))?\s*:\s*(.*?)\s*-->\s*$")
SIZE = re.compile(r"-?\d+(?:\.\d+)?\s*(?:[KMGT]i?B|B)\b")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?")
COUNTED = re.compile(r"(#\s+)([A-Za-z]+)")


@dataclass(frozen=True)
class Block:
    """One fenced block: ``start`` / ``end`` are the 0-based lines of its opening and closing
    fences; ``skip`` the reason given never to run it, ``slow`` the reason the test-suite
    skips it; ``setup`` a tests/readme_setups.py function;
    ``output_of`` the command whose output it shows (``machine_dependent``: only run it)."""

    language: str
    code: str
    start: int
    end: int
    skip: str | None = None
    slow: str | None = None
    setup: str | None = None
    output_of: str | None = None
    machine_dependent: bool = False

    @property
    def runnable(self) -> bool:
        return self.output_of is not None or self.language in RUNNABLE

    @property
    def name(self) -> str:
        what = self.language or "text" if self.output_of is None else f"output of {self.output_of}"
        return f"line {self.start + 1} ({what})"


def _markers(lines: list[str], start: int) -> dict[str, str | bool]:
    """The readme-test / readme-output markers just above line ``start``."""
    found: dict[str, str | bool] = {}
    i = start - 1
    while i >= 0 and (not lines[i].strip() or MARKER.match(lines[i])):
        match = MARKER.match(lines[i])
        i -= 1
        if match is None:
            continue
        kind, machine, text = match.groups()
        if kind == "output":
            found.setdefault("output_of", text)
            found.setdefault("machine_dependent", bool(machine))
        elif text.split(" ")[0] in ("skip", "slow"):
            word = text.split(" ")[0]
            reason = text.removeprefix(word).strip().strip("()").strip()
            if not reason:
                raise ValueError(f"line {i + 2}: readme-test: {word} needs a reason, e.g. {word} (needs a GPU)")
            found.setdefault(word, reason)
        elif text.startswith("setup "):
            found.setdefault("setup", text.removeprefix("setup ").strip())
        elif text != "on":
            raise ValueError(f"line {i + 2}: unknown marker readme-test: {text!r}; expected skip (REASON), slow (REASON), setup NAME or on")
    return found


def enabled(text: str) -> bool:
    """Whether the file opts in to being tested (a ``<!-- readme-test: on -->`` line)."""
    return re.search(r"^\s*<!--\s*readme-test:\s*on\s*-->\s*$", text, re.MULTILINE) is not None


def parse(text: str) -> list[Block]:
    """Every fenced block of ``text`` with the markers above it."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, language = opening.groups()
        closing = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = next((j for j in range(i + 1, len(lines)) if closing.match(lines[j])), None)
        if end is None:
            raise ValueError(f"line {i + 1}: the block opened here is never closed")
        blocks.append(Block(language.lower(), "\n".join(lines[i + 1 : end]) + "\n", i, end, **_markers(lines, i)))
        i = end + 1
    return blocks


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["MPLBACKEND"] = "Agg"
    return env


def _run(command: list[str], folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=folder, env=_environment(), capture_output=True, text=True, timeout=TIMEOUT_S)


def _script(block: Block) -> str:
    """A python block as a script, preceded by its setup's names."""
    if block.setup is None:
        return block.code
    return f"from tests.readme_setups import {block.setup} as _setup\nglobals().update(_setup() or {{}})\ndel _setup\n{block.code}"


def _prepare(block: Block, folder: Path) -> None:
    """Run the block's setup in ``folder`` (python blocks run it themselves, for its names)."""
    if block.setup is None or (block.language in ("python", "py") and block.output_of is None):
        return
    done = _run([sys.executable, "-c", f"from tests.readme_setups import {block.setup}; {block.setup}()"], folder)
    if done.returncode != 0:
        raise AssertionError(f"{block.name}: setup {block.setup} failed:\n{done.stderr[-3000:]}")


def execute(block: Block) -> subprocess.CompletedProcess[str]:
    """Run ``block`` (its command, for an output block) in a fresh temporary folder."""
    with tempfile.TemporaryDirectory(prefix="readme-") as name:
        folder = Path(name)
        _prepare(block, folder)
        if block.output_of is not None:
            return _run(["bash", "-euo", "pipefail", "-c", block.output_of], folder)
        if RUNNABLE[block.language] == "bash":
            return _run(["bash", "-euo", "pipefail", "-c", block.code], folder)
        (folder / "snippet.py").write_text(_script(block))
        return _run([sys.executable, "snippet.py"], folder)


def _singular(match: re.Match[str]) -> str:
    """The word after a number without a plural ending: "2 batches" and "1 batch" compare equal."""
    word = match.group(2)
    word = word[:-1] if word.endswith("s") else word
    return match.group(1) + (word[:-1] if word.endswith("e") else word)


def masked(text: str) -> list[str]:
    """``text``'s non-blank lines with byte sizes and numbers replaced by placeholders, and the
    word after a number in the singular."""
    lines = [NUMBER.sub("#", SIZE.sub("<size>", line)).rstrip() for line in text.splitlines() if line.strip()]
    return [COUNTED.sub(_singular, line) for line in lines]


def shown_output(block: Block) -> str:
    """The output a block shows, without its ``$ COMMAND`` line."""
    first, _, rest = block.code.partition("\n")
    return rest if first.startswith("$ ") else block.code


def check(block: Block) -> None:
    """AssertionError saying what went wrong when ``block`` fails to run, or when it shows
    output that its command no longer prints (numbers and sizes aside)."""
    done = execute(block)
    if done.returncode != 0:
        raise AssertionError(
            f"{block.name} exited {done.returncode}:\n{block.output_of or block.code}\n--- stdout ---\n"
            f"{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-3000:]}"
        )
    if block.output_of is None or block.machine_dependent:
        return
    shown, now = masked(shown_output(block)), masked(done.stdout)
    if shown != now:
        diff = "\n".join(difflib.unified_diff(shown, now, "README", block.output_of, lineterm=""))
        raise AssertionError(f"{block.name}: the shown output is stale (regenerate with `make readme`):\n{diff}")


def update(path: Path) -> int:
    """Rewrite every output block of ``path`` with its command's stdout now; returns how many."""
    lines = path.read_text().splitlines()
    targets = [block for block in parse("\n".join(lines)) if block.output_of is not None and block.skip is None]
    for block in reversed(targets):
        done = execute(block)
        if done.returncode != 0:
            raise SystemExit(f"{path}:{block.start + 1}: `{block.output_of}` exited {done.returncode}:\n{done.stderr[-2000:]}")
        prompt = block.code.splitlines()[:1] if block.code.startswith("$ ") else []
        lines[block.start + 1 : block.end] = prompt + done.stdout.rstrip("\n").splitlines()
    path.write_text("\n".join(lines) + "\n")
    return len(targets)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.readme_snippets", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("check", "update"), help="check: run every block; update: rewrite the shown outputs")
    parser.add_argument("path", nargs="?", default=str(REPO / "README.md"), help="the Markdown file (default: README.md)")
    parser.add_argument("--slow", action="store_true", help="check: also run the blocks marked slow")
    args = parser.parse_intermixed_args(argv)
    path = Path(args.path)
    if args.action == "update":
        print(f"{path}: {update(path)} output block(s) regenerated")
        return 0
    failed = 0
    for block in filter(lambda b: b.runnable, parse(path.read_text())):
        reason = block.skip or (None if args.slow else block.slow)
        if reason is not None:
            print(f"SKIP {block.name}: {reason}")
            continue
        try:
            check(block)
            print(f"ok   {block.name}")
        except (AssertionError, subprocess.TimeoutExpired) as exc:
            failed += 1
            print(f"FAIL {block.name}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
