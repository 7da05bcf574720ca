#!/usr/bin/env python3
"""dsq vs llama.cpp on the 7B-shaped DeepSeek-R1-Distill-Qwen-7B checkpoint, in one run (issue 14, item 5).

    .venv/bin/python bench/real_scale.py                      # builds or reuses the 7B checkpoint, all 28 layers
    .venv/bin/python bench/real_scale.py --layers 4 --json /tmp/real.json
    .venv/bin/python bench/real_scale.py --checkpoint DIR     # any qwen2 checkpoint with a tokenizer llama.cpp knows

1. The checkpoint: ``--checkpoint DIR``, else ``BUILD/r1-distill-qwen-7b-perm0-synth-bf16`` (``--build-dir``,
   default /tmp/r1distill), built there by ``shared/models/make_r1distill.py --synthesize-missing`` when missing
   (~15 GB of bf16 shards, a long step on 2 cores). Real config, tokenizer and tensor shapes; seeded synthetic
   weights (see shared/models/README.md). ``--layers N`` measures a copy with only the first N decoder layers
   (embedding, final norm and lm_head kept), written tensor by tensor into the work dir: the per-layer work
   scales with N, the vocab-sized tensors (2 x 1.09 GB) do not, so ratios at small N weigh those more.
2. Each step runs in its own child process; CPU seconds (user + sys, all threads) come from ``os.wait4``,
   peak RSS from the child's own ``VmHWM`` (a wrapper reads /proc/self/status at exit; a child's
   ``ru_maxrss`` can start from its parent's RSS), output size from the files written:

   dsq:        plan -r int4 | quantize -r int4 | export QUANTIZED --to gguf | export HF --type q4_0 | --type q4_k_m
   llama.cpp:  convert_hf_to_gguf.py --outtype f16 | llama_model_quantize Q4_0 | Q4_K_M  (from llama-cpp-python's
               sdist and binding, as bench/gguf_vs_llamacpp.py gets them; ``nthread`` 2)

3. It prints one table and the ratios the issue sets targets for (CPU seconds, the fair measure on a shared
   machine), with ``uptime``'s load averages at start and end.

Everything large lives in ``--work`` (default /tmp/dsq-real-scale, outside the repository); outputs are deleted
as soon as they are measured and no later step reads them, unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAKER = HERE.parent.parent / "shared" / "models" / "make_r1distill.py"
CKPT_NAME = "r1-distill-qwen-7b-perm0-synth-bf16"
GiB = 1024**3

from measure import HWM_WRAPPER  # noqa: E402 - bench/ is the script's own folder on sys.path

QUANTIZE = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, sys.argv[3]); p.nthread = 2
assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p) == 0
"""

TRIM = """
import json, shutil, sys
from pathlib import Path
from dsq.dsquant.checkpoint import Checkpoint
from dsq.dsquant.safetensors_io import PlannedTensor, SafetensorsWriter, read_tensor
src, out, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
ck = Checkpoint(src)
keep = [t for t in ck.tensors if t.ref is None or t.ref.layer is None or t.ref.layer < n]
tmp = out.with_name(out.name + '.partial')
shutil.rmtree(tmp, ignore_errors=True)
tmp.mkdir(parents=True)
w = SafetensorsWriter(tmp / 'model.safetensors', [PlannedTensor(t.name, t.info.torch_dtype, t.shape) for t in keep])
for t in keep:
    w.write(t.name, read_tensor(t.info))
w.close()
cfg = dict(ck.config, num_hidden_layers=n)
if 'max_window_layers' in cfg:
    cfg['max_window_layers'] = n
(tmp / 'config.json').write_text(json.dumps(cfg, indent=2))
for f in ck.side_files():
    shutil.copy2(f, tmp / f.name)
tmp.rename(out)
"""


@dataclass
class Step:
    tool: str
    step: str
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss: int = 0
    out_bytes: int = 0
    rc: int = 0


def uptime() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(tool: str, step: str, kind: str, target: str, args: list[str], work: Path, env: dict | None = None,
        output: Path | None = None) -> Step:
    """One child process: wall, CPU (user+sys over all its threads), peak RSS (VmHWM), size of ``output``."""
    hwm = work / f".hwm-{os.getpid()}"
    argv = [sys.executable, "-c", HWM_WRAPPER, str(hwm), kind, target, *args]
    errlog = work / f".stderr-{os.getpid()}"
    t0 = time.perf_counter()
    with open(errlog, "wb") as err:
        proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of the child: CPU of all its threads
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    s = Step(tool, step, wall, usage.ru_utime + usage.ru_stime, int(hwm.read_text()) if hwm.is_file() else 0,
             rc=proc.returncode)
    hwm.unlink(missing_ok=True)
    if proc.returncode:
        print(f"[{tool} {step}] exit {proc.returncode}: {errlog.read_text(errors='replace')[-3000:]}", file=sys.stderr)
    errlog.unlink(missing_ok=True)
    if output is not None and output.exists():
        s.out_bytes = sum(f.stat().st_size for f in output.rglob("*") if f.is_file()) if output.is_dir() \
            else output.stat().st_size
    print(f"  {tool:<9} {step:<28} wall {s.wall_s:7.1f} s  CPU {s.cpu_s:7.1f} s  peak {s.peak_rss / GiB:5.2f} GiB  "
          f"out {s.out_bytes / GiB:5.2f} GiB  (load {uptime()})", flush=True)
    return s


def checkpoint(a: argparse.Namespace) -> Path:
    if a.checkpoint:
        return a.checkpoint
    ckpt = a.build_dir / CKPT_NAME
    if not (ckpt / "config.json").is_file():
        print(f"building the 7B-shaped checkpoint in {ckpt} (~15 GB; make_r1distill.py)", flush=True)
        subprocess.run([sys.executable, str(a.maker), "--synthesize-missing", "--out", str(a.build_dir)], check=True)
    return ckpt


def trimmed(ckpt: Path, layers: int, work: Path) -> Path:
    cfg = json.loads((ckpt / "config.json").read_text())
    if not layers or layers >= cfg["num_hidden_layers"]:
        return ckpt
    out = work / f"{ckpt.name}-{layers}L"
    if not (out / "config.json").is_file():
        print(f"writing a {layers}-layer copy to {out}", flush=True)
        subprocess.run([sys.executable, "-c", TRIM, str(ckpt), str(out), str(layers)], check=True)
    return out


def llama_cpp_tree(given: Path | None) -> Path:
    sys.path.insert(0, str(HERE))
    from gguf_vs_llamacpp import llama_cpp_sources  # noqa: PLC0415 - the bench next door knows the way

    return llama_cpp_sources(given)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="use this HF checkpoint instead of building the 7B one")
    ap.add_argument("--build-dir", type=Path, default=Path("/tmp/r1distill"), help="where the 7B checkpoint is built")
    ap.add_argument("--maker", type=Path, default=MAKER, help="make_r1distill.py")
    ap.add_argument("--layers", type=int, default=0, help="measure only the first N decoder layers (0: all)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dsq-real-scale"), help="outputs (outside the repo)")
    ap.add_argument("--llama-cpp-src", type=Path, default=None, help="llama.cpp tree with convert_hf_to_gguf.py")
    ap.add_argument("--skip", nargs="*", default=[], help="step names to skip: q4_0 q4_k_m (dsq direct exports), "
                    "Q4_0 Q4_K_M (llama.cpp quantize)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    load_start = uptime()
    src = trimmed(checkpoint(a), a.layers, a.work)
    cfg = json.loads((src / "config.json").read_text())
    in_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    print(f"checkpoint {src}: {cfg['num_hidden_layers']} layers, {in_bytes / GiB:.2f} GiB; load {load_start}",
          flush=True)
    tree = llama_cpp_tree(a.llama_cpp_src)
    sys.path.insert(0, str(HERE))
    from gguf_vs_llamacpp import converter_deps  # noqa: PLC0415

    conv_env = {"PYTHONPATH": os.pathsep.join([str(tree / "gguf-py"), str(converter_deps())])}
    w = a.work
    q_dir, steps = w / "dsq-int4", []

    def gone(*paths: Path) -> None:
        if not a.keep:
            for p in paths:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def dsq(step: str, args: list[str], output: Path | None = None) -> Step:
        return run("dsq", step, "-m", "dsq.cli", args, w, None, output)

    gone(q_dir)
    steps.append(dsq("plan -r int4", ["plan", str(src), "-r", "int4"]))
    steps.append(dsq("quantize -r int4", ["quantize", str(src), "-o", str(q_dir), "-r", "int4", "--overwrite"], q_dir))
    out = w / "dsq-int4.gguf"
    steps.append(dsq("export int4 --to gguf", ["export", str(q_dir), "--to", "gguf", "-o", str(out), "--overwrite"], out))
    gone(q_dir, out)
    for t in ("q4_0", "q4_k_m"):
        if t in a.skip:
            continue
        out = w / f"dsq-direct-{t}.gguf"
        steps.append(dsq(f"export HF --type {t}", ["export", str(src), "--to", "gguf", "--type", t, "-o", str(out),
                                                   "--overwrite"], out))
        gone(out)
    f16 = w / "llama-f16.gguf"
    steps.append(run("llama.cpp", "convert_hf_to_gguf f16", "path", str(tree / "convert_hf_to_gguf.py"),
                     [str(src), "--outtype", "f16", "--outfile", str(f16)], w, conv_env, f16))
    for ftype in ("Q4_0", "Q4_K_M"):
        if ftype in a.skip:
            continue
        out = w / f"llama-{ftype}.gguf"
        steps.append(run("llama.cpp", f"quantize {ftype}", "-c", QUANTIZE,
                         [str(f16), str(out), f"LLAMA_FTYPE_MOSTLY_{ftype}"], w, None, out))
        gone(out)
    gone(f16)
    report(steps, src, cfg, in_bytes, load_start, a)


def report(steps: list[Step], src: Path, cfg: dict, in_bytes: int, load_start: str, a) -> None:
    by = {(s.tool, s.step): s for s in steps}
    print(f"\n{src.name}: {cfg['num_hidden_layers']} layers, {in_bytes / GiB:.2f} GiB bf16; "
          f"load average (1/5/15 min) at start {load_start}, at end {uptime()}\n")
    head = f"| {'tool':<9} | {'step':<28} | {'wall s':>7} | {'CPU s':>7} | {'peak RSS GiB':>12} | {'output GiB':>10} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for s in steps:
        flag = "" if s.rc == 0 else f" (failed rc={s.rc})"
        print(f"| {s.tool:<9} | {s.step + flag:<28} | {s.wall_s:>7.1f} | {s.cpu_s:>7.1f} | {s.peak_rss / GiB:>12.2f} | "
              f"{s.out_bytes / GiB:>10.2f} |")

    def cpu(*keys: tuple[str, str]) -> float | None:
        got = [by.get(k) for k in keys]
        return None if any(g is None or g.rc for g in got) else sum(g.cpu_s for g in got)

    conv = ("llama.cpp", "convert_hf_to_gguf f16")
    ratios = {
        "quantize int4 + export gguf  vs  convert + quantize Q4_0 (target <= 0.5)": (
            cpu(("dsq", "quantize -r int4"), ("dsq", "export int4 --to gguf")),
            cpu(conv, ("llama.cpp", "quantize Q4_0"))),
        "export HF --type q4_0        vs  convert + quantize Q4_0 (target <= 0.5)": (
            cpu(("dsq", "export HF --type q4_0")), cpu(conv, ("llama.cpp", "quantize Q4_0"))),
        "export HF --type q4_k_m      vs  convert + quantize Q4_K_M (target <= 1.5)": (
            cpu(("dsq", "export HF --type q4_k_m")), cpu(conv, ("llama.cpp", "quantize Q4_K_M"))),
        "export HF --type q4_k_m      vs  quantize Q4_K_M alone": (
            cpu(("dsq", "export HF --type q4_k_m")), cpu(("llama.cpp", "quantize Q4_K_M"))),
    }
    print("\nCPU-second ratios, dsq / llama.cpp:")
    results = {}
    for label, (ours, theirs) in ratios.items():
        if ours is None or theirs is None or not theirs:
            print(f"  {label}: not measured")
            continue
        results[label] = ours / theirs
        print(f"  {label}: {ours:.1f} / {theirs:.1f} = {ours / theirs:.2f}")
    if a.json:
        a.json.write_text(json.dumps({"checkpoint": str(src), "layers": cfg["num_hidden_layers"], "bytes_in": in_bytes,
                                      "load_start": load_start, "load_end": uptime(),
                                      "steps": [asdict(s) for s in steps], "ratios": results}, indent=2))


if __name__ == "__main__":
    main()
