"""Architecture records, one module per family (``llama``, ``qwen``, ``deepseek``), and the role table.

``ARCHITECTURES`` maps config.json's ``model_type`` to its :class:`Architecture` record. Adding a
Llama-like architecture is one record in its family's module (plus name rows in ``roles.ROLES`` if
its tensor names are new); exporters and calibration look everything up here.
"""

from __future__ import annotations

from ..errors import UnsupportedError
from . import deepseek, llama, qwen
from .base import AWQ_DENSE, Architecture, AwqGroup, TensorRef
from .roles import ROLE_INFO, ROLE_NAMES, ROLES, Role, RoleInfo, hf_name, module_path

#: Every supported architecture, by config.json ``model_type``.
ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (*llama.RECORDS, *qwen.RECORDS, *deepseek.RECORDS)}


def get_architecture(config: dict, source: str = "config.json") -> Architecture:
    """The record for ``config["model_type"]``.

    Raises UnsupportedError naming ``source`` when the key is missing or the type is not supported.
    """
    model_type = config.get("model_type")
    if not model_type:
        raise UnsupportedError(f"{source}: no `model_type`; is this a Hugging Face causal-LM checkpoint?")
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedError(
            f"{source}: architecture `{model_type}` is not supported; supported: {', '.join(ARCHITECTURES)}"
        ) from None


__all__ = [
    "ARCHITECTURES", "AWQ_DENSE", "Architecture", "AwqGroup", "ROLES", "ROLE_INFO", "ROLE_NAMES", "Role", "RoleInfo",
    "TensorRef", "get_architecture", "hf_name", "module_path",
]
