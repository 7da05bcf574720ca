"""Terminal rendering (rich) of plans, reports and descriptions. Library code returns data; this prints it."""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .plan import Plan, human_bytes

# Off a terminal (a CI log, a pipe) rich would wrap everything at 80 columns: 272 tensor names became
# 1,395 lines. Tables there take the width they need.
_PIPE_WIDTH = 1000


def make_console(stderr: bool = False) -> Console:
    """A console for dsq's output: terminal width on a terminal, unwrapped tables elsewhere, no auto-highlight."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else _PIPE_WIDTH)


def natural_key(name: str) -> tuple:
    """Sort key that puts model.layers.2 before model.layers.10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


class _Console:
    """The module's console, made on first use so a test's redirected stdout is the one written to."""

    def __getattr__(self, attr):
        return getattr(make_console(), attr)


console = _Console()


def print_plan(plan: Plan, as_json: bool = False, summary_only: bool = False) -> None:
    rows = [
        {
            "name": e.name,
            "role": e.role,
            "shape": list(e.shape),
            "source_dtype": e.tensor.source_dtype,
            "format": e.format or "keep",
            "bytes": e.out_bytes,
            "bits_per_weight": round(e.bits_per_weight, 3),
            "note": e.note,
        }
        for e in plan.entries
    ]
    summary = {
        "architecture": plan.checkpoint.arch.model_type,
        "recipe": plan.recipe.name,
        "tensors": len(rows),
        "quantized": len(plan.quantized),
        "bytes_in": plan.in_bytes,
        "bytes_out": plan.out_bytes,
        "quantized_bits_per_weight": round(plan.bits_per_weight, 3),
        "peak_rss_estimate": plan.peak_rss_estimate,
    }
    if as_json:
        print(json.dumps({"summary": summary, "tensors": rows}, indent=2))
        return
    if summary_only:
        rows = []
    rows.sort(key=lambda r: natural_key(r["name"]))
    table = Table(title=escape(f"dsq plan: {plan.checkpoint.path.name} ({summary['architecture']}) "
                               f"with recipe `{plan.recipe.name}`"))
    for col, just in (("tensor", "left"), ("role", "left"), ("shape", "right"), ("source", "left"),
                      ("format", "left"), ("bytes", "right"), ("bits/w", "right"), ("note", "left")):
        table.add_column(col, justify=just, overflow="fold")
    for r in rows:
        table.add_row(escape(r["name"]), r["role"], "x".join(map(str, r["shape"])), escape(r["source_dtype"]),
                      r["format"], human_bytes(r["bytes"]), f"{r['bits_per_weight']:.2f}", escape(r["note"]))
    if rows:
        console.print(table)
    console.print(
        f"[bold]{summary['quantized']}[/] of {summary['tensors']} tensors quantized, "
        f"{human_bytes(summary['bytes_in'])} → [bold]{human_bytes(summary['bytes_out'])}[/] "
        f"({summary['quantized_bits_per_weight']:.2f} bits/weight in quantized tensors); "
        f"peak RAM estimate {human_bytes(summary['peak_rss_estimate'])}"
    )


def print_summary(report: dict, output: Path) -> None:
    s = report["summary"]
    by_role: dict[str, list[dict]] = defaultdict(list)
    for t in report["tensors"]:
        by_role[t["role"]].append(t)
    table = Table(title=escape(f"dsq quantize: {report['architecture']}, recipe `{report['recipe']['name']}`"))
    for col in ("role", "tensors", "format", "bytes in", "bytes out", "mean rel. RMSE", "worst rel. RMSE"):
        table.add_column(col, justify="left" if col in ("role", "format") else "right")
    for role, ts in sorted(by_role.items()):
        errs = [t["rel_rmse"] for t in ts if t["rel_rmse"] is not None]
        fmts = ", ".join(sorted({t["format"] or "keep" for t in ts}))
        table.add_row(role, str(len(ts)), fmts, human_bytes(sum(t["bytes_in"] for t in ts)),
                      human_bytes(sum(t["bytes_out"] for t in ts)),
                      f"{sum(errs) / len(errs):.4f}" if errs else "-", f"{max(errs):.4f}" if errs else "-")
    console.print(table)
    calib = report.get("calibration")
    if calib:
        layers = calib.get("layers") or []
        errs = [layer["rel_err"] for layer in layers if layer.get("rel_err") is not None]
        coverage = calib.get("expert_coverage") or []
        augmented = sum(1 for row in coverage if row.get("policy") != "routed")
        console.print(
            f"calibration: {calib.get('method')} on {calib.get('data', {}).get('source', '?')} "
            f"({calib.get('data', {}).get('tokens', '?')} tokens); "
            f"{len(layers)} layers, mean layer output error {sum(errs) / len(errs):.4f}" if errs else
            f"calibration: {calib.get('method')}"
        )
        if coverage:
            console.print(f"expert coverage: {len(coverage)} experts, {augmented} below the token threshold (see report)")
    console.print(
        f"{s['quantized_tensors']}/{s['tensors']} tensors quantized, {human_bytes(s['bytes_in'])} → "
        f"[bold]{human_bytes(s['bytes_out'])}[/] in {s['seconds']:.1f} s; "
        f"layout {report['layout']}; report: {escape(str(output / 'dsq-report.json'))}"
    )


def print_description(d, as_json: bool = False) -> None:
    tensors = sorted(d.tensors, key=lambda t: natural_key(t[0]))
    if as_json:
        print(json.dumps({"path": d.path, "kind": d.kind, "architecture": d.architecture, "facts": d.facts,
                          "dtypes": d.dtype_counts,
                          "tensors": [{"name": n, "type": t, "shape": list(s), "bytes": b} for n, t, s, b in tensors]},
                         indent=2, default=str))
        return
    console.print(f"[bold]{escape(d.path)}[/] ({d.kind}{escape(', ' + d.architecture) if d.architecture else ''})")
    for k, v in d.facts.items():
        text = json.dumps(v) if not isinstance(v, str) else v
        console.print(f"  {k}: {text if len(text) < 200 else text[:200] + '…'}", markup=False)
    console.print(f"  dtypes: {json.dumps(d.dtype_counts)}", markup=False)
    table = Table(show_edge=False)
    for col in ("tensor", "type", "shape", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    for name, dtype, shape, nbytes in tensors:
        table.add_row(escape(name), escape(dtype), "x".join(map(str, shape)), human_bytes(nbytes))
    console.print(table)


def print_export_summary(to: str, out: Path, report: dict) -> None:
    """A few human lines for ``dsq export`` (``--json`` prints the whole report instead)."""
    files = report.get("files") or [str(out)]
    size = report.get("bytes", 0)
    bpw = report.get("bits_per_weight")
    console.print(f"[bold]wrote {escape(str(out))}[/] ({human_bytes(size)}"
                  f"{f', {bpw:.2f} bits/weight' if bpw else ''}{f', {len(files)} files' if len(files) > 1 else ''}) "
                  f"in {report.get('seconds', 0):.1f} s")
    if "types" in report:  # GGUF
        exact, requant = report.get("exact", 0), report.get("requantized", 0)
        types = ", ".join(f"{t.upper()} x{n}" for t, n in sorted(report["types"].items(), key=lambda kv: -kv[1]))
        console.print(f"  tensor types: {types}; {exact} carried dsq's quantized values exactly"
                      f"{f', {requant} re-quantized (errors and reasons in the report)' if requant else ''}",
                      markup=False)
        floats: dict[str, list] = {}
        for r in report.get("tensors", []):
            if r["type"].upper() in ("F32", "F16", "BF16"):
                floats.setdefault(r["type"].upper(), []).append(r)
        for t, rows in sorted(floats.items()):
            big = max(rows, key=lambda r: r["bytes"])
            console.print(f"  kept {t}: {len(rows)} tensors, {human_bytes(sum(r['bytes'] for r in rows))} "
                          f"(largest {big['name']}, {human_bytes(big['bytes'])})", markup=False)
    if report.get("budget"):  # GGUF --target-size/--target-bpw (export/gguf_budget.py)
        b = report["budget"]
        console.print(f"  size budget {b['flag']} {b['target_bytes']:,} bytes: file {size:,} bytes, predicted KL "
                      f"{b['predicted_kl']:.4g} nats/token over {b['searched']} searched tensors "
                      f"({b['seconds']:.1f} s of calibration and search)", markup=False)
    for g in report.get("float32", []):  # ONNX
        console.print(f"  kept float32: {g['why']}: {g['tensors']} tensor(s), {human_bytes(g['bytes'])} "
                      f"(e.g. {g['example']})", markup=False)
    if report.get("matmulnbits"):
        console.print(f"  MatMulNBits: {', '.join(report['matmulnbits'])}", markup=False)
    for n in report.get("notes", []):
        console.print(f"  note: {n}", markup=False)
