"""Option vocabulary shared by the `moebert` subcommands (cli, demo, study): one place, no import cycle."""
from __future__ import annotations

import argparse
import re

__all__ = ["ROUTERS", "PRECISIONS", "DEVICES", "DeviceChoices", "device_arg", "overwrite_arg"]

ROUTERS = ("hash", "balanced_hash", "token_gate", "sentence_gate")  # moebert_kernels' routers, paper default first
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


class DeviceChoices(tuple):
    """``auto``, ``cpu``, ``cuda`` and ``cuda:N`` (argparse checks membership with ``in``)."""

    def __new__(cls):
        return super().__new__(cls, ("auto", "cpu", "cuda", "cuda:N"))

    def __contains__(self, device) -> bool:
        return device in ("auto", "cpu", "cuda") or bool(re.fullmatch(r"cuda:\d+", str(device)))


DEVICES = DeviceChoices()


def device_arg(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--device", default=default, choices=DEVICES, metavar="{auto,cpu,cuda,cuda:N}",
                   help="where to run; auto picks cuda when there is one")


def overwrite_arg(p: argparse.ArgumentParser, what: str = "--output") -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"write over what {what} already holds (without it, an existing file or non-empty folder "
                        "is refused)")
