"""dsq's GGUF export vs llama.cpp's own path, on the same synthetic checkpoint, for Q8_0 and Q4_0.

llama.cpp's path is what its README prescribes: ``convert_hf_to_gguf.py --outtype f16`` (the converter
and the gguf-py it bundles, from the llama.cpp sources inside llama-cpp-python's sdist) followed by
``llama_model_quantize`` (llama-cpp-python's binding of the C++ quantizer). dsq's path is one
``export_gguf(hf_dir, type=...)`` pass that quantizes on the way (``dsq export HF --to gguf --type q4_0``). Each step runs in its own process;
peak RSS is that process's ru_maxrss (os.wait4), time is wall time.

The checkpoint is a random-weight Llama with SmolLM2-135M's tokenizer (a tokenizer llama.cpp's
converter recognises by hash; get it with /work/shared/models/make_smollm2.py, or pass --tokenizer-dir).

    python bench/gguf_vs_llamacpp.py [--hidden 1024 --layers 8] [--llama-cpp-src DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path.home() / ".cache" / "dsq-bench"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def llama_cpp_sources(given: Path | None) -> Path:
    """The llama.cpp tree inside llama-cpp-python's sdist (downloaded with pip if not cached)."""
    if given:
        return given
    import llama_cpp

    version = llama_cpp.__version__
    root = CACHE / f"llama_cpp_python-{version}"
    tree = root / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
                        "--no-binary", ":all:", "-d", tmp], check=True)
        with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as tar:
            tar.extractall(CACHE, filter="data")
    return tree


def converter_deps() -> Path:
    """llama.cpp's converter imports sentencepiece even for BPE models; installed aside, not into the venv."""
    target = CACHE / "convert-deps"
    if not (target / "sentencepiece").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target), "sentencepiece"],
                       check=True)
    return target


def make_checkpoint(out: Path, tokenizer_dir: Path, hidden: int, layers: int) -> Path:
    import torch
    import transformers

    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    n_vocab = 1 + max([*tok["model"]["vocab"].values(), *(t["id"] for t in tok.get("added_tokens") or [])])
    config = transformers.LlamaConfig(
        vocab_size=n_vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
        max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(out)
    for f in TOKENIZER_FILES:
        if (tokenizer_dir / f).is_file():
            shutil.copy2(tokenizer_dir / f, out / f)
    return out


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MiB, CPU seconds user+sys) of one process. CPU time is the number to
    compare on a shared machine; wall time is what a user waits."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({status}): {' '.join(cmd)}")
    return seconds, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


QUANTIZE = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, sys.argv[3]); p.nthread = 2
assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p) == 0
"""
EXPORT = """
import sys
from dsq.export.gguf_writer import export_gguf
export_gguf(sys.argv[1], sys.argv[2], type=sys.argv[3], overwrite=True)
"""
# GGUF type -> (dsq --type, llama.cpp ftype). dsq applies llama.cpp's per-tensor policy for that file type
# (export/gguf_policy.py: e.g. output.weight Q6_K in Q4_0 mode), so both files have the same tensor types.
TARGETS = {"Q8_0": ("q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0"), "Q4_0": ("q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokenizer-dir", type=Path, default=CACHE / "smollm2-135m-instruct-perm0-bf16")
    ap.add_argument("--llama-cpp-src", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--make-checkpoint", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_checkpoint:
        make_checkpoint(args.make_checkpoint, args.tokenizer_dir, args.hidden, args.layers)
        return
    src = llama_cpp_sources(args.llama_cpp_src)
    py = sys.executable
    results = []
    with tempfile.TemporaryDirectory(dir=CACHE if CACHE.is_dir() else None) as tmp:
        tmp = Path(tmp)
        # built in a child process: this parent stays small, so children's ru_maxrss is theirs alone
        # (a vfork'ed child counts its parent's pages until exec)
        ckpt = tmp / "hf"
        subprocess.run([py, __file__, "--make-checkpoint", str(ckpt), "--tokenizer-dir", str(args.tokenizer_dir),
                        "--hidden", str(args.hidden), "--layers", str(args.layers)], check=True)
        in_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        env = {"PYTHONPATH": os.pathsep.join([str(src / "gguf-py"), str(converter_deps())])}
        f16 = tmp / "f16.gguf"
        conv = measure([py, str(src / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", "f16", "--outfile", str(f16)],
                       env)
        for qname, (dsq_type, ftype) in TARGETS.items():
            theirs, ours = tmp / f"llama-{qname}.gguf", tmp / f"dsq-{qname}.gguf"
            quant = measure([py, "-c", QUANTIZE, str(f16), str(theirs), ftype])
            dsq = measure([py, "-c", EXPORT, str(ckpt), str(ours), dsq_type])
            llama_s = conv[0] + quant[0]
            row = {
                "type": qname, "checkpoint_mib": in_bytes / 2**20,
                "llama_cpp": {"convert_s": conv[0], "quantize_s": quant[0], "total_s": llama_s,
                              "cpu_s": conv[2] + quant[2], "peak_rss_mib": max(conv[1], quant[1]),
                              "bytes": theirs.stat().st_size},
                "dsq": {"total_s": dsq[0], "cpu_s": dsq[2], "peak_rss_mib": dsq[1], "bytes": ours.stat().st_size},
                "time_ratio_dsq_over_llama_cpp": dsq[0] / llama_s,
                "cpu_ratio_dsq_over_llama_cpp": dsq[2] / (conv[2] + quant[2]),
            }
            results.append(row)
            print(f"{qname}: llama.cpp {llama_s:.1f} s (convert {conv[0]:.1f} + quantize {quant[0]:.1f}), "
                  f"peak {row['llama_cpp']['peak_rss_mib']:.0f} MiB, {row['llama_cpp']['bytes'] / 2**20:.1f} MiB | "
                  f"dsq {dsq[0]:.1f} s, peak {dsq[1]:.0f} MiB, {row['dsq']['bytes'] / 2**20:.1f} MiB | "
                  f"ratio dsq/llama.cpp wall {row['time_ratio_dsq_over_llama_cpp']:.2f}, "
                  f"CPU {row['cpu_ratio_dsq_over_llama_cpp']:.2f} ({dsq[2]:.1f} vs {conv[2] + quant[2]:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
