"""The ``loracc`` command line: parse, call :mod:`loracc.api`, map errors to exit codes.

Exit codes: 0 success, 1 regression or internal error, 2 bad input, refusal or usage.

:mod:`loracc.cli.common` holds what every command shares; the commands live in
:mod:`loracc.cli.hf` (merge, convert, compile, inspect), :mod:`loracc.cli.combine` (combine),
:mod:`loracc.cli.onnx` (export, pack) and :mod:`loracc.cli.golden` (golden, run).
Nothing in loracc imports this package.
"""

from __future__ import annotations

import click

from loracc.cli.combine import combine
from loracc.cli.common import LoraccGroup
from loracc.cli.golden import golden, run
from loracc.cli.hf import compile_, convert, inspect_, merge
from loracc.cli.onnx import export, pack

__all__ = ["main"]


@click.group(cls=LoraccGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="loracc")
def main(debug: bool) -> None:
    """loracc: compile PEFT LoRA adapters into merged checkpoints and ONNX models."""


for _command in (merge, convert, combine, compile_, inspect_, golden, run, export, pack):
    main.add_command(_command)
