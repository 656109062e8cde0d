"""The `moebert` command line: choices, defaults in every help line, --version."""
import argparse

import pytest

import moebert
from moebert.cli import build_parser


def _subparsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_option_help_shows_its_default(command):
    sp = _subparsers()[command]
    formatter = sp._get_formatter()
    for a in sp._actions:
        if not a.option_strings or isinstance(a, argparse._HelpAction) or a.required:
            continue
        text = formatter._expand_help(a) if a.help else ""
        assert "default" in text, f"moebert {command} {a.option_strings[0]}: {text!r}"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"moebert {moebert.__version__}"


def test_router_choices_are_the_library_routers():
    from moebert.cli import ROUTERS
    from moebert_kernels.modules.routers import ROUTERS as LIBRARY_ROUTERS

    assert set(ROUTERS) == set(LIBRARY_ROUTERS)


@pytest.mark.parametrize("argv", [
    ["convert", "--model", "m", "--task", "sst2", "--output", "o", "--router", "learned"],
    ["finetune", "--model", "m", "--output", "o", "--task", "sst2", "--precision", "fp8"],
    ["evaluate", "--model", "m", "--task", "sst2", "--device", "tpu"],
    ["evaluate", "--model", "m", "--task", "sst2", "--device", "cuda:x"],
    ["demo", "--device", "gpu"],
])
def test_bad_choices_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_device_choices_accept_cuda_ordinals():
    from moebert.cli import DEVICES

    assert all(d in DEVICES for d in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"))
    assert build_parser().parse_args(["evaluate", "--model", "m", "--task", "sst2", "--device", "cuda:1"]).device \
        == "cuda:1"
