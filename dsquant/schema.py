"""Structured input checked against a schema before dsq uses it: config.json, safetensors headers,
index files, recipe TOML.

Every field dsq reads is declared here with its type and range (pydantic v2 models, strict types:
``"256"`` or ``1e9`` is not an int, ``true`` is not a number), so a hostile or damaged file gives one
:class:`~dsquant.errors.InputError` naming the file and the key instead of a ``TypeError`` deep inside
an exporter, and an absurd hyperparameter (``num_hidden_layers: 1000000000``) is refused before
anything is sized from it. Fields dsq does not read are kept as they are (``extra="allow"``).

JSON is read as strict UTF-8, without ``NaN``/``Infinity`` literals, and at most ``MAX_DEPTH`` levels
deep (real configs are 4; a 100k-deep file would otherwise end in ``RecursionError``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from typing_extensions import TypedDict

from .errors import CorruptFileError, InputError

MAX_DEPTH = 64  # JSON/TOML nesting; config.json is ~4 deep, tokenizer.json ~5
MAX_CONFIG_BYTES = 16 * 1024 * 1024

# Upper bounds: an order of magnitude above the largest released models (DeepSeek-V3: 61 layers,
# hidden 7168, 256 experts, vocab 129280; Llama 3.1 405B: 126 layers, hidden 16384), so every real
# config passes and an absurd one is refused before a graph, a buffer or a loop is sized from it.
_LAYERS = Annotated[StrictInt, Field(ge=1, le=2048)]
_WIDTH = Annotated[StrictInt, Field(ge=1, le=1 << 20)]
_HEADS = Annotated[StrictInt, Field(ge=1, le=16384)]
_DIM = Annotated[StrictInt, Field(ge=1, le=65536)]
_COUNT0 = Annotated[StrictInt, Field(ge=0, le=1 << 20)]
_VOCAB = Annotated[StrictInt, Field(ge=1, le=1 << 24)]
_POSITIONS = Annotated[StrictInt, Field(ge=1, le=1 << 27)]
_TOKEN_ID = Annotated[StrictInt, Field(ge=0, le=1 << 24)]
_POS_FLOAT = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class QuantizationConfig(BaseModel):
    """The parts of ``quantization_config`` dsq reads (compressed-tensors or DeepSeek FP8)."""

    model_config = ConfigDict(extra="allow")
    quant_method: StrictStr | None = None
    format: StrictStr | None = None
    weight_block_size: Annotated[list[Annotated[StrictInt, Field(ge=1, le=65536)]], Field(min_length=2, max_length=2)] | None = None
    config_groups: dict[StrictStr, dict[StrictStr, Any]] | None = None
    ignore: list[StrictStr] | None = None


class ConfigSchema(BaseModel):
    """config.json: the hyperparameters dsq's architecture tables, exporters and runtimes read (types and
    ranges; ``dsquant.config.ModelConfig`` resolves them)."""

    model_config = ConfigDict(extra="allow")
    model_type: StrictStr | None = None
    hidden_size: _WIDTH | None = None
    intermediate_size: _WIDTH | None = None
    moe_intermediate_size: _WIDTH | None = None
    num_hidden_layers: _LAYERS | None = None
    num_attention_heads: _HEADS | None = None
    num_key_value_heads: _HEADS | None = None
    head_dim: _DIM | None = None
    vocab_size: _VOCAB | None = None
    max_position_embeddings: _POSITIONS | None = None
    rms_norm_eps: _POS_FLOAT | None = None
    rope_theta: _POS_FLOAT | None = None
    tie_word_embeddings: StrictBool | None = None
    hidden_act: StrictStr | None = None
    torch_dtype: StrictStr | None = None
    # MLA (DeepSeek-V2/V3)
    q_lora_rank: _DIM | None = None
    kv_lora_rank: _DIM | None = None
    qk_nope_head_dim: _DIM | None = None
    qk_rope_head_dim: _DIM | None = None
    v_head_dim: _DIM | None = None
    # MoE
    n_routed_experts: Annotated[StrictInt, Field(ge=1, le=65536)] | None = None
    num_experts: Annotated[StrictInt, Field(ge=0, le=65536)] | None = None  # Qwen-MoE
    num_local_experts: Annotated[StrictInt, Field(ge=0, le=65536)] | None = None  # transformers 5 Qwen3-MoE, Mixtral
    decoder_sparse_step: Annotated[StrictInt, Field(ge=1, le=2048)] | None = None
    mlp_only_layers: list[Annotated[StrictInt, Field(ge=0, le=2048)]] | None = None
    n_shared_experts: _COUNT0 | None = None
    num_experts_per_tok: Annotated[StrictInt, Field(ge=1, le=65536)] | None = None
    first_k_dense_replace: _COUNT0 | None = None
    n_group: Annotated[StrictInt, Field(ge=1, le=65536)] | None = None
    topk_group: Annotated[StrictInt, Field(ge=1, le=65536)] | None = None
    routed_scaling_factor: _POS_FLOAT | None = None
    scoring_func: StrictStr | None = None
    topk_method: StrictStr | None = None
    norm_topk_prob: StrictBool | None = None
    rope_scaling: dict[StrictStr, Any] | None = None
    rope_parameters: dict[StrictStr, Any] | None = None
    bos_token_id: _TOKEN_ID | None = None
    eos_token_id: _TOKEN_ID | list[_TOKEN_ID] | None = None
    quantization_config: QuantizationConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ConfigSchema:
        h, kv = self.num_attention_heads, self.num_key_value_heads
        if h and kv and h % kv:
            raise ValueError(f"num_attention_heads ({h}) is not a multiple of num_key_value_heads ({kv})")
        if self.num_experts_per_tok and self.n_routed_experts and self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts ({self.n_routed_experts})"
            )
        if self.first_k_dense_replace and self.num_hidden_layers and self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(
                f"first_k_dense_replace ({self.first_k_dense_replace}) exceeds num_hidden_layers ({self.num_hidden_layers})"
            )
        return self


class _TensorEntry(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    dtype: StrictStr
    shape: list[StrictInt]  # ranges and sizes against the file: safetensors_io.read_header
    data_offsets: Annotated[list[StrictInt], Field(min_length=2, max_length=2)]


# One validation call for the whole header (pydantic-core, in Rust): ~1 us per tensor entry.
_HEADER_ENTRIES = TypeAdapter(dict[StrictStr, _TensorEntry])


class _SafetensorsHeader(BaseModel):
    model_config = ConfigDict(extra="allow")
    metadata: dict[StrictStr, StrictStr] | None = Field(default=None, alias="__metadata__")


class _Index(BaseModel):
    model_config = ConfigDict(extra="allow")
    weight_map: dict[StrictStr, StrictStr]


class _Override(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pattern: Annotated[StrictStr, Field(min_length=1, max_length=1024)]
    format: StrictStr


class RecipeFile(BaseModel):
    """A recipe TOML (see dsquant.recipes); unknown keys are refused there with the list of known ones."""

    model_config = ConfigDict(extra="allow")
    name: StrictStr | None = None
    base: StrictStr | None = None
    default: StrictStr | None = None
    fallback: StrictStr | None = None
    description: StrictStr | None = None
    roles: dict[StrictStr, StrictStr] | None = None
    override: list[_Override] | None = None


# -- reading ---------------------------------------------------------------------------------------
def _reject_constant(name: str):
    raise ValueError(f"`{name}` is not valid JSON")


def _depth_ok(obj: Any, limit: int = MAX_DEPTH) -> bool:
    """Iteratively (no recursion) check that ``obj`` nests at most ``limit`` containers deep."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict | list):
            if d > limit:
                return False
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return True


def parse_json(data: bytes | str, shown: str | Path, error: type[InputError] = CorruptFileError,
               max_depth: int | None = MAX_DEPTH) -> Any:
    """``data`` (the bytes of ``shown``) as JSON: strict UTF-8, no NaN/Infinity, at most MAX_DEPTH deep.

    Raises ``error`` (CorruptFileError by default) naming ``shown`` for anything else. ``max_depth=None``
    skips the depth walk where a schema bounds the depth anyway (safetensors headers).
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
        obj = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise error(f"{shown}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise error(f"{shown}: JSON nested too deeply (more than {MAX_DEPTH} levels)") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, an integer with more than 4300 digits
        raise error(f"{shown}: not valid JSON ({' '.join(str(e).split())[:200]})") from None
    if max_depth is not None and not _depth_ok(obj, max_depth):
        raise error(f"{shown}: JSON nested too deeply (more than {max_depth} levels)")
    return obj


def read_json(path: Path, shown: str | Path | None = None, max_bytes: int = MAX_CONFIG_BYTES,
              error: type[InputError] = CorruptFileError) -> Any:
    """Read and parse a JSON file (a regular file, at most ``max_bytes``); errors name ``shown`` (default ``path``)."""
    shown = shown or path
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{shown}: cannot read ({e.strerror})") from None
    if len(data) > max_bytes:
        raise error(f"{shown}: larger than {max_bytes // (1024 * 1024)} MB; not a config file")
    return parse_json(data, shown, error)


def describe_error(e: ValidationError, loc_parts: tuple | None = None) -> str:
    """The first schema violation as ``key `a.b`: message (got X)`` (``loc_parts`` overrides its location)."""
    err = e.errors(include_url=False)[0]
    parts = err["loc"] if loc_parts is None else loc_parts
    loc = ".".join(str(p) for p in parts if not (isinstance(p, str) and p.startswith(("function-", "constrained"))))
    got = err.get("input")
    shown = repr(got) if not isinstance(got, dict | list) else type(got).__name__
    msg = err["msg"].removeprefix("Value error, ")
    where = f"key `{loc}`: " if loc else ""
    show_input = loc and err["type"] not in ("value_error", "missing")
    return f"{where}{msg}" + (f" (got {shown[:60]})" if show_input else "")


def validate(model: type[BaseModel], data: Any, shown: str | Path, error: type[InputError] = CorruptFileError):
    """``data`` checked against ``model``; ``error`` naming ``shown`` and the key on a violation."""
    if not isinstance(data, dict):
        raise error(f"{shown}: expected a JSON object at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise error(f"{shown}: {describe_error(e)}") from None


def check_config(config: Any, shown: str | Path) -> dict:
    """A parsed config.json, validated (types and ranges of every field dsq reads); returned unchanged."""
    validate(ConfigSchema, config, shown, InputError)
    return config


def load_config(path: Path, shown: str | Path | None = None) -> dict:
    """config.json read and validated; InputError naming the file and key otherwise."""
    shown = shown or path
    return check_config(read_json(path, shown), shown)


def load_index(path: Path, shown: str | Path | None = None) -> dict[str, str]:
    """``model.safetensors.index.json``'s ``weight_map`` (tensor name -> shard file name)."""
    shown = shown or path
    data = read_json(path, shown, max_bytes=256 * 1024 * 1024)
    return validate(_Index, data, shown).weight_map


def check_safetensors_header(header: Any, shown: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """A parsed safetensors header -> ({tensor: {dtype, shape, data_offsets}}, metadata), types checked.

    Ranges and offsets against the file size are checked by ``safetensors_io.read_header``.
    """
    if not isinstance(header, dict):
        raise CorruptFileError(f"{shown}: header is not a JSON object; the file is damaged")
    meta = validate(_SafetensorsHeader, {"__metadata__": header.get("__metadata__")}, shown).metadata or {}
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        return _HEADER_ENTRIES.validate_python(entries), meta
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        name, rest = first["loc"][0], first["loc"][1:]
        err_msg = describe_error(err, rest)
        raise CorruptFileError(f"{shown}: header entry for `{name}` is malformed: {err_msg}") from None


def check_recipe(data: Any, shown: str | Path, error: type[InputError]) -> RecipeFile:
    """A parsed recipe TOML, types checked (strings where strings go, [[override]] tables)."""
    if not _depth_ok(data):
        raise error(f"{shown}: nested too deeply (more than {MAX_DEPTH} levels)")
    return validate(RecipeFile, data, shown, error)


__all__ = [
    "ConfigSchema", "QuantizationConfig", "RecipeFile", "parse_json", "read_json", "load_config", "check_config",
    "load_index", "check_safetensors_header", "check_recipe", "validate", "describe_error", "MAX_DEPTH",
]
