"""The README's code blocks run (tests/readme_snippets.py), and the harness itself is tested on
tests/readme_fixture.md: blocks run, markers are honoured, a broken or stale block fails."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.readme_snippets import REPO, check, enabled, main, masked, parse, update

FIXTURE = Path(__file__).with_name("readme_fixture.md")
README = REPO / "README.md"


def _readme_blocks() -> list:
    text = README.read_text()
    if not enabled(text):
        return [pytest.param(None, marks=pytest.mark.skip(reason="README.md has no <!-- readme-test: on --> line: its blocks are not tested"))]
    return [
        pytest.param(block, id=f"README.md:{block.start + 1}",
                     marks=[pytest.mark.skip(reason=block.skip or block.slow)] if block.skip or block.slow else [])
        for block in parse(text) if block.runnable
    ]


@pytest.mark.parametrize("block", _readme_blocks())
def test_readme_block(block):
    check(block)


def test_fixture_blocks_and_their_markers():
    blocks = parse(FIXTURE.read_text())
    runnable = [b for b in blocks if b.runnable]
    assert [b.language for b in blocks] == ["bash", "python", "bash", "bash", "sh", "", "", ""]
    assert len(runnable) == 7
    assert [b.setup for b in blocks[:3]] == [None, "technical", "technical"]
    assert blocks[3].skip == "needs a cluster" and blocks[4].slow == "takes minutes"
    assert blocks[5].output_of.startswith("python -c") and not blocks[5].machine_dependent
    assert blocks[6].machine_dependent and not blocks[7].runnable


def test_fixture_blocks_pass():
    for block in parse(FIXTURE.read_text()):
        if block.runnable and not (block.skip or block.slow):
            check(block)


@pytest.mark.parametrize("old, new, problem", [
    ('test "$(cat out.txt)" = hello', 'test "$(cat out.txt)" = bye', "exited 1"),
    ("assert counts.shape == (60, 12)", "assert counts.shape == (61, 12)", "AssertionError"),
    ("head -1 cells.csv | grep -q cell_line", "head -1 cells.csv | grep -q lane", "exited 1"),
    ("peak 99.00 GB in 7 batches", "peak 99.00 GB in 7 chunks", "stale"),
    ("done\n```", "done\nfinished\n```", "stale"),
])
def test_a_broken_or_stale_block_fails(tmp_path, old, new, problem):
    text = FIXTURE.read_text()
    assert old in text
    changed = [b for a, b in zip(parse(text), parse(text.replace(old, new))) if a.code != b.code]
    assert len(changed) == 1
    with pytest.raises(AssertionError, match=problem):
        check(changed[0])


def test_numbers_and_sizes_are_masked_words_are_not():
    assert masked("peak 12.50 MB in 3 batches\n\n") == masked("peak 1.2 GB in 30 batches") == ["peak <size> in # batch"]
    assert masked("3 batches") != masked("3 chunks")
    assert masked("1 batch of 1 sample") == masked("2 batches of 2 samples")


def test_update_rewrites_the_outputs_and_nothing_else(tmp_path):
    copy = tmp_path / "README.md"
    shutil.copy(FIXTURE, copy)
    assert update(copy) == 2
    before, after = FIXTURE.read_text().splitlines(), copy.read_text().splitlines()
    output = parse(copy.read_text())[5]
    assert output.code == "$ python -c ...\npeak 12.50 MB in 3 batches\ndone\n"
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    assert len(before) == len(after) and len(changed) == 2  # the figures line and the pid
    assert main(["check", str(copy)]) == 0


def test_check_exits_1_on_a_failing_block_and_runs_slow_ones_when_asked(tmp_path, capsys):
    copy = tmp_path / "README.md"
    copy.write_text(FIXTURE.read_text().replace("exit 4", "true"))
    assert main(["check", str(copy)]) == 0
    assert main(["check", "--slow", str(copy)]) == 0
    copy.write_text(FIXTURE.read_text())
    assert main(["check", "--slow", str(copy)]) == 1
    assert "FAIL line" in capsys.readouterr().out


def test_a_machine_dependent_output_may_say_why():
    (block,) = parse("<!-- readme-output (machine-dependent: timings): echo 1 -->\n```\n2\n```\n")
    assert block.machine_dependent and block.output_of == "echo 1" and block.runnable


@pytest.mark.parametrize("text, message", [
    ("<!-- readme-test: skip -->\n```bash\ntrue\n```\n", "skip needs a reason"),
    ("<!-- readme-test: sometimes -->\n```bash\ntrue\n```\n", "unknown marker"),
    ("```bash\ntrue\n", "never closed"),
])
def test_bad_markers_and_fences_are_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse(text)
