"""The names ``loracc combine`` accepts, without torch: the CLI lists them in ``--help``, which
must not import torch (:mod:`loracc.lower.combine` computes them)."""

from __future__ import annotations

from typing import Literal

__all__ = ["FACTOR_WISE", "METHODS", "PRUNING", "MajoritySign"]

# peft's methods loracc computes: the factor-wise family, cat, svd.
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # take --density
FACTOR_WISE = ("linear", *PRUNING)
METHODS = ("cat", "svd", *FACTOR_WISE)

MajoritySign = Literal["total", "frequency"]
