"""``dsq inspect``: what is in a safetensors directory or file, a GGUF file or an ONNX file.

Every reader here checks sizes against the file before it allocates or seeks, so a truncated or
hostile file fails fast with a clear error instead of hanging or allocating without bound.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CorruptFileError, InputError
from .safetensors_io import read_header


@dataclass
class Description:
    path: str
    kind: str  # safetensors | gguf | onnx
    architecture: str | None = None
    facts: dict[str, object] = field(default_factory=dict)
    # rows: name, dtype / type, shape, bytes
    tensors: list[tuple[str, str, list[int], int]] = field(default_factory=list)

    @property
    def dtype_counts(self) -> dict[str, int]:
        return dict(Counter(t[1] for t in self.tensors))


def describe(path: str | Path) -> Description:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    if p.is_dir():
        if not any(p.glob("*.safetensors")) and (p / "model.onnx").is_file():
            return _describe_onnx_dir(p)  # what `dsq export --to onnx` writes
        return _describe_safetensors_dir(p)
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return _describe_safetensors_files(p, [p], {})
    if suffix == ".gguf":
        return describe_gguf(p)
    if suffix == ".onnx":
        return describe_onnx(p)
    raise InputError(f"{p}: unknown file type `{suffix}`; dsq inspects safetensors, .gguf and .onnx")


def _describe_safetensors_dir(p: Path) -> Description:
    config = {}
    if (p / "config.json").is_file():
        try:
            config = json.loads((p / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise CorruptFileError(f"{p / 'config.json'}: not valid JSON ({e})") from None
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise InputError(
            f"{p}: no *.safetensors files and no model.onnx; dsq inspects a safetensors or ONNX export folder, "
            "or a .safetensors, .gguf or .onnx file"
        )
    return _describe_safetensors_files(p, files, config)


def _describe_safetensors_files(p: Path, files: list[Path], config: dict) -> Description:
    d = Description(str(p), "safetensors", config.get("model_type"))
    for f in files:
        infos, _ = read_header(f)
        for info in sorted(infos.values(), key=lambda i: i.begin):
            d.tensors.append((info.name, info.dtype, list(info.shape), info.nbytes))
    q = config.get("quantization_config") or {}
    if q:
        d.facts["quantization"] = q.get("quant_method")
        if q.get("weight_block_size"):
            d.facts["block_size"] = q["weight_block_size"]
        if q.get("quant_method") in ("gptq", "awq"):  # AutoGPTQ/GPTQModel, AutoAWQ: one scheme for every module
            sym = q.get("sym", True) if q["quant_method"] == "gptq" else not q.get("zero_point", True)
            extra = [q.get("checkpoint_format") or q.get("version") or "", "act-order" if q.get("desc_act") else ""]
            d.facts["schemes"] = [" ".join(x for x in (f"int{q.get('bits')}", "sym" if sym else "asym", "group",
                                                       str(q.get("group_size")), *extra) if x)]
        groups = q.get("config_groups") or {}
        d.facts["schemes"] = d.facts.get("schemes") or sorted(
            {
                f"int{g['weights']['num_bits']} {'sym' if g['weights'].get('symmetric', True) else 'asym'} "
                f"{g['weights'].get('strategy')} {g['weights'].get('group_size') or ''}".strip()
                for g in groups.values()
                if g.get("weights")
            }
        ) or None
    for key in ("num_hidden_layers", "hidden_size", "n_routed_experts", "kv_lora_rank", "torch_dtype", "dtype"):
        if key in config:
            d.facts[key] = config[key]
    d.facts["files"] = len(files)
    d.facts["bytes"] = sum(t[3] for t in d.tensors)
    return d


# --- GGUF: parsed here with explicit bounds (the gguf package's reader trusts counts in the file) ---
_GGUF_MAGIC = b"GGUF"
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 16 * 1024 * 1024
_MAX_DIMS = 8


class _Cursor:
    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "rb")  # noqa: SIM115 - closed in describe_gguf
        self.size = path.stat().st_size

    def read(self, n: int) -> bytes:
        if n < 0 or self.f.tell() + n > self.size:
            raise CorruptFileError(
                f"{self.path}: wants {n} bytes at offset {self.f.tell()} but the file has {self.size}; truncated or hostile GGUF"
            )
        return self.f.read(n)

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > _MAX_STRING:
            raise CorruptFileError(f"{self.path}: string of {n} bytes at offset {self.f.tell()}; hostile GGUF")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY and depth < 2:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if itype not in _SCALAR and itype not in (_STRING, _ARRAY):
                raise CorruptFileError(f"{self.path}: unknown array item type {itype}")
            item_min = 8 if itype == _STRING else struct.calcsize(_SCALAR.get(itype, "<I"))
            if count * item_min > self.size - self.f.tell():
                raise CorruptFileError(f"{self.path}: array of {count} items cannot fit in the file; hostile GGUF")
            if itype in _SCALAR and count > 64:  # skip big numeric arrays (token scores...), keep the length
                self.read(count * item_min)
                return f"[{count} x {_SCALAR[itype][1:]}]"
            items = [self.value(itype, depth + 1) for _ in range(count)]
            return items if count <= 16 else f"[{count} items: {items[0]!r}, {items[1]!r}, ...]"
        raise CorruptFileError(f"{self.path}: unknown metadata value type {vtype}")


def describe_gguf(p: Path) -> Description:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    c = _Cursor(p)
    try:
        if c.read(4) != _GGUF_MAGIC:
            raise CorruptFileError(f"{p}: not a GGUF file (bad magic)")
        version = c.unpack("<I")
        if version not in (2, 3):
            raise CorruptFileError(f"{p}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
        # each tensor info needs >= 8+4+8+4+8 bytes, each kv >= 8+4: reject counts the file cannot hold
        if n_tensors * 32 + n_kv * 12 > c.size:
            raise CorruptFileError(f"{p}: claims {n_tensors} tensors and {n_kv} metadata keys; hostile or truncated GGUF")
        meta = {}
        for _ in range(n_kv):
            key = c.string()
            meta[key] = c.value(c.unpack("<I"))
        d = Description(str(p), "gguf", meta.get("general.architecture"))
        alignment = meta.get("general.alignment", 32)
        # ggml requires a power of two (gguf.cpp checks the same); 0 would divide by zero below
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise CorruptFileError(f"{p}: general.alignment = {alignment!r} is not a positive power of two")
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.unpack("<I")
            if n_dims > _MAX_DIMS:
                raise CorruptFileError(f"{p}: tensor `{name}` has {n_dims} dims; hostile GGUF")
            dims = [c.unpack("<Q") for _ in range(n_dims)]
            ttype, offset = c.unpack("<I"), c.unpack("<Q")
            try:
                qtype = GGMLQuantizationType(ttype)
            except ValueError:
                raise CorruptFileError(f"{p}: tensor `{name}` has unknown type {ttype}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            numel = math.prod(dims)
            if dims and dims[0] % block:
                raise CorruptFileError(f"{p}: tensor `{name}` row of {dims[0]} is not a multiple of {qtype.name}'s block")
            infos.append((name, qtype.name, dims, numel // block * type_size, offset))
        data_start = -(-c.f.tell() // alignment) * alignment
        seen: set[str] = set()
        for name, tname, dims, nbytes, offset in infos:
            # gguf.cpp refuses both: a name twice makes lookups ambiguous, an unaligned offset is not ggml's layout
            if name in seen:
                raise CorruptFileError(f"{p}: tensor `{name}` is listed twice; hostile or damaged GGUF")
            seen.add(name)
            if offset % alignment:
                raise CorruptFileError(f"{p}: tensor `{name}` starts at offset {offset}, not a multiple of the file's "
                                       f"alignment {alignment}; hostile or damaged GGUF")
            if data_start + offset + nbytes > c.size:
                raise CorruptFileError(f"{p}: tensor `{name}` lies past the end of the file; truncated or hostile GGUF")
            d.tensors.append((name, tname, dims, nbytes))
        d.facts.update(
            {k: v for k, v in meta.items() if not k.startswith("tokenizer.ggml.") or not isinstance(v, str | list)}
        )
        d.facts["gguf_version"] = version
        d.facts["bytes"] = sum(t[3] for t in d.tensors)
        return d
    finally:
        c.f.close()


def _onnx_itemsize(data_type: int) -> int:
    from onnx import helper

    try:
        return helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return 1


def _describe_onnx_dir(p: Path) -> Description:
    """An ONNX export folder: the graph's description plus what the folder's genai_config.json says."""
    d = describe_onnx(p / "model.onnx")
    d.path = str(p)
    genai = p / "genai_config.json"
    if genai.is_file():
        try:
            cfg = json.loads(genai.read_text())
            model = cfg["model"] if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"{genai}: not valid JSON ({e})") from None
        d.architecture = model.get("type") if isinstance(model.get("type"), str) else None
        d.facts["genai_config"] = {k: model[k] for k in ("type", "context_length", "bos_token_id", "eos_token_id",
                                                          "pad_token_id", "vocab_size") if k in model}
    d.facts["files"] = sorted(f.name for f in p.iterdir() if f.is_file())
    d.facts["bytes"] = sum(f.stat().st_size for f in p.iterdir() if f.is_file() and f.suffix in (".onnx", ".data"))
    return d


def describe_onnx(p: Path) -> Description:
    try:
        import onnx
    except ImportError:
        raise InputError("inspecting ONNX needs the `onnx` package: pip install 'dsq[onnx]'") from None
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others for damaged protobufs
        raise CorruptFileError(f"{p}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    if not model.graph.node or not model.opset_import:  # an empty file parses as an empty ModelProto
        raise CorruptFileError(f"{p}: not an ONNX model (no graph nodes or opset; {p.stat().st_size} bytes)")
    from onnx import TensorProto

    d = Description(str(p), "onnx", None)
    for init in model.graph.initializer:
        dtype = TensorProto.DataType.Name(init.data_type)
        n = math.prod(init.dims)
        external = {e.key: e.value for e in init.external_data}
        if init.raw_data:
            nbytes = len(init.raw_data)
        elif external.get("length", "").isdigit():  # stored in model.onnx.data; not read here
            nbytes = int(external["length"])
        else:
            nbytes = n * _onnx_itemsize(init.data_type)
        d.tensors.append((init.name, dtype, list(init.dims), nbytes))
    ops = Counter(f"{n.domain + '::' if n.domain else ''}{n.op_type}" for n in model.graph.node)
    d.facts.update(
        {
            "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "inputs": [i.name for i in model.graph.input],
            "outputs": [o.name for o in model.graph.output],
            "ops": dict(ops.most_common()),
            "metadata": {m.key: m.value for m in model.metadata_props},
        }
    )
    return d
