"""dsq's command line: parse, call the library, print. Heavy modules are imported inside commands."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import click
import typer


def _flags_without_type() -> None:
    """typer 0.2x prints ``<bool>`` beside on/off flags (``--overwrite <bool>``), which reads as if the flag
    took a value; show no type for flags, as click and argparse do."""
    from typer.core import TyperOption

    original = getattr(TyperOption, "display_type_rich", None)
    if original is None or getattr(original, "_dsq_flags", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else original(self, ctx)

    display_type_rich._dsq_flags = True
    TyperOption.display_type_rich = display_type_rich


_flags_without_type()

def _debug() -> bool:
    """--debug (or DSQ_DEBUG=1): let unexpected exceptions keep their traceback."""
    return _DEBUG or os.environ.get("DSQ_DEBUG", "") not in ("", "0")


_DEBUG = False


def _one_line(text: object, limit: int = 2000) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _fail(e: BaseException, where: str | None = None) -> typer.Exit:
    """The CLI's last line of defence: one ``error:`` line and exit 2 for anything a command raises.

    DsqError carries its own message and exit code. Anything else is a dsq bug or an input dsq did not
    foresee: it is named by type, message and (when known) the file or argument, without a traceback
    unless --debug is given, in which case it is re-raised as is. Called without ``where`` (from a
    command's own ``except``), a non-dsq exception is re-raised for ``_guarded`` to report.
    """
    from dsq.dsquant.errors import DsqError

    if isinstance(e, DsqError):
        typer.secho(f"error: {_one_line(e)}", fg="red", err=True)
        return typer.Exit(e.exit_code)
    from dsq.dsquant.extras import missing_extra

    hint = missing_extra(e)
    if hint and not _debug():  # an optional package a plain `pip install dsq` does not bring
        typer.secho(f"error: {hint}", fg="red", err=True)
        return typer.Exit(2)
    if where is None or _debug():
        raise e  # the command's guard (_guarded) names the input, or --debug shows the traceback
    if isinstance(e, RecursionError):
        what = "input nested too deeply (RecursionError)"
    elif isinstance(e, MemoryError):
        what = "out of memory (MemoryError); an input asks for a size this machine cannot hold"
    else:
        what = f"{type(e).__name__}: {_one_line(e) or '(no message)'}"
    fname = getattr(e, "filename", None)
    if fname and str(fname) not in what:
        what = f"{fname}: {what}"
    prefix = f"{where}: " if where else ""  # the command's input: the best guess at what dsq choked on
    typer.secho(f"error: {prefix}{what} (unexpected; rerun with --debug for the traceback)", fg="red", err=True)
    return typer.Exit(2)


# Parameters that name a command's output (for "nothing written to OUT") and its main input (for errors).
_OUTPUT_PARAMS = ("output", "json_out", "html_out")
_INPUT_PARAMS = ("model", "path", "quant")


def _guarded(func):
    """Wrap a command so no exception leaves it as a traceback and Ctrl-C exits 130 naming the output."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        sigint = _SigintSeen()
        try:
            with sigint:
                return func(*args, **kwargs)
        except KeyboardInterrupt:
            raise _interrupted(kwargs) from None
        except (typer.Exit, typer.Abort, click.exceptions.ClickException):
            raise
        except Exception as e:
            # Ctrl-C inside an import, or caught by a library and re-raised as another error (a half-imported
            # extension module then fails with ImportError): still an interruption.
            if sigint.seen or _caused_by_interrupt(e):
                raise _interrupted(kwargs) from None
            inputs = [kwargs[k] for k in _INPUT_PARAMS if kwargs.get(k) is not None]
            where = " ".join(str(i) if not isinstance(i, list) else " ".join(map(str, i)) for i in inputs)
            raise _fail(e, where) from None

    return wrapper


class _SigintSeen:
    """While active, records that SIGINT arrived (then raises KeyboardInterrupt as Python's default handler does)."""

    def __init__(self):
        self.seen = False
        self._previous = None

    def _handler(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _interrupted(kwargs: dict) -> typer.Exit:
    """Ctrl-C: say so, naming the outputs. They are written atomically (temp sibling + rename), so none exists."""
    outs = [str(kwargs[k]) for k in _OUTPUT_PARAMS if kwargs.get(k) is not None]
    typer.secho(f"interrupted; nothing written{' to ' + ', '.join(outs) if outs else ''}", fg="red", err=True)
    return typer.Exit(130)


def _caused_by_interrupt(e: BaseException | None) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _check_report_paths(**flags: Path | None) -> None:
    """Refuse --json/--html targets that cannot be files before the (long) run, not after it."""
    from dsq.dsquant.errors import OutputError

    for flag, path in flags.items():
        if path is None:
            continue
        if path.is_dir():
            raise OutputError(f"--{flag} {path}: is a directory; give a file name")
        if not path.parent.is_dir():
            raise OutputError(f"--{flag} {path}: the folder {path.parent} does not exist")


class _GuardedTyper(typer.Typer):
    """A Typer whose every command is wrapped by ``_guarded``."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)
        return lambda func: (register(_guarded(func)), func)[1]


app = _GuardedTyper(
    help="Quantize distilled LLMs (FP8/int8/int4) and deploy them to GGUF and ONNX.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

MODEL_HELP = "HF checkpoint directory, hub id (org/name), or `default` (the bundled SmolLM2-135M-Instruct)."


def _targets_help() -> str:
    from dsq.export import EXPORTERS

    return ", ".join(EXPORTERS)


def _gguf_types_help() -> str:
    """--type's help, from the registry (export/gguf_policy.py: gguf-py and numpy, no torch)."""
    from dsq.export.gguf_policy import ALIASES, TYPE_NAMES

    aliases = ", ".join(ALIASES)
    return ("auto (default: carry dsq's values, nearest type otherwise; a type applies llama.cpp's "
            f"per-tensor policy for that file type; {aliases} = the _M mixes), " + ", ".join(TYPE_NAMES))


Recipe = Annotated[str, typer.Option("--recipe", "-r", help="Preset (int4, int8, fp8) or a recipe TOML file.")]
AllowUnmapped = Annotated[
    bool, typer.Option("--allow-unmapped", help="Keep tensors the architecture table does not know, unquantized.")
]


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the Python traceback of unexpected errors (or set DSQ_DEBUG=1).")
    ] = False,
) -> None:
    """Options for every command (before its name: `dsq --debug quantize ...`)."""
    global _DEBUG
    _DEBUG = debug


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help=MODEL_HELP, metavar="MODEL")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output directory (created; refused if it exists).")],
    recipe: Recipe = "int4",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    allow_unmapped: AllowUnmapped = False,
    method: Annotated[str, typer.Option(help="rtn (round to nearest, no data), or calibrated: gptq, awq, imatrix.")] = "rtn",
    calib: Annotated[str, typer.Option(help="Calibration set (`dsq calib list`) or a .txt/.jsonl file.")] = "mixed",
    samples: Annotated[int, typer.Option(help="Calibration sequences (windows sampled from --calib).")] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 512,
    seed: Annotated[int, typer.Option(help="Calibration sampling seed.")] = 0,
    min_expert_tokens: Annotated[
        int, typer.Option(help="Fail if a routed expert sees fewer calibration tokens than this.")
    ] = 0,
    work_dir: Annotated[
        Path | None, typer.Option(help="Keep per-layer calibration results (or, with --executor ray, finished "
                                  "units and the partial output) here; a rerun resumes from them.")
    ] = None,
    executor: Annotated[
        str, typer.Option(help="local (this process), or ray: units of work (attention, each expert, ...) as Ray "
                          "tasks; needs Ray (dsq's `ray` extra) and a filesystem every node mounts at the same path.")
    ] = "local",
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster to use (`auto`: the one `ray start` made here; default: a new "
                                 "local one, or $RAY_ADDRESS).")
    ] = None,
    task_cpus: Annotated[
        int, typer.Option(help="With --executor ray: CPUs each task asks for and torch threads it runs. Calibrated "
                          "output equals a local run with this many torch threads (OMP_NUM_THREADS).")
    ] = 1,
    imatrix_out: Annotated[Path | None, typer.Option(
        help="Also write the calibration statistics as a llama.cpp imatrix (GGUF; legacy format if it ends in .dat)."
    )] = None,
    imatrix: Annotated[Path | None, typer.Option(
        help="Use this llama.cpp imatrix file (GGUF or .dat) as the importance of --method imatrix."
    )] = None,
    target_size: Annotated[str | None, typer.Option(
        "--target-size", help="Choose per-tensor GGUF types for the least predicted KL with `dsq export OUT --to gguf` "
                              "at most this big (105MB); quantizes the tensors whose type dsq holds exactly.")] = None,
    target_bpw: Annotated[float | None, typer.Option(
        "--target-bpw", help="As --target-size, in bits per weight of the GGUF (4.8).")] = None,
    gguf_type: Annotated[str | None, typer.Option(
        "--gguf-type", help="Quantize each linear straight into the type llama.cpp's policy for this file type gives "
                            "it (q4_k_m, q4_0, q5_k_m, ...), so --method gptq/awq/imatrix fit that very grid and "
                            "`dsq export OUT --to gguf` carries it byte for byte.")] = None,
) -> None:
    """Quantize MODEL into a checkpoint transformers and vLLM load, plus dsq-report.json."""
    from dsq.dsquant.progress import progress
    from dsq.dsquant.quantize import quantize_checkpoint
    from dsq.dsquant.render import print_summary

    try:
        calibration = None
        from dsq.dsquant.errors import InputError

        if executor not in ("local", "ray"):
            raise InputError(f"--executor {executor}: choose local or ray")
        runner = None
        if executor == "ray":
            from dsq.dsquant.ray_executor import RayExecutor

            runner = RayExecutor(ray_address, work_dir, task_cpus=task_cpus)
        if method != "rtn" or imatrix_out or imatrix:  # rtn with an imatrix flag: the spec refuses it
            from dsq.dsquant.calib.hook import CalibSpec
            from dsq.dsquant.calib.methods import CalibOptions

            calibration = CalibSpec(method, calib, samples, seqlen, seed, str(work_dir) if work_dir else None,
                                    CalibOptions(fail_below_tokens=min_expert_tokens),
                                    str(imatrix_out) if imatrix_out else None, str(imatrix) if imatrix else None)
        record = None
        budgeted = target_size is not None or target_bpw is not None
        if budgeted or gguf_type is not None:  # per-tensor GGUF types (export/gguf_budget.py) decide the formats
            import tempfile

            from dsq.export.gguf_budget import budget_recipe, policy_recipe

            flags = "--target-size/--target-bpw" if budgeted else "--gguf-type"
            if budgeted and gguf_type is not None:
                raise InputError("--gguf-type follows llama.cpp's policy, --target-size/--target-bpw search: give one")
            if recipe != "int4":
                raise InputError(f"{flags} choose every tensor's format: leave out --recipe")
            if Path(output).exists() and not overwrite:
                raise InputError(f"{output}: exists; pass --overwrite to replace it")
            recipe = str(Path(tempfile.mkdtemp(prefix="dsq-types-")) / "types.toml")
            record = (budget_recipe(model, output, Path(recipe), target_size=target_size, target_bpw=target_bpw,
                                    calib=calib) if budgeted else policy_recipe(model, Path(recipe), gguf_type))
        calib_bar = progress(f"calibrate ({method})", "layers") if calibration else contextlib.nullcontext()
        with calib_bar as calib_progress, progress(f"quantize → {output}", "tensors") as bar:
            report = quantize_checkpoint(
                model, output, recipe, overwrite=overwrite, allow_unmapped=allow_unmapped, progress=bar,
                calibration=calibration, calib_progress=calib_progress, executor=runner,
            )
        if record is not None:
            import shutil

            from dsq.export.gguf_budget import write_record

            shutil.rmtree(Path(recipe).parent, ignore_errors=True)
            write_record(output, record)
            if "budget" in record:
                report["budget"] = record["budget"]
    except Exception as e:
        raise _fail(e) from None
    print_summary(report, output)


@app.command()
def plan(
    model: Annotated[str, typer.Argument(help=MODEL_HELP, metavar="MODEL")],
    recipe: Recipe = "int4",
    allow_unmapped: AllowUnmapped = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    summary: Annotated[bool, typer.Option("--summary", help="Print the totals only, not every tensor.")] = False,
    cluster: Annotated[
        str | None, typer.Option(help="Estimate `--executor ray` per node instead: 'Nx(cpus=C,mem=M[,gpus=G])', "
                                 "e.g. '8x(cpus=32,mem=256GB)'.")
    ] = None,
    fs_gbps: Annotated[float, typer.Option(help="With --cluster: shared-filesystem GB/s per node.")] = 1.0,
    method: Annotated[str, typer.Option(help="With --cluster: rtn, or a calibrated run (gptq, awq, imatrix) "
                                        "with --samples x --seqlen tokens.")] = "rtn",
    samples: Annotated[int, typer.Option(help="With --cluster --method: calibration sequences.")] = 128,
    seqlen: Annotated[int, typer.Option(help="With --cluster --method: tokens per sequence.")] = 512,
    task_cpus: Annotated[int, typer.Option(help="With --cluster --method: CPUs per Ray task.")] = 1,
    net_gbps: Annotated[float, typer.Option(help="With --cluster --method: network GB/s per node.")] = 1.25,
) -> None:
    """Show what a recipe will do to every tensor (reads headers only, no weights)."""
    from dsq.dsquant.checkpoint import Checkpoint
    from dsq.dsquant.plan import make_plan
    from dsq.dsquant.recipes import load_recipe
    from dsq.dsquant.render import print_plan

    try:
        if method != "rtn" and cluster is None:
            from dsq.dsquant.errors import InputError

            raise InputError(f"--method {method}: estimates a calibrated Ray run; give --cluster too")
        p = make_plan(Checkpoint(model), load_recipe(recipe), allow_unmapped)
        if cluster is not None:
            import json

            from dsq.dsquant.cluster_plan import estimate, parse_cluster, render

            spec = parse_cluster(cluster)
            if method != "rtn":  # calibrated: layers in sequence, each layer's work over the cluster
                from dsq.dsquant.calib.methods import get_method
                from dsq.dsquant.cluster_calib import CalibRun, estimate_calibrated, render_calibrated

                get_method(method)
                est = estimate_calibrated(p, spec, CalibRun(method, samples, seqlen, task_cpus=task_cpus), fs_gbps,
                                          net_gbps)
                typer.echo(json.dumps(est, indent=2) if json_out else render_calibrated(est))
                return
            est = estimate(p, spec, fs_gbps)
            typer.echo(json.dumps(est, indent=2) if json_out else render(est))
            return
    except Exception as e:
        raise _fail(e) from None
    print_plan(p, as_json=json_out, summary_only=summary)


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A safetensors directory or file, an ONNX export folder, a .gguf or .onnx file.", metavar="PATH")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the description as JSON.")] = False,
) -> None:
    """Describe a model file or directory: architecture, tensors, dtypes, quantization."""
    from dsq.dsquant.inspect import describe
    from dsq.dsquant.render import print_description

    try:
        desc = describe(path)
        if desc.kind == "onnx":  # refuse external data that points outside the folder, as every ONNX load does
            from dsq.export.onnx_guard import check_onnx_file

            check_onnx_file(path if path.is_file() else path / "model.onnx")
    except Exception as e:
        raise _fail(e) from None
    print_description(desc, as_json=json_out)


# -- runtimes: dsq runtimes / run / chat / eval / bench (issue 7) ------------------------------------
RuntimeOpt = Annotated[
    str, typer.Option("--runtime", help="auto (first that reads the model), a name from `dsq runtimes`, or all.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, metal, coreml, dml (see `dsq runtimes`).")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="CPU threads (default: the runtime's own).")]


@app.command()
def runtimes(json_out: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """List runtime backends (built-in and plugins), the devices each can use here, and why not."""
    from dsq.runtimes.console import list_runtimes

    list_runtimes(as_json=json_out)


@app.command()
def run(
    model: Annotated[Path, typer.Argument(help="A .gguf file, an ONNX export folder, or a dsq/HF directory.", metavar="MODEL")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt.")],
    runtime: RuntimeOpt = "auto",
    device: DeviceOpt = "cpu",
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most new tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: keep tokens up to this probability mass.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens; 0 keeps all.")] = 0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")] = False,
    hide_think: Annotated[bool, typer.Option("--hide-think", help="Hide <think> blocks instead of dimming.")] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Generate a reply to one prompt, streamed."""
    from dsq.runtimes.base import Sampling
    from dsq.runtimes.console import run_prompt

    try:
        run_prompt(model, prompt, runtime, device, max_tokens, Sampling(temperature, top_k, top_p, seed), raw,
                   hide_think, threads)
    except Exception as e:
        raise _fail(e) from None


@app.command()
def chat(
    model: Annotated[Path, typer.Argument(help="A .gguf file, an ONNX export folder, or a dsq/HF directory.", metavar="MODEL")],
    runtime: RuntimeOpt = "auto",
    device: DeviceOpt = "cpu",
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most new tokens per reply.")] = 1024,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy (R1 distills: 0.6).")] = 0.6,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: keep tokens up to this probability mass.")] = 0.95,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    hide_think: Annotated[bool, typer.Option("--hide-think", help="Hide <think> blocks instead of dimming.")] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Chat in the terminal with the model's chat template; R1 reasoning is shown dimmed."""
    from dsq.runtimes.base import Sampling
    from dsq.runtimes.console import chat_loop, read_stdin_lines

    try:
        chat_loop(model, runtime, device, max_tokens, Sampling(temperature, 0, top_p, seed), hide_think, system,
                  threads, read=None if sys.stdin.isatty() else read_stdin_lines())
    except Exception as e:
        raise _fail(e) from None


@app.command("eval")
def eval_(
    quant: Annotated[list[Path], typer.Argument(help="Model(s) to check: .gguf, ONNX export folder, dsq/HF directory.", metavar="MODEL")],
    ref: Annotated[Path, typer.Option("--ref", help="The reference model: a bf16/fp16 HF directory, or `default`.")],
    text: Annotated[str, typer.Option(
        "--text", help="UTF-8 text file to score on, or a shipped text: heldout (in no calibration set), prose, code."
    )] = "heldout",
    runtime: RuntimeOpt = "auto",
    ref_runtime: Annotated[str, typer.Option("--ref-runtime", help="Runtime for the reference (auto: torch).")] = "auto",
    device: DeviceOpt = "cpu",
    ctx: Annotated[int, typer.Option(help="Tokens per chunk.")] = 256,
    chunks: Annotated[int, typer.Option(help="Most chunks to score (from the start of the text).")] = 16,
    top_k: Annotated[int, typer.Option(help="Most reference logits kept per token in the cache.")] = 1024,
    coverage: Annotated[float, typer.Option(help="Keep reference tokens until they hold this probability.")] = 0.99,
    max_kld: Annotated[float | None, typer.Option(help="Fail if mean KL divergence is above this.")] = None,
    min_top1: Annotated[float | None, typer.Option(help="Fail if top-1 agreement (0..1) is below this.")] = None,
    max_ppl_ratio: Annotated[float | None, typer.Option(help="Fail if PPL / reference PPL is above.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON.")] = None,
    html_out: Annotated[Path | None, typer.Option("--html", help="Write an HTML report with plots.")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Reference-logit cache (default ~/.cache/dsq).")] = None,
    reasoning: Annotated[int, typer.Option(help="Also answer fixed math prompts greedily, N new tokens each.")] = 0,
    min_answer_agree: Annotated[float | None, typer.Option(help="Fail if fewer answers (0..1) match the ref's.")] = None,
    max_loops: Annotated[int | None, typer.Option(help="Fail if more answers end in a repetition loop.")] = None,
    threads: ThreadsOpt = None,
) -> None:
    """Accuracy gate: PPL, KL divergence and top-1 agreement of each model/runtime against the reference."""
    from dsq.runtimes.console import eval_command
    from dsq.runtimes.eval.evaluate import EvalSettings

    try:
        _check_report_paths(json=json_out, html=html_out)
        settings = EvalSettings(ctx=ctx, chunks=chunks, top_k=top_k, coverage=coverage, device=device, threads=threads,
                                ref_runtime=ref_runtime, cache_dir=cache_dir, reasoning_tokens=reasoning)
        limits = {"max_kld": max_kld, "min_top1": min_top1, "max_ppl_ratio": max_ppl_ratio,
                  "min_answer_agree": min_answer_agree, "max_loops": max_loops}
        ok = eval_command(quant, ref, runtime, text, settings, limits, json_out, html_out)
    except Exception as e:
        raise _fail(e) from None
    if not ok:
        raise typer.Exit(1)


@app.command()
def bench(
    model: Annotated[list[Path], typer.Argument(help="Model(s): .gguf, ONNX export folder, dsq/HF directory.", metavar="MODEL")],
    runtime: RuntimeOpt = "auto",
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length in tokens (prefill).")] = 128,
    new_tokens: Annotated[int, typer.Option(help="Tokens to decode per run (EOS ignored).")] = 64,
    runs: Annotated[int, typer.Option(help="Measured runs; the median is reported.")] = 3,
    warmup: Annotated[int, typer.Option(help="Warm-up runs, not measured.")] = 1,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON.")] = None,
    html_out: Annotated[Path | None, typer.Option("--html", help="Write an HTML report with plots.")] = None,
) -> None:
    """Prefill and decode tokens/s, time to first token, peak RSS (median of runs, warm-up excluded)."""
    from dsq.runtimes.console import bench_command

    try:
        _check_report_paths(json=json_out, html=html_out)
        bench_command(model, runtime, device, threads, prompt_tokens, new_tokens, runs, warmup, json_out, html_out)
    except Exception as e:
        raise _fail(e) from None


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="A dsq quantized checkpoint, an HF checkpoint directory or hub id, or `default`.", metavar="MODEL")],
    to: Annotated[str, typer.Option("--to", help=f"Target format: {_targets_help()}.")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Output file (gguf) or folder (onnx); default: beside MODEL, named MODEL.gguf / MODEL-onnx."
    )] = None,
    type_: Annotated[str | None, typer.Option("--type", help=f"GGUF file type: {_gguf_types_help()}.")] = None,
    pure: Annotated[bool, typer.Option("--pure", help="GGUF: the --type everywhere, no llama.cpp policy (llama-quantize --pure).")] = False,
    imatrix: Annotated[Path | None, typer.Option(
        "--imatrix", help="GGUF: a llama.cpp imatrix file (GGUF or .dat) weighting every re-rounded tensor, as llama-quantize --imatrix.")] = None,
    recipe: Annotated[str | None, typer.Option("--recipe", "-r", help="Quantize a float checkpoint on the way.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    split_max_size: Annotated[
        str | None, typer.Option("--split-max-size", help="GGUF: split into files of at most this size (500M, 2G).")
    ] = None,
    ep: Annotated[str | None, typer.Option("--ep", help="ONNX: execution provider to target: cpu, cuda, dml, coreml.")] = None,
    int4_block: Annotated[int | None, typer.Option("--int4-block", help="ONNX: int4 block of a float source: 32, 64, 128.")] = None,
    attention: Annotated[str | None, typer.Option(help="ONNX: auto (default: contrib where onnxruntime has it), plain (standard ops; custom position_ids) or contrib (GroupQueryAttention, SkipSimplifiedLayerNormalization).")] = None,
    accuracy_level: Annotated[
        int | None, typer.Option(help="ONNX: MatMulNBits accuracy_level (0 exact float math; CPU default 4).")
    ] = None,
    embed: Annotated[str | None, typer.Option(
        "--embed", help="ONNX: quantize the embedding to this dsq format (int8_g32, int4_sym_g32, ...; "
                        "GatherBlockQuantized); default: the recipe's embed role, else float32 (the 16-bit values "
                        "the default GGUF export writes as token_embd).")] = None,
    lm_head: Annotated[str | None, typer.Option(
        "--lm-head", help="ONNX: the lm_head's dsq format (a tied model's one shared matrix); default: the "
                          "recipe's lm_head role: the int4/int8 presets keep it 16-bit, so the ONNX holds it in "
                          "float32 with the default GGUF's output values. int4_sym_g32 / int8_g32 carry GGUF "
                          "Q4_0 / Q8_0 values (`--type q4_0 --pure`; llama.cpp's Q4_0 policy gives a tied "
                          "matrix Q8_0) at about onnxruntime-genai's file size.")] = None,
    precision: Annotated[str | None, typer.Option(
        "--precision", help="ONNX: fp32 (default) or fp16 activations and KV cache (for CUDA/DirectML).")] = None,
    dtype: Annotated[str | None, typer.Option(
        "--dtype", help="MLX: float16 (default; asymmetric int4 biases rounded within half an fp16 ulp) or float32 "
                        "(every value exactly dsq's).")] = None,
    target_size: Annotated[str | None, typer.Option(
        "--target-size", help="GGUF from a float MODEL: choose each tensor's type for the least predicted KL "
                              "with the file at most this big (105MB, 1.2GB, 100MiB or bytes).")] = None,
    target_bpw: Annotated[float | None, typer.Option(
        "--target-bpw", help="GGUF: as --target-size, in bits per weight of the whole file (4.8).")] = None,
    calib: Annotated[str | None, typer.Option(
        help="GGUF --target-size/--target-bpw: calibration set (`dsq calib list`) or file (default mixed).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the whole export report as JSON.")] = False,
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip `dsq check` of the output against MODEL.")] = False,
) -> None:
    """Export MODEL to a runtime format (GGUF for llama.cpp, ONNX for onnxruntime, MLX for mlx_lm), keeping dsq's quantized values."""
    import json

    from dsq.dsquant.progress import progress
    from dsq.dsquant.render import print_export_summary
    from dsq.export import export_model

    given = {"type": type_, "recipe": recipe, "split_max_size": split_max_size, "ep": ep, "int4_block": int4_block,
             "attention": attention, "accuracy_level": accuracy_level, "pure": pure or None, "dtype": dtype,
             "imatrix": imatrix, "embed": embed, "lm_head": lm_head, "precision": precision,
             "target_size": target_size, "target_bpw": target_bpw, "calib": calib}
    try:
        with progress(f"export → {to}", "tensors") as bar:
            out, report = export_model(model, to, output, overwrite=overwrite, progress=bar, check=not no_check,
                                       **{k: v for k, v in given.items() if v is not None})
    except Exception as e:
        raise _fail(e) from None
    checked = report.get("check")
    if json_out:
        typer.echo(json.dumps({"output": str(out), **report}, indent=2, default=str))
    else:
        print_export_summary(to, out, report)
        if checked is not None:
            from dsq.runtimes.check import print_report

            print_report(checked)
    if checked is not None and checked.get("passed") is False:
        typer.secho(f"error: the export does not behave like {model}: {checked['first_failure']}", fg="red", err=True)
        raise typer.Exit(1)


@app.command()
def check(
    export: Annotated[Path, typer.Argument(help="A .gguf file or an ONNX export folder.")],
    ref: Annotated[Path, typer.Option("--ref", help="The source model (HF directory with its tokenizer).")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON.")] = None,
    greedy: Annotated[bool, typer.Option(help="Also compare the greedy first 16 tokens with torch on --ref.")] = True,
    threads: ThreadsOpt = None,
) -> None:
    """Does EXPORT behave like --ref with the runtime's own tokenizer: ids, BOS/EOS, chat prompt, stop tokens."""
    import json

    from dsq.runtimes.check import check_export, print_report

    try:
        result = check_export(export, ref, greedy=greedy, threads=threads).to_json()
    except Exception as e:
        raise _fail(e) from None
    print_report(result)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
    if not result["passed"]:
        typer.secho(f"error: {export}: {result['first_failure']}", fg="red", err=True)
        raise typer.Exit(1)


calib_app = _GuardedTyper(help="Calibration data for --method gptq|awq|imatrix.", no_args_is_help=True)
app.add_typer(calib_app, name="calib")


@calib_app.command("list")
def calib_list(json_out: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """The shipped calibration sets: size, documents, source and licence."""
    from dsq.dsquant.calib.data import list_sets
    from dsq.dsquant.calib.render import print_sets

    try:
        rows = list_sets()
    except Exception as e:
        raise _fail(e) from None
    print_sets(rows, as_json=json_out)


def main() -> None:  # pragma: no cover
    try:
        sys.exit(app())
    except KeyboardInterrupt:  # Ctrl-C while parsing arguments, before a command's own guard
        typer.secho("interrupted; nothing written", fg="red", err=True)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
