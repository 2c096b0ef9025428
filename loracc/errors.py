"""One exception tree for loracc.

Every error names the file, key or module it is about and what was expected, in one line: the CLI
prints ``str(error)`` and maps the class to an exit code (see docs/ERRORS.md).
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "FormatError",
    "InputError",
    "LoraccError",
    "LoweringError",
    "NonFiniteError",
    "OutputError",
    "PassError",
    "Terminated",
    "UnsupportedError",
    "VerifyError",
    "printable",
    "shorten",
]


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped: controls, and the format characters
    (category Cf) that include the bidirectional overrides.

    Names come from input files; printed raw, a newline in a tensor key would start a line that
    looks like loracc's own output, and U+202E would reverse what follows it on screen.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(ord(c)) for c in text)


def _escape(code: int) -> str:
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def shorten(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for values quoted in messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class LoraccError(Exception):
    """Base of every error loracc raises on purpose."""

    exit_code: int = 2


class InputError(LoraccError):
    """An input file or folder is missing, unreadable or malformed."""


class ConfigError(InputError):
    """adapter_config.json or config.json has a wrong type, value or a field loracc refuses."""


class FormatError(InputError):
    """A safetensors or ONNX file is truncated, lies about offsets, or has bad shapes or dtypes."""


class NonFiniteError(InputError):
    """A merged tensor or an adapter tensor holds NaN or Inf, or a DoRA norm is zero."""


class UnsupportedError(LoraccError):
    """The input is valid but its merge or lowering is not equivalent to the adapted model."""


class OutputError(LoraccError):
    """The output path exists, is an input, or cannot be written."""


class VerifyError(LoraccError):
    """An IR invariant is broken; this is a loracc bug when it follows a pass."""

    exit_code = 1


class PassError(LoraccError):
    """A pass failed; the message names the pass and the passes that ran before it."""

    exit_code = 1


class LoweringError(LoraccError):
    """A site cannot be lowered to the requested target."""


class Terminated(KeyboardInterrupt):
    """SIGTERM while an output is written: cleans up as Ctrl-C does, exits 128 + 15."""

    exit_code = 143
