"""Recipes: which format each tensor gets. Presets plus TOML files with per-role and per-name overrides.

A recipe TOML::

    base = "int4"                 # start from a preset (optional)
    default = "int4_asym_g128"    # format for linear weights not otherwise named
    fallback = "keep"             # when a shape does not fit the format: "keep" or a format name

    [roles]                       # by role (attn_q, mla_kv_b, expert_up, ...) or group
    lm_head = "int8_g32"          # (attention, mla, mlp, experts, shared_experts, lm_head, mtp)
    mla_kv_b = "keep"

    [[override]]                  # by name: glob, or "re:" + regex; later entries win
    pattern = "model.layers.0.*"
    format = "int8_g32"

Norms, biases, the MoE router and embeddings are never quantized: their bytes are negligible and
quantizing them costs accuracy (DeepSeek-V3 ships its router and embeddings in bf16 too).
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from .archs import ROLE_INFO, Role, TensorRef
from .errors import RecipeError
from .formats import FORMATS
from .paths import require_regular_file
from .sandbox import compile_user_regex, search_user_regex
from .schema import check_recipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KEEP = "keep"
# Kinds that stay in their source dtype whatever a recipe says.
NEVER_QUANTIZED_KINDS = ("norm", "bias", "router", "embedding")
_GROUPS = sorted({i.group for i in ROLE_INFO.values()})
# Roles and groups a recipe may not quantize (every member is of a never-quantized kind).
_NEVER_QUANTIZED_KEYS = {r.value for r, i in ROLE_INFO.items() if i.kind in NEVER_QUANTIZED_KINDS} | {
    g for g in _GROUPS if all(i.kind in NEVER_QUANTIZED_KINDS for i in ROLE_INFO.values() if i.group == g)
}


@dataclass(frozen=True)
class Recipe:
    name: str
    default: str
    roles: dict[str, str] = field(default_factory=dict)
    overrides: tuple[tuple[str, str], ...] = ()
    fallback: str = KEEP
    description: str = ""

    def map_formats(self, fn: Callable[[str], str]) -> Recipe:
        """This recipe with every format name it chooses (default, roles, overrides) replaced by ``fn(name)``;
        ``keep`` and ``fallback`` stay as they are."""
        def swap(fmt: str) -> str:
            return fmt if fmt == KEEP else fn(fmt)

        return replace(self, default=swap(self.default), roles={k: swap(v) for k, v in self.roles.items()},
                       overrides=tuple((p, swap(f)) for p, f in self.overrides))

    def format_for(self, ref: TensorRef) -> str:
        """The format name (or ``keep``) this recipe asks for one mapped tensor."""
        info = ref.info
        if info.kind in NEVER_QUANTIZED_KINDS:
            return KEEP
        choice = self.roles.get(ref.role.value, self.roles.get(info.group, self.default))
        for pattern, fmt in self.overrides:
            if _matches(pattern, ref.name):
                choice = fmt
        return choice


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        # A user regex: run with a timeout (catastrophic backtracking is refused, not a hang).
        return search_user_regex(pattern[3:], name, f"recipe override `{pattern}`")
    return fnmatch.fnmatchcase(name, pattern)


# lm_head stays in 16-bit by default: it is one tensor, and the last projection before the logits is
# where low-bit error shows most (llama.cpp keeps output.weight at Q6_K or better for the same reason).
PRESETS: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "int4",
            "int4_sym_g32",
            {"lm_head": KEEP},
            description="4-bit symmetric, blocks of 32 (bit-exact with GGUF Q4_0); lm_head kept 16-bit",
        ),
        Recipe(
            "int8",
            "int8_g32",
            {"lm_head": KEEP},
            description="8-bit symmetric, blocks of 32 (bit-exact with GGUF Q8_0); lm_head kept 16-bit",
        ),
        Recipe(
            "fp8",
            "fp8_b128",
            {"lm_head": KEEP},
            description="FP8 E4M3 with a float32 scale per 128x128 block (DeepSeek-V3 layout)",
        ),
    )
}

_KNOWN_KEYS = {"name", "base", "default", "fallback", "roles", "override", "description"}


def _check_format(value: str, where: str) -> str:
    if value != KEEP and value not in FORMATS:
        raise RecipeError(f"{where}: unknown format {value!r}; use `keep` or one of: {', '.join(FORMATS)}")
    return value


def load_recipe(spec: str) -> Recipe:
    """A preset name or a path to a recipe TOML."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise RecipeError(f"recipe {spec!r}: not a preset ({', '.join(PRESETS)}) and no such file")
    try:
        if path.stat().st_size > 1024 * 1024:
            raise RecipeError(f"{path}: larger than 1 MB; not a recipe")
        data = tomllib.loads(require_regular_file(path, "recipe ").read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not valid TOML ({' '.join(str(e).split())[:200]})") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply; not a recipe") from None
    # Types first (a list where a string goes is one clear error naming the key), then meaning.
    check_recipe(data, path, RecipeError)
    unknown = set(data) - _KNOWN_KEYS
    if unknown:
        raise RecipeError(
            f"{path}: unsupported recipe key `{sorted(unknown)[0]}`; known keys: {', '.join(sorted(_KNOWN_KEYS))}"
        )
    base_name = data.get("base")
    if base_name is not None and base_name not in PRESETS:
        raise RecipeError(f"{path}: base = {base_name!r} is not a preset ({', '.join(PRESETS)})")
    base = PRESETS[base_name] if base_name else None
    roles = dict(base.roles) if base else {}
    for key, value in (data.get("roles") or {}).items():
        if key not in {r.value for r in Role} and key not in _GROUPS:
            raise RecipeError(
                f"{path}: [roles] key `{key}` is neither a role nor a group; groups: {', '.join(_GROUPS)}"
            )
        roles[key] = _check_format(str(value), f"{path}: [roles] {key}")
        if roles[key] != KEEP and key in _NEVER_QUANTIZED_KEYS:
            raise RecipeError(
                f"{path}: [roles] {key} = {value!r}: {key} stays 16-bit in a dsq checkpoint (transformers and "
                "vLLM load norms, biases, routers and embeddings unquantized); GGUF export picks token_embd's type"
            )
    overrides = []
    for i, item in enumerate(data.get("override") or []):
        if not isinstance(item, dict) or set(item) != {"pattern", "format"}:
            raise RecipeError(f"{path}: [[override]] #{i + 1} needs exactly `pattern` and `format`")
        if item["pattern"].startswith("re:"):
            compile_user_regex(item["pattern"][3:], f"{path}: [[override]] #{i + 1}")
        overrides.append((item["pattern"], _check_format(item["format"], f"{path}: [[override]] #{i + 1}")))
    default = data.get("default") or (base.default if base else None)
    if not default:
        raise RecipeError(f"{path}: needs `default = \"<format>\"` or `base = \"<preset>\"`")
    return Recipe(
        name=str(data.get("name") or path.stem),
        default=_check_format(default, f"{path}: default"),
        roles=roles,
        overrides=tuple(overrides),
        fallback=_check_format(str(data.get("fallback", KEEP)), f"{path}: fallback"),
        description=str(data.get("description", "")),
    )
