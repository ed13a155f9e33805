"""One command-line vocabulary for devicemem and bayesdream-ext (devicemem.cliargs): the same
spelling and help for the same concept, help text and a shown default for every option, old
spellings kept as deprecated aliases, logs on stderr and results on stdout."""

from __future__ import annotations

import argparse
import json

import pytest

from bayesDREAM_ext import cli as ext_cli
from devicemem import cli as dm_cli
from devicemem.cliargs import HelpFormatter

PLAN = ["--cells", "50", "--features", "20", "--groups", "2", "--max-memory", "cpu=2GB"]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (choices,) = [action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return dict(choices)


def every_command() -> dict[str, argparse.ArgumentParser]:
    found = {f"bayesdream-ext {name}": sub for name, sub in subcommands(ext_cli.build_parser()).items()}
    found |= {f"devicemem {name}": sub for name, sub in subcommands(dm_cli.build_parser()).items() if name != "plan"}
    return found


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {string: action for action in parser._actions for string in action.option_strings}


@pytest.mark.parametrize("command", sorted(every_command()))
def test_every_option_has_help_and_shows_its_default(command):
    parser = every_command()[command]
    formatter = HelpFormatter(command)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        shown = formatter._get_help_string(action)
        assert action.help, f"{command} {action.option_strings}: no help"
        flag, required = action.nargs == 0, action.required or not action.option_strings
        assert flag or required or "default" in shown, f"{command} {action.option_strings}: no default shown in {shown!r}"
    assert "(default:" in parser.format_help()


@pytest.mark.parametrize("command", sorted(every_command()))
def test_the_shared_concepts_have_one_spelling(command):
    found = options(every_command()[command])
    assert {"-q", "--quiet", "-v", "--verbose"} <= set(found)
    reference = options(every_command()["bayesdream-ext fit-technical"])
    for name in ("--max-memory", "--device", "--safety-factor", "--num-samples", "--threads", "--json", "--assume", "-q", "-v"):
        if name in found and name in reference and name not in ("--num-samples", "--threads"):
            assert found[name].help == reference[name].help, f"{command} {name}"
    if "--nsamples" in found or "--samples" in found:
        assert "--num-samples" in found


def test_which_commands_take_which_shared_options():
    commands = every_command()
    has = lambda name: sorted(c for c, p in commands.items() if name in options(p))  # noqa: E731
    ext = "bayesdream-ext "
    assert has("--num-samples") == [ext + c for c in ("demo", "fit-technical", "plan", "plan-predictive")]
    assert has("--json") == [ext + "plan", ext + "plan-predictive", ext + "summary", "devicemem info"]
    assert has("--assume") == [ext + "plan", ext + "plan-predictive"]
    assert has("--threads") == [ext + c for c in ("demo", "fit-technical", "plan", "plan-predictive")]
    assert has("--max-memory") == [ext + c for c in ("demo", "fit-technical", "plan", "plan-predictive")] + ["devicemem info"]


@pytest.mark.parametrize("argv, dest, value, old", [
    (["fit-technical", "--counts", "c", "--group-col", "g", "--out", "o", "--nsamples", "7"], "num_samples", 7, "--nsamples"),
    (["plan-predictive", *PLAN, "--samples", "9"], "num_samples", 9, "--samples"),
    (["plan", *PLAN, "--nsamples", "11"], "num_samples", 11, "--nsamples"),
])
def test_old_spellings_still_work_and_say_they_are_deprecated(capsys, argv, dest, value, old):
    args = ext_cli.build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    assert f"warning: {old} is deprecated, use --num-samples" in capsys.readouterr().err
    assert old not in subcommands(ext_cli.build_parser())[argv[0]].format_help()  # hidden from the help


def test_verbosity_before_or_after_the_command():
    parser = ext_cli.build_parser()
    assert parser.parse_args(["-q", "plan", *PLAN]).quiet and parser.parse_args(["plan", *PLAN, "-q"]).quiet
    assert not parser.parse_args(["plan", *PLAN]).quiet
    assert parser.parse_args(["plan", *PLAN, "-v"]).verbose == 1 and parser.parse_args(["-v", "plan", *PLAN]).verbose == 1
    assert dm_cli.build_parser().parse_args(["info", "-v"]).verbose == 1


def test_logs_go_to_stderr_results_to_stdout_and_quiet_keeps_only_warnings(capsys):
    assert ext_cli.main(["plan-predictive", *PLAN, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["num_samples"] == 1000 and "[MEMORY] Will use" in err
    assert ext_cli.main(["plan-predictive", *PLAN, "-q"]) == 0
    out, err = capsys.readouterr()
    assert "batches" in out and "[MEMORY]" not in err + out
    assert ext_cli.main(["-q", "plan", *PLAN]) == 0
    assert "[MEMORY]" not in capsys.readouterr().err


def test_devicemem_plan_still_forwards_with_its_old_spelling(capsys):
    assert dm_cli.main(["plan", *PLAN, "--samples", "5", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["num_samples"] == 5
    assert "devicemem plan is deprecated" in err and "--samples is deprecated, use --num-samples" in err
