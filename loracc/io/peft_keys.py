"""The names in a PEFT adapter folder, as peft 0.21's ``save_pretrained`` writes them.

The one description of the grammar both directions use: :mod:`loracc.io.peft` parses saved keys
with :data:`KEY` and :func:`unwrap`; :mod:`loracc.io.peft_writer` builds them with the functions
below. A saved key is ``base_model.model.<module>.<suffix>``:

=========================================  ===============================================
suffix                                     tensor
=========================================  ===============================================
``lora_A.weight`` / ``lora_B.weight``      the factors of a Linear, Conv1D, conv or parameter
``lora_B.bias``                            ``lora_bias=True``
``lora_embedding_A`` / ``lora_embedding_B``  the factors of an Embedding
``lora_magnitude_vector[.weight]``         DoRA's magnitude
``lora_diag``                              KaSA's singular values
``token_adapter.trainable_tokens_delta``   trainable-token rows
=========================================  ===============================================

A whole tensor saved for ``modules_to_save`` (or a trained bias) keeps its base name with the
wrapper's infix (``base_layer``, ``modules_to_save.default``, ``original_module``).
"""

from __future__ import annotations

import re
from collections.abc import Collection

__all__ = [
    "BASE_LAYER",
    "CONFIG_NAME",
    "KEY",
    "PICKLE_NAME",
    "PREFIX",
    "WEIGHTS_NAME",
    "factor_keys",
    "lora_bias_key",
    "magnitude_key",
    "saved_key",
    "token_rows_key",
    "unprefixed",
    "unwrap",
    "whole_tensor_key",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"  # never read: loracc does not unpickle
PREFIX = "base_model.model."
# The infix peft's LoRA wrapper puts between a module's path and its base layer's tensors.
BASE_LAYER = ".base_layer"
_WRAPPERS = (f"{BASE_LAYER}.", ".modules_to_save.default.", ".original_module.", ".token_adapter.")

KEY = re.compile(
    r"^(?P<module>.+?)\.(?:"
    r"lora_(?P<ab>[AB])\.weight"
    r"|lora_B\.(?P<bias>bias)"
    r"|lora_embedding_(?P<emb>[AB])"
    r"|(?P<mag>lora_magnitude_vector)(?:\.weight)?"
    r"|(?P<diag>lora_diag)"
    r"|token_adapter\.(?P<tok>trainable_tokens_delta)"
    r"|(?P<extra>lora_velora_embed|lora_monteclora_sampler\..+)"
    r")$"
)


def unprefixed(key: str) -> str:
    """A saved key without peft's ``base_model.model.`` prefix (the module path and suffix)."""
    return key.removeprefix(PREFIX)


def saved_key(name: str) -> str:
    """The saved key of ``name`` (a module path and suffix)."""
    return PREFIX + name


def unwrap(name: str) -> str:
    """The base tensor a saved whole-tensor name (``unprefixed``) stands for."""
    for infix in _WRAPPERS:
        name = name.replace(infix, ".")
    return name


def factor_keys(module: str, *, embedding: bool) -> tuple[str, str]:
    """The saved keys of ``module``'s lora_A and lora_B."""
    if embedding:
        return saved_key(f"{module}.lora_embedding_A"), saved_key(f"{module}.lora_embedding_B")
    return saved_key(f"{module}.lora_A.weight"), saved_key(f"{module}.lora_B.weight")


def lora_bias_key(module: str) -> str:
    """The saved key of ``module``'s ``lora_B.bias``."""
    return saved_key(f"{module}.lora_B.bias")


def magnitude_key(module: str) -> str:
    """The saved key of ``module``'s DoRA magnitude, as peft 0.21 saves it."""
    return saved_key(f"{module}.lora_magnitude_vector")


def token_rows_key(module: str) -> str:
    """The saved key of ``module``'s trainable-token rows."""
    return saved_key(f"{module}.token_adapter.trainable_tokens_delta")


def whole_tensor_key(target: str, lora_modules: Collection[str]) -> str:
    """The saved key of base tensor ``target`` saved whole: under ``base_layer`` when its module
    is one of ``lora_modules`` (it then has a LoRA wrapper)."""
    module, _, param = target.rpartition(".")
    return saved_key(f"{module}{BASE_LAYER}.{param}" if module in lora_modules else target)
