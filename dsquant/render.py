"""Terminal rendering (rich) of plans, reports and descriptions. Library code returns data; this prints it."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .plan import Plan, human_bytes

console = Console()


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
    table = Table(title=f"dsq plan: {plan.checkpoint.path.name} ({summary['architecture']}) with recipe `{plan.recipe.name}`")
    for col, just in (("tensor", "left"), ("role", "left"), ("shape", "right"), ("source", "left"),
                      ("format", "left"), ("bytes", "right"), ("bits/w", "right"), ("note", "left")):
        table.add_column(col, justify=just, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["role"], "x".join(map(str, r["shape"])), r["source_dtype"],
                      r["format"], human_bytes(r["bytes"]), f"{r['bits_per_weight']:.2f}", r["note"])
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
    table = Table(title=f"dsq quantize: {report['architecture']}, recipe `{report['recipe']['name']}`")
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
        f"layout {report['layout']}; report: {output / 'dsq-report.json'}"
    )


def print_description(d) -> None:
    console.print(f"[bold]{d.path}[/] ({d.kind}{', ' + d.architecture if d.architecture else ''})")
    for k, v in d.facts.items():
        text = json.dumps(v) if not isinstance(v, str) else v
        console.print(f"  {k}: {text if len(text) < 200 else text[:200] + '…'}")
    console.print(f"  dtypes: {json.dumps(d.dtype_counts)}")
    table = Table(show_edge=False)
    for col in ("tensor", "type", "shape", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    for name, dtype, shape, nbytes in d.tensors:
        table.add_row(name, dtype, "x".join(map(str, shape)), human_bytes(nbytes))
    console.print(table)
