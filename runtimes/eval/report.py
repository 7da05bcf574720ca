"""Presenting ``dsq eval`` / ``dsq bench`` results: a terminal table, JSON for CI, a self-contained HTML page.

The HTML page embeds its matplotlib figures as PNG data URIs so it is one file to attach to a CI run.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from .evaluate import Report


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def eval_rows(report: Report) -> list[list[str]]:
    rows = []
    for r in report.results:
        name = Path(r.model).name + (" (ref)" if r.is_reference else "")
        status = r.verdict
        rows.append([
            name, r.description, _mb(r.file_size), f"{r.ppl:.4f}", f"{r.ppl_ratio:.4f}",
            "-" if r.is_reference else f"{r.kld_mean:.5f}", "-" if r.is_reference else f"{r.kld_median:.5f}",
            "-" if r.is_reference else f"{r.kld_p99:.4f}",
            f"{100 * r.top1:.2f}%",
            *([] if report.results[0].answer_agree is None else
              [f"{round(r.answer_agree * len(r.answers))}/{len(r.answers)} same, {r.loops} loops"]),
            status,
        ])
    return rows


def eval_header(report: Report) -> list[str]:
    extra = [] if report.results[0].answer_agree is None else ["math answers"]
    return [*EVAL_HEADER[:-1], *extra, EVAL_HEADER[-1]]


EVAL_HEADER = ["model", "runtime", "size", "PPL", "PPL ratio", "KLD mean", "KLD median", "KLD p99", "top-1", "gate"]


def print_eval(report: Report, console=None) -> None:
    from rich.markup import escape
    from rich.table import Table

    from dsq.dsquant.render import make_console

    console = console or make_console()
    t = Table(title=escape(f"dsq eval: {report.results[0].tokens} tokens of {Path(report.text).name}, "
                           f"ctx {report.settings['ctx']}, reference {Path(report.reference).name}"
                           f"{' (cached logits)' if report.ref_cached else ''}"))
    for h in eval_header(report):
        t.add_column(h, justify="left" if h in ("model", "runtime") else "right")
    for row in eval_rows(report):
        style = {"FAIL": "red", "PASS": "green"}.get(row[-1])
        t.add_row(*(escape(c) for c in row[:-1]), f"[{style}]{row[-1]}[/]" if style else row[-1])
    console.print(t)
    console.print(gate_line(report), style="dim", markup=False)
    console.print(f"KLD in nats: reference tokens covering {report.settings['coverage']:g} of the mass exactly, the rest "
                  "as one bucket (a lower bound, ~2 % low; see dsq.runtimes.eval.evaluate)", style="dim")


def gate_line(report: Report) -> str:
    """What the gate column means for this run: the thresholds applied, or that none was asked for."""
    asked = {k: v for k, v in report.thresholds.items() if v is not None}
    if not asked:
        return ("gate: no thresholds given, so no verdict (the figures are measurements only); add --max-kld, "
                "--min-top1 or --max-ppl-ratio to make dsq eval exit 1 when one fails")
    return "gate: " + ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in asked.items())


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_json(data: dict, path: Path) -> None:
    from dsq.dsquant.atomic import atomic_file

    with atomic_file(Path(path), overwrite=True, mode="w") as f:
        f.write(json.dumps(data, indent=2) + "\n")


# -- HTML ----------------------------------------------------------------------------------------------
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _label(r) -> str:
    return f"{Path(r.model).name}\n{r.runtime}"


def eval_figures(report: Report) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    cands = [r for r in report.results if not r.is_reference and r.kld_tokens is not None]
    if cands:
        fig, ax = plt.subplots(figsize=(8, 4))
        bins = np.logspace(-6, 1, 50)
        for r in cands:
            ax.hist(np.clip(r.kld_tokens, 1e-6, 10), bins=bins, histtype="step", linewidth=1.6,
                    label=f"{Path(r.model).name} [{r.runtime}] mean {r.kld_mean:.4f}")
        ax.set_xscale("log")
        ax.set_xlabel("per-token KL divergence (nats, log scale; < 1e-6 in the first bin)")
        ax.set_ylabel("tokens")
        ax.set_title("KL divergence from the reference, per token")
        ax.legend(fontsize=8)
        figs.append(("KLD distribution per runtime", _png(fig)))

    fig, ax = plt.subplots(figsize=(8, 3.6))
    rs = report.results
    palette = {"ref": "#888888", "-": "#3a6ea5", "PASS": "#2a9d3a", "FAIL": "#d62728"}
    ax.bar(range(len(rs)), [r.ppl for r in rs], color=[palette[r.verdict] for r in rs])
    ax.set_xticks(range(len(rs)), [_label(r) for r in rs], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("perplexity")
    ax.set_ylim(0, max(r.ppl for r in rs) * 1.12)  # bars compared by length: the axis starts at zero
    legend = "grey: reference" + ("; green: passes the gate, red: fails" if report.thresholds_asked else
                                  "; no gate asked for")
    ax.set_title(f"Perplexity ({legend})", fontsize=10)
    for i, r in enumerate(rs):
        ax.annotate(f"{r.ppl:.3f} (x{r.ppl_ratio:.3f})", (i, r.ppl), ha="center", va="bottom", fontsize=8)
    figs.append(("Perplexity", _png(fig)))

    if cands:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in cands:
            ax.scatter(r.file_size / 1e6, r.kld_mean, s=40)
            ax.annotate(f"{Path(r.model).name} [{r.runtime}]", (r.file_size / 1e6, r.kld_mean), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        # both axes from zero: a 0.1 % size difference must not look like a full-width gap
        ax.set_xlim(0, max(r.file_size / 1e6 for r in cands) * 1.35)
        ax.set_ylim(0, max(r.kld_mean for r in cands) * 1.25 or 1.0)
        ax.set_xlabel("model size (MB)")
        ax.set_ylabel("mean KLD (nats)")
        ax.set_title("Size vs KL divergence")
        figs.append(("Size vs KLD", _png(fig)))
    return figs


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:14px}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
.FAIL{color:#c00;font-weight:bold}.PASS{color:#080;font-weight:bold}img{max-width:100%;display:block;margin:1em 0}
.note{color:#666;font-size:13px}"""


def html_page(title: str, header: list[str], rows: list[list[str]], figures: list[tuple[str, str]],
              notes: list[str]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="{esc(c)}">{esc(c)}</td>' for c in r) + "</tr>" for r in rows
    )
    figs = "".join(f"<h2>{esc(t)}</h2><img alt='{esc(t)}' src='{src}'>" for t, src in figures)
    note = "".join(f"<p class='note'>{esc(n)}</p>" for n in notes)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{_CSS}</style>"
            f"</head><body><h1>{esc(title)}</h1><table><tr>{head}</tr>{body}</table>{note}{figs}</body></html>\n")


def write_eval_html(report: Report, path: Path) -> None:
    from dsq.dsquant.atomic import atomic_file

    st = report.settings
    notes = [
        f"Reference: {Path(report.reference).name}; text: {Path(report.text).name} (sha256 "
        f"{report.text_sha256[:16]}…); {report.results[0].tokens} scored tokens in {st['chunks']} chunks or fewer "
        f"of {st['ctx']} tokens; device {st['device']}.",
        gate_line(report) + ".",
        "KLD (nats) uses the reference's most likely tokens covering "
        f"{report.settings['coverage']:g} of the probability exactly and the rest as one bucket: a lower bound of the "
        "true KLD (measured ~2 % low on SmolLM2-135M); the JSON also has a rigorous but loose upper bound.",
    ]
    for r in report.results:
        notes += [f"FAIL {Path(r.model).name} [{r.runtime}]: {f}" for f in r.failures]
    page = html_page("dsq eval report", eval_header(report), eval_rows(report), eval_figures(report), notes)
    with atomic_file(Path(path), overwrite=True, mode="w") as f:
        f.write(page)


def write_bench_html(results, header: list[str], rows: list[list[str]], path: Path) -> None:
    """The ``dsq bench`` page: its table and tokens/s bars per model and runtime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsq.dsquant.atomic import atomic_file

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [f"{Path(r.model).name}\n{r.runtime}" for r in results]
    for ax, key, title in ((axes[0], "prefill_tok_s", "prefill tokens/s"), (axes[1], "decode_tok_s", "decode tokens/s")):
        vals = [getattr(r, key) for r in results]
        ax.bar(range(len(vals)), vals, color="#3a6ea5")
        ax.set_xticks(range(len(vals)), labels, fontsize=7, rotation=30, ha="right")
        ax.set_title(title)
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.1f}", (i, v), ha="center", va="bottom", fontsize=8)
    r0 = results[0]
    notes = [f"Median of {r0.runs} runs after {r0.warmup} warm-up; prompt {r0.prompt_tokens} tokens, {r0.new_tokens} "
             "new tokens (greedy, EOS ignored); threads per row; peak RSS sampled every 5 ms while the model was loaded."]
    page = html_page("dsq bench report", header, rows, [("Throughput", _png(fig))], notes)
    with atomic_file(Path(path), overwrite=True, mode="w") as f:
        f.write(page)
