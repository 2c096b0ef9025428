"""The layout of each adapted base tensor, decided by a fixed order and never guessed.

For a 2-D weight (``linear`` (out, in) or ``conv1d`` (in, out)) and a 3-D fused expert parameter
(``experts-out-in`` or ``experts-in-out``), the first rule that applies decides:

1. ``--layout MODULE_PATTERN=LAYOUT``, the user's choice;
2. the architecture table (:mod:`loracc.arch`), by ``config.json``'s ``model_type``;
3. for 2-D weights of a base the table does not know (no ``model_type``, or remote code): the
   shape when only one reading fits, else ``fan_in_fan_out: true`` for ``conv1d`` (peft sets the
   flag for the last layer it wrapped, so it is trusted only when no site of the adapter is
   ``linear`` by its shape; ``false`` is peft's default and says nothing);
4. for 3-D parameters: the shape when only one reading fits (peft forbids ``fan_in_fan_out``);
5. otherwise a refusal naming the module, the two readings and the ``--layout`` to choose.

Each decision carries its reason (``Site.layout_source``), which ``inspect`` shows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loracc.arch import (
    Layout,
    architecture,
    expert_layout,
    has_conv1d,
    remote_code,
    weight_layout,
)
from loracc.errors import ConfigError, FormatError, UnsupportedError

__all__ = ["Decision", "LayoutChoice", "LayoutRule", "parse_layouts"]

_UNKNOWN = (
    "loracc's architecture table does not know the base (no config.json model_type, one "
    "transformers does not build, or remote code with fan_in_fan_out true)"
)
_READINGS = {
    Layout.LINEAR: "nn.Linear (out, in)",
    Layout.CONV1D: "Conv1D (in, out)",
    Layout.EXPERTS_OUT_IN: "experts (E, out, in)",
    Layout.EXPERTS_IN_OUT: "experts (E, in, out)",
}


@dataclass(frozen=True, slots=True)
class LayoutChoice:
    """One ``--layout PATTERN=LAYOUT``: PATTERN is a module path suffix or a full regex."""

    pattern: str
    layout: Layout

    def matches(self, module: str) -> bool:
        if module == self.pattern or module.endswith("." + self.pattern):
            return True
        try:
            return re.fullmatch(self.pattern, module) is not None
        except re.error:
            return False

    def __str__(self) -> str:
        return f"--layout {self.pattern}={self.layout.value}"


def parse_layouts(
    specs: Iterable[str] | Mapping[str, str] | None,
) -> tuple[LayoutChoice, ...]:
    """``--layout`` values (``"PATTERN=LAYOUT"`` strings, or a {pattern: layout} mapping)."""
    if specs is None:
        return ()
    pairs: list[tuple[str, str]] = []
    if isinstance(specs, Mapping):
        pairs = [(str(k), str(v)) for k, v in specs.items()]
    else:
        for spec in specs:
            pattern, sep, value = str(spec).rpartition("=")
            if not sep or not pattern:
                raise ConfigError(f"--layout '{spec}': expected MODULE_PATTERN=LAYOUT")
            pairs.append((pattern, value))
    names = ", ".join(v.value for v in Layout)
    out = []
    for pattern, value in pairs:
        try:
            layout = Layout(value.strip().lower())
        except ValueError:
            raise ConfigError(
                f"--layout '{pattern}={value}': the layout must be one of {names}"
            ) from None
        out.append(LayoutChoice(pattern.strip(), layout))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Decision:
    """A layout and why it was chosen."""

    layout: Layout
    source: str


def _fits(shape: tuple[int, ...], readings: Mapping[Layout, tuple[int, ...]]) -> list[Layout]:
    return [layout for layout, want in readings.items() if tuple(shape) == want]


@dataclass
class LayoutRule:
    """The decision order for one adapter over one base (docs/FORMATS.md "Layer layouts").

    Attributes:
        config: the base's config.json (empty without one).
        fan_in_fan_out: adapter_config.json's flag, None when the file lacks it.
        choices: the ``--layout`` values.
        where: the adapter, for messages.
    """

    config: Mapping[str, Any]
    fan_in_fan_out: bool | None
    choices: Sequence[LayoutChoice] = ()
    where: str = ""
    used: set[LayoutChoice] = field(default_factory=set)
    by_shape: dict[Layout, str] = field(default_factory=dict)  # layout -> a module it decided
    by_flag: list[str] = field(default_factory=list)

    def _choice(self, module: str, readings: Iterable[Layout]) -> Decision | None:
        for choice in self.choices:
            if choice.layout in readings and choice.matches(module):
                self.used.add(choice)
                return Decision(choice.layout, str(choice))
        return None

    def _check_fits(self, module: str, d: Decision, fitting: list[Layout], shape: object) -> None:
        if d.layout not in fitting:
            raise FormatError(
                f"{self.where}: '{module}': {d.source} says {_READINGS[d.layout]}, but the "
                f"factors do not fit the base shape {shape} read that way"
            )

    def weight(self, module: str, shape: tuple[int, ...], logical: tuple[int, int]) -> Decision:
        """The layout of ``module``'s 2-D base weight ``shape`` for factors giving (out, in)."""
        readings = {Layout.LINEAR: logical, Layout.CONV1D: logical[::-1]}
        fitting = _fits(shape, readings)
        decided = self._choice(module, readings)
        if decided is not None:
            self._check_fits(module, decided, fitting, shape)
            return decided
        known = weight_layout(self.config, module)
        if self.fan_in_fan_out and remote_code(self.config) and not has_conv1d(self.config):
            known = None  # peft wrapped a Conv1D the table cannot place: remote code
        if known is not None and known in fitting:
            return Decision(known, f"architecture {architecture(self.config)}")
        if len(fitting) == 1:
            self.by_shape.setdefault(fitting[0], module)
            why = "" if known is None else f" (not the {known.value} of its architecture)"
            return Decision(fitting[0], "shape" + why)
        if not fitting:  # the caller reports the mismatch
            return Decision(Layout.LINEAR, "shape")
        if self.fan_in_fan_out:
            self.by_flag.append(module)
            return Decision(Layout.CONV1D, f"fan_in_fan_out=true ({_UNKNOWN})")
        flag = "is false (peft's default" if self.fan_in_fan_out is False else "is absent ("
        raise self._ambiguous(
            module,
            shape,
            (Layout.LINEAR, Layout.CONV1D),
            f"{_UNKNOWN}, and adapter_config.json's fan_in_fan_out {flag}, no evidence of either)",
        )

    def unbased(self, module: str) -> Decision:
        """The layout of a 2-D weight read without a base: ``--layout``, else the flag."""
        decided = self._choice(module, (Layout.LINEAR, Layout.CONV1D))
        if decided is not None:
            return decided
        layout = Layout.CONV1D if self.fan_in_fan_out else Layout.LINEAR
        flag = "absent" if self.fan_in_fan_out is None else str(self.fan_in_fan_out).lower()
        return Decision(layout, f"fan_in_fan_out={flag} (no base)")

    def experts(self, module: str, shape: tuple[int, ...], fan_in: int, fan_out: int) -> Decision:
        """The layout of a fused 3-D expert parameter ``shape`` for factors (in, out)."""
        E = shape[0]
        readings = {
            Layout.EXPERTS_OUT_IN: (E, fan_out, fan_in),
            Layout.EXPERTS_IN_OUT: (E, fan_in, fan_out),
        }
        fitting = _fits(shape, readings)
        decided = self._choice(module, readings)
        if decided is not None:
            self._check_fits(module, decided, fitting, shape)
            return decided
        known = expert_layout(self.config)
        if known is not None and known[1] in fitting:
            return Decision(known[1], f"architecture {known[0]}")
        if len(fitting) == 1:
            return Decision(fitting[0], "shape")
        if not fitting:
            raise FormatError(f"{self.where}: '{module}': factors fit no reading of {shape}")
        model_type = architecture(self.config)
        why = (
            f"config.json model_type '{model_type}' is not in loracc's expert table"
            if model_type
            else _UNKNOWN
        )
        raise self._ambiguous(module, shape, (Layout.EXPERTS_OUT_IN, Layout.EXPERTS_IN_OUT), why)

    def _ambiguous(
        self, module: str, shape: tuple[int, ...], options: tuple[Layout, Layout], why: str
    ) -> UnsupportedError:
        leaf = module.rsplit(".", 1)[-1]
        return UnsupportedError(
            f"{self.where}: '{module}': base shape {shape} reads as {_READINGS[options[0]]} "
            f"or {_READINGS[options[1]]} and {why}; choose with --layout "
            f"{leaf}={options[0].value} or --layout {leaf}={options[1].value}"
        )

    def finish(self) -> None:
        """Refuse a flag other sites contradict, and ``--layout`` values that matched nothing."""
        if self.by_flag and Layout.LINEAR in self.by_shape:
            module = self.by_flag[0]
            leaf = module.rsplit(".", 1)[-1]
            raise UnsupportedError(
                f"{self.where}: '{module}': square weight, {_UNKNOWN}; fan_in_fan_out=true says "
                f"Conv1D (in, out), but '{self.by_shape[Layout.LINEAR]}' is nn.Linear by its "
                "shape, so the model mixes both and the flag (peft saves the value of the last "
                f"layer it wrapped) cannot decide; choose with --layout {leaf}=linear or "
                f"--layout {leaf}=conv1d"
            )
        unused = [c for c in self.choices if c not in self.used]
        if unused:
            raise ConfigError(f"{unused[0]}: matches no adapted module of {self.where}")
