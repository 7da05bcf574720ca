"""Q4_K on the real SmolLM2-135M: dsq's Q4_K with and without importance vs llama.cpp's own Q4_K.

SmolLM2-135M's hidden size is 576 = 2.25 x 256, so only ``mlp.down_proj`` (input 1536) has rows that are
whole Q4_K super-blocks; llama.cpp itself falls back to Q5_0 for the others. So every "Q4_K" row replaces
exactly the 30 down_proj weights (26.5M weights) and keeps everything else at the checkpoint's bf16
values; the forward pass is torch float32 for all rows, so the table compares the Q4_K quantizers alone
(no ggml activation rounding). A last row gives llama.cpp's whole Q4_K_M model (all its block linears,
Q5_0 fallbacks and Q6_K included) for context. Metric: mean KL(reference || variant) of next-token
distributions over the eval tokens.

Variants:
* dsq Q4_K: export/kquants.py, ggml's reference search (``quantize_row_q4_K_ref``), no importance;
* dsq Q4_K + importance: the same with per-input-column mean x^2 collected by forward hooks on
  calibration windows (llama.cpp imatrix statistics), weighting the scale/min search;
* llama.cpp Q4_K (pure) and Q4_K_M: ``llama_model_quantize`` on an F16 GGUF written by dsq, read back with
  gguf-py and un-permuted to HF order. Q4_K_M puts Q6_K on some attn_v/ffn_down tensors, so its bits per
  weight (printed) are higher. llama.cpp with an imatrix is not run: llama-cpp-python's
  ``llama_model_quantize_params.imatrix`` is a C++ ``std::unordered_map`` pointer that Python cannot build.

Usage: nice .venv/bin/python bench/gguf_kquant_imatrix.py [--eval-tokens 1024] [--calib-windows 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dsq.export.kquants import quantize_q4_k

TEXTS = Path("~/.cache/dsq-bench").expanduser()
LINEARS = {  # GGUF block tensor -> HF module path inside a layer
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _texts() -> tuple[str, str]:
    ev, cal = TEXTS / "eval_austen.txt", TEXTS / "calib_mixed.txt"
    if not (ev.is_file() and cal.is_file()):
        import subprocess
        import sys

        subprocess.run([sys.executable, "/work/shared/models/make_texts.py"], check=True)
    return ev.read_text(encoding="utf-8"), cal.read_text(encoding="utf-8")


def _linears(model, only_q4_k: bool = False) -> dict[str, torch.nn.Linear]:
    mods = {f"model.layers.{i}.{hf}": layer.get_submodule(hf)
            for i, layer in enumerate(model.model.layers) for hf in LINEARS.values()}
    return {n: m for n, m in mods.items() if not only_q4_k or m.in_features % 256 == 0}


def collect_importance(model, windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean x^2 per input column of every block linear over the calibration tokens (llama.cpp imatrix)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def f(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return f

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in _linears(model).items()]
    with torch.no_grad():
        for w in windows:
            model(w[None])
    for h in handles:
        h.remove()
    return {n: sums[n] / counts[n] for n in sums}


def mean_kl(model, windows: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for w, r in zip(windows, ref, strict=True):
            lq = torch.log_softmax(model(w[None]).logits[0].float(), -1)
            total += float((r.exp() * (r - lq)).sum())
            n += w.numel()
    return total / n


def set_weights(model, weights: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> None:
    """Block linears named in ``weights`` take those values; the others go back to the original."""
    with torch.no_grad():
        for name, mod in _linears(model).items():
            mod.weight.copy_(weights.get(name, original[name]))


def dsq_q4_k(original: dict[str, torch.Tensor], importance: dict[str, torch.Tensor] | None) -> dict:
    out = {}
    for name, w in original.items():
        if w.shape[-1] % 256:
            continue
        _, values = quantize_q4_k(w, None if importance is None else importance[name])
        out[name] = values
    return out


def llama_cpp_variant(src: Path, f16: Path, ftype_name: str, pure: bool, cfg: dict, tmp: Path, only_q4_k: bool):
    """llama_model_quantize -> {HF name: float32 weight}, bits per weight of the weights returned."""
    import llama_cpp
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from dsq.export.gguf_tensors import permute_rows

    out = tmp / f"llamacpp-{ftype_name}-{int(pure)}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.pure = pure
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) == 0
    heads = {"attn_q": cfg["num_attention_heads"],
             "attn_k": cfg.get("num_key_value_heads") or cfg["num_attention_heads"]}
    weights, bits, elems = {}, 0, 0
    for t in GGUFReader(out).tensors:
        parts = t.name.split(".")
        if parts[0] != "blk" or parts[2] not in LINEARS or parts[-1] != "weight":
            continue
        if only_q4_k and int(t.shape[0]) % 256:  # gguf shape[0] is the row length
            continue
        shape = tuple(reversed(t.shape.tolist()))
        v = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape))
        if parts[2] in heads:  # GGUF row i is HF row perm[i]
            hf = torch.empty_like(v)
            hf[permute_rows(v.shape[0], heads[parts[2]])] = v
            v = hf
        weights[f"model.layers.{parts[1]}.{LINEARS[parts[2]]}"] = v
        bits += int(t.n_bytes) * 8
        elems += int(t.n_elements)
    return weights, bits / elems


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--calib-window", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(2)

    import json

    import transformers
    from tokenizers import Tokenizer

    from dsq.dsquant.default_model import ensure_default_model
    from dsq.export.gguf_writer import export_gguf

    src = ensure_default_model()
    cfg = json.loads((src / "config.json").read_text())
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    eval_text, calib_text = _texts()
    ids = torch.tensor(tok.encode(eval_text[:200_000]).ids[: args.eval_tokens])
    eval_windows = list(ids.split(args.window))
    cal = torch.tensor(tok.encode(calib_text[:400_000]).ids)
    stride = max(args.calib_window, cal.numel() // args.calib_windows)
    calib_windows = [cal[i * stride : i * stride + args.calib_window] for i in range(args.calib_windows)]

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    original = {n: m.weight.detach().clone() for n, m in _linears(model).items()}
    with torch.no_grad():
        ref = [torch.log_softmax(model(w[None]).logits[0].float(), -1) for w in eval_windows]
    t = time.perf_counter()
    importance = collect_importance(model, calib_windows)
    t_imp = time.perf_counter() - t

    rows = []  # (variant, bits per weight, KL, seconds to quantize)
    for label, imp in (("dsq Q4_K", None), ("dsq Q4_K + importance", importance)):
        t = time.perf_counter()
        w = dsq_q4_k(original, imp)
        secs = time.perf_counter() - t + (t_imp if imp is not None else 0.0)
        set_weights(model, w, original)
        rows.append((label, 4.5, mean_kl(model, eval_windows, ref), secs))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        f16 = tmp / "f16.gguf"
        export_gguf(src, f16, type="f16")
        for label, ftype, pure, only in (("llama.cpp Q4_K (pure, no imatrix)", "Q4_K_S", True, True),
                                         ("llama.cpp Q4_K_M (its down_proj: Q4_K/Q6_K mix)", "Q4_K_M", False, True),
                                         ("llama.cpp Q4_K_M, all block linears", "Q4_K_M", False, False)):
            t = time.perf_counter()
            w, bpw = llama_cpp_variant(src, f16, ftype, pure, cfg, tmp, only)
            secs = time.perf_counter() - t
            set_weights(model, w, original)
            rows.append((label, bpw, mean_kl(model, eval_windows, ref), secs))

    base = rows[0][2]
    print(f"SmolLM2-135M ({src.name}), {ids.numel()} eval tokens (eval_austen), importance from "
          f"{args.calib_windows}x{args.calib_window} calib_mixed tokens; down_proj only unless said, torch fp32 forward")
    print("| variant | bits/weight (replaced weights) | mean KL vs bf16 | ratio to dsq Q4_K | quantize s |")
    print("|---|---|---|---|---|")
    for label, bpw, kl, secs in rows:
        print(f"| {label} | {bpw:.2f} | {kl:.5f} | {kl / base:.3f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
