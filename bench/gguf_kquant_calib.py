"""Q4_K_M-policy GGUFs of the real SmolLM2-135M: dsq RTN / imatrix / GPTQ vs llama.cpp's Q4_K_M with and without imatrix.

Every variant is a whole GGUF file under llama.cpp's Q4_K_M type policy (export/gguf_policy.py; on SmolLM2, whose
hidden size 576 is not whole 256-blocks, most linears fall back to Q5_0, ffn_down is Q4_K or Q6_K and the tied
embedding Q8_0), so the sizes are equal and only the rounding differs:

* ``llama.cpp Q4_K_M`` / ``+ imatrix``: ``llama_model_quantize`` (llama-cpp-python) on an F32 GGUF of the checkpoint,
  the imatrix passed through ``params.imatrix`` (mean x^2 per column: the entries of the imatrix file below);
* ``dsq RTN``: ``dsq export HF --to gguf --type q4_k_m`` (ggml's reference rounding; bytes compared with llama.cpp's);
* ``dsq imatrix``: the same with ``--imatrix FILE`` (ggml's imatrix path; bytes compared with llama.cpp's);
* ``dsq GPTQ``: ``dsq quantize --method gptq`` with a recipe giving every linear the dsq format of the type the
  policy gives it (q5_0, q4_k, q6_k, int8_g32 for Q8_0: GPTQ fits each block's grid on the compensated weights,
  dsquant/kformats.py), which also writes the imatrix FILE from the same calibration statistics
  (``--imatrix-out``); then ``dsq export OUT --to gguf --type q4_k_m`` carries every calibrated tensor exactly.

Metric: mean KL(bf16 reference || variant) of next-token distributions over held-out tokens (eval_austen), torch
float32 forward with each GGUF's weights as gguf-py dequantizes them (so the table compares weight rounding
alone, no ggml activation rounding). Calibration: ``--samples`` windows of ``--seqlen`` tokens of calib_mixed.txt
(disjoint from the eval text). CPU seconds of each step are printed with the load average.

Usage: nice .venv/bin/python bench/gguf_kquant_calib.py [--samples 32] [--seqlen 512] [--eval-tokens 2048]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

BENCH = Path("~/.cache/dsq-bench").expanduser()
LINEARS = {  # GGUF block tensor -> HF module path inside a layer
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
DSQ_FORMAT = {"Q5_0": "q5_0", "Q5_1": "q5_1", "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k", "Q3_K": "q3_k",
              "Q2_K": "q2_k", "Q8_0": "int8_g32", "Q4_0": "int4_sym_g32"}


def cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def hf_name(gguf: str) -> str | None:
    parts = gguf.split(".")
    if parts[0] == "blk" and parts[2] in LINEARS and parts[-1] == "weight":
        return f"model.layers.{parts[1]}.{LINEARS[parts[2]]}.weight"
    return {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}.get(gguf)


def gguf_weights(path: Path, cfg: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """HF name -> float32 weight as gguf-py dequantizes the file (q/k rows un-permuted); HF name -> GGUF type."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from dsq.export.gguf_tensors import permute_rows

    heads = {"attn_q": cfg["num_attention_heads"],
             "attn_k": cfg.get("num_key_value_heads") or cfg["num_attention_heads"]}
    out, types = {}, {}
    for t in GGUFReader(path).tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        shape = tuple(reversed(t.shape.tolist()))
        v = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape))
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if kind in heads:
            hf = torch.empty_like(v)
            hf[permute_rows(v.shape[0], heads[kind])] = v
            v = hf
        out[name], types[name] = v, t.tensor_type.name
    return out, types


def mean_kl(model, windows, ref) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for w, r in zip(windows, ref, strict=True):
            lq = torch.log_softmax(model(w[None]).logits[0].float(), -1)
            total += float((r.exp() * (r - lq)).sum())
            n += w.numel()
    return total / n


def llama_quantize(f32: Path, out: Path, importance: dict[str, np.ndarray] | None) -> None:
    from llamacpp_tools import quantize_in_process  # bench/, this script's folder

    quantize_in_process(f32, out, "LLAMA_FTYPE_MOSTLY_Q4_K_M", 2, importance)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(BENCH / "smollm2-135m-instruct-perm0-bf16"))
    ap.add_argument("--work", default="/tmp/dsq-kquant-bench")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)  # two intra-op threads on a loaded machine wait on each other (see formats.StreamPool)

    import transformers
    from gguf import GGUFReader
    from tokenizers import Tokenizer

    from dsq.dsquant.calib.hook import CalibSpec
    from dsq.dsquant.quantize import quantize_checkpoint
    from dsq.export.gguf_writer import export_gguf

    src = Path(args.model)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    rows: list[tuple[str, Path, float]] = []  # (variant, file, CPU s)
    load0 = os.getloadavg()

    f32 = work / "f32.gguf"
    export_gguf(src, f32, type="f32", overwrite=True)

    t = cpu()
    theirs = work / "llamacpp-q4_k_m.gguf"
    llama_quantize(f32, theirs, None)
    rows.append(("llama.cpp Q4_K_M", theirs, cpu() - t))
    policy = {hf_name(x.name): x.tensor_type.name for x in GGUFReader(theirs).tensors if hf_name(x.name)}

    # GPTQ into the policy's own types (+ the imatrix file from the same statistics)
    recipe = work / "policy.toml"
    lines = ['default = "q4_k"', 'fallback = "keep"', ""]
    for name, gt in sorted(policy.items()):
        if name.startswith("model.layers."):
            lines += ["[[override]]", f'pattern = "{name}"', f'format = "{DSQ_FORMAT[gt]}"', ""]
    recipe.write_text("\n".join(lines))
    imatrix = work / "imatrix.gguf"
    gptq_dir = work / "gptq"
    t = cpu()
    quantize_checkpoint(src, gptq_dir, str(recipe), overwrite=True, calibration=CalibSpec(
        "gptq", str(BENCH / "calib_mixed.txt"), args.samples, args.seqlen, imatrix_out=str(imatrix)))
    t_gptq = cpu() - t

    from llamacpp_tools import imatrix_importance

    importance = imatrix_importance(imatrix)
    t = cpu()
    theirs_im = work / "llamacpp-q4_k_m-imatrix.gguf"
    llama_quantize(f32, theirs_im, importance)
    rows.append(("llama.cpp Q4_K_M + imatrix", theirs_im, cpu() - t))

    for label, source, kw in (("dsq RTN", src, {}), ("dsq imatrix", src, {"imatrix": imatrix})):
        t = cpu()
        out = work / f"{label.replace(' ', '-')}.gguf"
        export_gguf(src if source is src else source, out, type="q4_k_m", overwrite=True, **kw)
        rows.append((label, out, cpu() - t))
    t = cpu()
    out = work / "dsq-gptq.gguf"
    rep = export_gguf(gptq_dir, out, type="q4_k_m", overwrite=True)
    rows.append(("dsq GPTQ", out, cpu() - t + t_gptq))
    exact = sum(r["status"] == "exact" for r in rep["tensors"])

    # byte equality of dsq's RTN / imatrix files with llama.cpp's (tensor data)
    def same_bytes(a: Path, b: Path) -> str:
        ta = {x.name: np.asarray(x.data).tobytes() for x in GGUFReader(a).tensors}
        tb = {x.name: np.asarray(x.data).tobytes() for x in GGUFReader(b).tensors}
        diff = [n for n in tb if ta.get(n) != tb[n]]
        return "all tensors byte-identical" if not diff else f"{len(diff)} of {len(tb)} tensors differ ({diff[:3]})"

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    ids = torch.tensor(tok.encode((BENCH / "eval_austen.txt").read_text(encoding="utf-8")[:300_000]).ids[: args.eval_tokens])
    windows = list(ids.split(args.window))
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = [torch.log_softmax(model(w[None]).logits[0].float(), -1) for w in windows]

    print(f"SmolLM2-135M ({src.name}); eval {ids.numel()} tokens of eval_austen; calibration {args.samples}x{args.seqlen} "
          f"tokens of calib_mixed.txt; load average at start {load0[0]:.1f}, now {os.getloadavg()[0]:.1f}")
    print(f"dsq RTN vs llama.cpp Q4_K_M: {same_bytes(work / 'dsq-RTN.gguf', theirs)}")
    print(f"dsq imatrix vs llama.cpp Q4_K_M + imatrix: {same_bytes(work / 'dsq-imatrix.gguf', theirs_im)}")
    print(f"dsq GPTQ export: {exact} tensors carried exactly")
    print("| variant | file MB | bits/weight (quantized tensors) | mean KL vs bf16 | ratio to llama.cpp Q4_K_M + imatrix | CPU s |")
    print("|---|---|---|---|---|---|")
    results = []
    for label, path, secs in rows:
        weights, _ = gguf_weights(path, cfg)
        sd = dict(original)
        sd.update({k: v for k, v in weights.items() if k in sd})
        if cfg.get("tie_word_embeddings") and "model.embed_tokens.weight" in weights:
            sd["lm_head.weight"] = weights["model.embed_tokens.weight"]
        model.load_state_dict(sd, strict=False)
        kl = mean_kl(model, windows, ref)
        bits = sum(int(x.n_bytes) for x in GGUFReader(path).tensors if hf_name(x.name)) * 8
        elems = sum(int(x.n_elements) for x in GGUFReader(path).tensors if hf_name(x.name))
        results.append((label, path.stat().st_size / 1e6, bits / elems, kl, secs))
    base = next(r[3] for r in results if r[0] == "llama.cpp Q4_K_M + imatrix")
    for label, mb, bpw, kl, secs in results:
        print(f"| {label} | {mb:.2f} | {bpw:.3f} | {kl:.5f} | {kl / base:.3f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
