"""dsq's command line: parse, call the library, print. Heavy modules are imported inside commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Quantize distilled LLMs (FP8/int8/int4) and deploy them to GGUF and ONNX.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

Recipe = Annotated[str, typer.Option("--recipe", "-r", help="Preset (int4, int8, fp8) or a recipe TOML file.")]
AllowUnmapped = Annotated[
    bool, typer.Option("--allow-unmapped", help="Keep tensors the architecture table does not know, unquantized.")
]


def _fail(e: Exception) -> typer.Exit:
    from dsq.dsquant.errors import DsqError

    if isinstance(e, DsqError):
        typer.secho(f"error: {e}", fg="red", err=True)
        return typer.Exit(e.exit_code)
    raise e


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="HF checkpoint directory or hub id.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output directory.")],
    recipe: Recipe = "int4",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    allow_unmapped: AllowUnmapped = False,
) -> None:
    """Quantize MODEL into a checkpoint transformers and vLLM load, plus dsq-report.json."""
    from dsq.dsquant.progress import tensor_progress
    from dsq.dsquant.quantize import quantize_checkpoint
    from dsq.dsquant.render import print_summary

    try:
        with tensor_progress(f"quantize → {output}") as progress:
            report = quantize_checkpoint(
                model, output, recipe, overwrite=overwrite, allow_unmapped=allow_unmapped, progress=progress
            )
    except Exception as e:
        raise _fail(e) from None
    print_summary(report, output)


@app.command()
def plan(
    model: Annotated[str, typer.Argument(help="HF checkpoint directory or hub id.")],
    recipe: Recipe = "int4",
    allow_unmapped: AllowUnmapped = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Show what a recipe will do to every tensor (reads headers only, no weights)."""
    from dsq.dsquant.checkpoint import Checkpoint
    from dsq.dsquant.plan import make_plan
    from dsq.dsquant.recipes import load_recipe
    from dsq.dsquant.render import print_plan

    try:
        p = make_plan(Checkpoint(model), load_recipe(recipe), allow_unmapped)
    except Exception as e:
        raise _fail(e) from None
    print_plan(p, as_json=json_out)


@app.command()
def inspect(path: Annotated[Path, typer.Argument(help="A safetensors directory or file, a .gguf or a .onnx file.")]) -> None:
    """Describe a model file or directory: architecture, tensors, dtypes, quantization."""
    from dsq.dsquant.inspect import describe
    from dsq.dsquant.render import print_description

    try:
        desc = describe(path)
    except Exception as e:
        raise _fail(e) from None
    print_description(desc)


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
