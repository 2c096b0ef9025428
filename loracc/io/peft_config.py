"""adapter_config.json: every LoraConfig field of peft up to 0.21, typed, with its merge behaviour.

Each known field is in :data:`FIELDS` with the behaviour loracc gives it at merge time. Unknown
fields are kept and reported; a truthy unknown field written by a newer peft than loracc knows is
refused, because it may be a LoRA variant that changes the delta. Target matching and the
rank/alpha pattern lookup reproduce peft 0.21 exactly (see docs/FORMATS.md for the history).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeGuard

import regex

from loracc.errors import ConfigError
from loracc.io.inputs import read_json

__all__ = [
    "FIELDS",
    "KNOWN_PEFT",
    "LoraConfig",
    "is_targeted",
    "layer_index",
    "match_pattern",
    "pattern_overlap_notes",
    "read_config",
    "resolve_pattern",
]

KNOWN_PEFT = (0, 21)

# field -> what loracc does with it at merge time
FIELDS: Mapping[str, str] = {
    "peft_type": "must be LORA",
    "task_type": "metadata; SEQ_CLS/TOKEN_CLS/QUESTION_ANS heads arrive as saved tensors",
    "auto_mapping": "metadata",
    "base_model_name_or_path": "metadata",
    "revision": "metadata",
    "peft_version": "metadata; decides how unknown fields are treated",
    "inference_mode": "metadata",
    "r": "default rank; the applied rank is read from tensor shapes",
    "lora_alpha": "applied: scale = alpha/r (alpha/sqrt(r) with use_rslora)",
    "target_modules": "cross-checked against the saved keys (the keys are the ground truth)",
    "exclude_modules": "cross-checked against the saved keys",
    "lora_dropout": "ignored: training only",
    "fan_in_fan_out": "`true` makes a square weight `conv1d` when the architecture table does "
    "not know the base (Layer layouts); otherwise ignored",
    "bias": "applied: saved biases replace the base biases",
    "use_rslora": "applied: scale = alpha/sqrt(r)",
    "modules_to_save": "applied: saved copies replace the base tensors",
    "init_lora_weights": "applied: pissa/olora residuals reconstructed; non-reproducible inits "
    "need --initial-adapter",
    "layers_to_transform": "cross-checked against the saved keys",
    "layers_pattern": "cross-checked against the saved keys",
    "rank_pattern": "rank read from shapes; cross-checked",
    "alpha_pattern": "applied per module, first matching key in file order (as peft loads it)",
    "megatron_config": "same maths as nn.Linear; applied",
    "megatron_core": "metadata",
    "trainable_token_indices": "applied: rows replaced",
    "loftq_config": "initialisation only",
    "eva_config": "initialisation only",
    "corda_config": "initialisation only",
    "lora_ga_config": "initialisation only",
    "use_dora": "applied: DoRA magnitude folded",
    "layer_replication": "applied: layers materialized and renumbered (more than 4x the base's "
    "layers needs `merge --allow-large-replication`)",
    "runtime_config": "ignored: never saved by peft",
    "lora_bias": "applied: bias += scale * lora_B.bias",
    "use_qalora": "applied when the factors are dense (nn.Linear); refused on GPTQ shapes",
    "qalora_group_size": "read with use_qalora",
    "target_parameters": "applied: parameter deltas, experts split as peft does",
    "alora_invocation_tokens": "refused: aLoRA is active only after the invocation tokens, so no "
    "merged weight is equivalent",
    "arrow_config": "refused: Arrow routes per token between adapters, so no merged weight is "
    "equivalent",
    "ensure_weight_tying": "applied: tied embedding edits kept tied or untied as the forward needs",
    "use_bdlora": "applied: block-diagonal factors expanded",
    "velora_config": "training only",
    "monteclora_config": "training only",
    "kasa_config": "applied: lora_diag folded into lora_B; the base's r smallest singular "
    "components dropped (reconstruct-residual, fp32 SVD as peft's load); nn.Linear only",
}


def _is_bool(v: object) -> bool:
    return isinstance(v, bool)


def _is_str_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    """A finite JSON number that a float holds (Python's json reads NaN, Infinity and ints of
    any length; each would reach the merge as a NaN or an OverflowError)."""
    if not isinstance(v, int | float) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int past the float range
        return False


_CHECKS: Mapping[str, tuple[Callable[[object], bool], str]] = {
    "r": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "lora_alpha": (_is_num, "a finite number"),
    "target_modules": (
        lambda v: v is None or isinstance(v, str) or _is_str_list(v),
        "null, a string or a list of strings",
    ),
    "exclude_modules": (
        lambda v: v is None or isinstance(v, str) or _is_str_list(v),
        "null, a string or a list of strings",
    ),
    "bias": (lambda v: v in ("none", "all", "lora_only"), "'none', 'all' or 'lora_only'"),
    "use_rslora": (_is_bool, "true or false"),
    "use_dora": (_is_bool, "true or false"),
    "lora_bias": (_is_bool, "true or false"),
    "modules_to_save": (lambda v: v is None or _is_str_list(v), "null or a list of strings"),
    "init_lora_weights": (lambda v: isinstance(v, bool | str), "a boolean or a string"),
    "layers_to_transform": (
        lambda v: v is None or _is_int(v) or (isinstance(v, list) and all(map(_is_int, v))),
        "null, an integer or a list of integers",
    ),
    "layers_pattern": (
        lambda v: v is None or isinstance(v, str) or _is_str_list(v),
        "null, a string or a list of strings",
    ),
    "rank_pattern": (
        lambda v: (
            v is None or (isinstance(v, dict) and all(_is_int(x) and x > 0 for x in v.values()))
        ),
        "an object of positive integers",
    ),
    "alpha_pattern": (
        lambda v: v is None or (isinstance(v, dict) and all(map(_is_num, v.values()))),
        "an object of finite numbers",
    ),
    "trainable_token_indices": (
        lambda v: (
            v is None
            or (isinstance(v, list) and all(map(_is_int, v)))
            or (
                isinstance(v, dict)
                and all(isinstance(x, list) and all(map(_is_int, x)) for x in v.values())
            )
        ),
        "null, a list of integers or an object of integer lists",
    ),
    "layer_replication": (
        lambda v: (
            v is None
            or (
                isinstance(v, list)
                and all(
                    isinstance(p, list)
                    and len(p) == 2
                    and all(map(_is_int, p))
                    and 0 <= p[0] < p[1]
                    for p in v
                )
            )
        ),
        "null or a list of [start, end) pairs with 0 <= start < end",
    ),
    "target_parameters": (lambda v: v is None or _is_str_list(v), "null or a list of strings"),
    "kasa_config": (lambda v: v is None or isinstance(v, dict), "null or an object"),
}

_DEFAULTS: Mapping[str, Any] = {
    "r": 8,
    "lora_alpha": 8,
    "bias": "none",
    "use_rslora": False,
    "use_dora": False,
    "lora_bias": False,
    "init_lora_weights": True,
    "fan_in_fan_out": False,
}

# Fields of peft versions before 0.21 that loracc reads, and the old fused-qkv MergedLinear.
_LEGACY: Mapping[str, str] = {
    "merge_weights": "ignored: pre-0.3 training flag",
    "enable_lora": "refused: peft < 0.3 MergedLinear adapters are not supported",
}


def _version(text: object) -> tuple[int, ...] | None:
    """(major, minor, patch) of a version string; a part of more than 9 digits is no version."""
    if not isinstance(text, str):
        return None
    parts = re.findall(r"\d+", text)[:3]
    if any(len(p) > 9 for p in parts):
        raise ValueError(f"peft_version {text[:20]!r}... is not a version")
    return tuple(int(p) for p in parts) if parts else None


@dataclass(frozen=True, slots=True)
class LoraConfig:
    """The checked adapter_config.json: ``fields`` holds every key as written, defaults filled."""

    path: Path
    fields: Mapping[str, Any]
    unknown: tuple[str, ...]
    refusals: tuple[str, ...]

    def __getitem__(self, key: str) -> Any:
        """The field as written, else its default (None without one); a name that is no
        LoraConfig field is a KeyError, so a misspelt key in loracc cannot read as unset."""
        if key in self.fields:
            return self.fields[key]
        if key not in FIELDS and key not in _LEGACY:
            raise KeyError(f"{key!r} is not a LoraConfig field")
        return _DEFAULTS.get(key)

    @property
    def init(self) -> str:
        """init_lora_weights as a lower-case string."""
        return str(self["init_lora_weights"]).lower()


def read_config(path: Path) -> LoraConfig:
    """Read and check adapter_config.json; raise ConfigError naming the first bad key."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a JSON object")
    peft_type = data.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ConfigError(f"{path}: peft_type is {peft_type!r}; loracc reads LoRA adapters only")
    for key, (check, expected) in _CHECKS.items():
        if key in data and not check(data[key]):
            raise ConfigError(f"{path}: '{key}' must be {expected}, got {data[key]!r}")
    for key, entry, built in _regexes(data):
        try:  # valid for peft (re) and for the matcher (regex)
            re.compile(built)
            regex.compile(built)
        except (re.error, regex.error, RecursionError, OverflowError) as e:
            raise ConfigError(
                f"{path}: '{key}' entry {entry!r} is not a valid regular expression ({e})"
            ) from e
    refusals: list[str] = []
    try:
        version = _version(data.get("peft_version"))
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from e
    newer = version is not None and version[:2] > KNOWN_PEFT
    unknown = tuple(k for k in data if k not in FIELDS and k not in _LEGACY)
    for key in unknown:
        if newer and data[key] not in (None, False, 0, "", [], {}):
            refusals.append(
                f"'{key}' = {data[key]!r} comes from peft {data['peft_version']}, newer than "
                f"loracc knows ({KNOWN_PEFT[0]}.{KNOWN_PEFT[1]}); it may change the merge"
            )
    for key in ("alora_invocation_tokens", "arrow_config", "enable_lora"):
        if data.get(key):
            refusals.append(f"'{key}': {FIELDS.get(key) or _LEGACY[key]}")
    return LoraConfig(path, dict(data), unknown, tuple(refusals))


def _regexes(data: Mapping[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(field, entry, the regex built from it) for every config entry used as a regex, built
    exactly as :func:`resolve_pattern`, :func:`layer_index` and :func:`is_targeted` build them."""
    for key in ("target_modules", "exclude_modules"):
        if isinstance(data.get(key), str):
            yield key, data[key], data[key]
    for key in ("rank_pattern", "alpha_pattern"):
        for k in data.get(key) or {}:
            yield key, k, rf"(.*\.)?({k})$"
    layers = data.get("layers_pattern")
    for p in [layers] if isinstance(layers, str) else layers or []:
        yield "layers_pattern", p, rf"(?:^|.*?\.){p}\.(\d+)\."
    for m in data.get("modules_to_save") or []:
        yield "modules_to_save", m, rf"(^|.*\.){m}($|\..*)"


# Patterns are user input matched against every module name: a catastrophic pattern such as
# "(.|.)+(?!)" would otherwise backtrack for hours. The regex package keeps Python's syntax and
# semantics (PEFT matches with re) and stops a match at a deadline; see docs/FORMATS.md.
PATTERN_TIMEOUT_S = 1.0


def match_pattern(
    how: Literal["match", "fullmatch"], pattern: str, name: str, field: str, path: object = ""
) -> regex.Match[str] | None:
    """``re.match``/``re.fullmatch(pattern, name)``, or a ConfigError naming ``field`` when the
    match runs past :data:`PATTERN_TIMEOUT_S`."""
    try:
        return getattr(regex, how)(pattern, name, timeout=PATTERN_TIMEOUT_S)
    except TimeoutError as e:
        where = f"{path}: " if path else ""
        raise ConfigError(
            f"{where}'{field}' pattern {pattern!r} took over {PATTERN_TIMEOUT_S:g}s to match "
            f"'{name}' (catastrophic backtracking); simplify it"
        ) from e


def resolve_pattern(
    patterns: Mapping[str, Any] | None,
    name: str,
    default: Any,
    field: str = "alpha_pattern",
    path: object = "",
) -> Any:
    """peft >= 0.15: the first key K (in file order) with ``re.match(r"(.*\\.)?(K)$", name)``."""
    for key, value in (patterns or {}).items():
        if match_pattern("match", rf"(.*\.)?({key})$", name, field, path):
            return value
    return default


def _matching_pattern_keys(cfg: LoraConfig, field_name: str, name: str) -> list[str]:
    """Every key of ``field_name`` that matches ``name``, in file order (peft uses the first)."""
    return [
        key
        for key in cfg[field_name] or {}
        if resolve_pattern({key: True}, name, False, field_name, cfg.path)
    ]


def pattern_overlap_notes(cfg: LoraConfig, name: str, rank: int) -> list[str]:
    """A note for each of rank_pattern / alpha_pattern where several keys with different values
    match module ``name``.

    peft takes the first matching key in its config's key order. At training that is the order
    the user wrote; ``save_pretrained`` writes the keys sorted and a reload follows the file, so
    the reload (and loracc, which follows the file as peft does) may pick another key than
    training did. The rank is read from the tensor shapes and is the trained one regardless; the
    trained alpha is not recorded anywhere in the file.
    """
    notes = []
    for field_name in ("rank_pattern", "alpha_pattern"):
        patterns = cfg[field_name] or {}
        keys = _matching_pattern_keys(cfg, field_name, name)
        if len({patterns[k] for k in keys}) < 2:
            continue
        listed = ", ".join(f"'{k}' ({patterns[k]})" for k in keys)
        head = f"{name}: {field_name} keys {listed} all match"
        if field_name == "rank_pattern":
            notes.append(
                f"{head}; rank {rank} is read from the tensor shapes (the trained rank), "
                f"whatever the key order; peft's reload takes '{keys[0]}' ({patterns[keys[0]]})"
            )
        else:
            notes.append(
                f"{head}; lora_alpha {patterns[keys[0]]} from '{keys[0]}' is used, the first in "
                "the file, as peft's reload picks it; training picked the first in the order the "
                "keys were written then, which peft does not save (it writes them sorted), so "
                "the trained alpha cannot be known from the file"
            )
    return notes


def layer_index(name: str, layers_pattern: str | list[str] | None, path: object = "") -> int | None:
    """The layer number peft's layers_to_transform filter reads from a module name."""
    if layers_pattern is None:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
        return int(m.group(1)) if m else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        m = match_pattern("match", rf"(?:^|.*?\.){pattern}\.(\d+)\.", name, "layers_pattern", path)
        if m:
            return int(m.group(1))
    return None


def is_targeted(name: str, cfg: LoraConfig) -> bool:
    """Whether peft 0.21 would put a LoRA layer on module ``name`` (see docs/FORMATS.md)."""
    exclude = cfg["exclude_modules"]
    if isinstance(exclude, str) and match_pattern(
        "fullmatch", exclude, name, "exclude_modules", cfg.path
    ):
        return False
    if isinstance(exclude, list) and any(name == e or name.endswith("." + e) for e in exclude):
        return False
    for m in cfg["modules_to_save"] or []:  # peft: re.match, not fullmatch
        if match_pattern("match", rf"(^|.*\.){m}($|\..*)", name, "modules_to_save", cfg.path):
            return False
    targets = cfg["target_modules"]
    if targets is None:
        return False
    if isinstance(targets, str):
        return match_pattern("fullmatch", targets, name, "target_modules", cfg.path) is not None
    if name in targets:
        return True
    if not any(name.endswith("." + t) for t in targets):
        return False
    layers = cfg["layers_to_transform"]
    if layers is None or layers == []:
        return True
    index = layer_index(name, cfg["layers_pattern"], cfg.path)
    wanted = [layers] if isinstance(layers, int) else layers
    return index is not None and index in wanted
