"""What ``dsq runtimes / run / chat / eval / bench`` do, behind cli.py's thin typer functions."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from .base import Sampling


def _err() -> Console:
    return Console(stderr=True)


def _out() -> Console:
    """stdout; tables keep their columns when piped into a CI log (rich would wrap them at 80)."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 180)


def list_runtimes(console: Console | None = None) -> None:
    from rich.table import Table

    from .registry import backends

    console = console or _out()
    t = Table(title="dsq runtimes")
    for h in ("runtime", "from", "reads", "status", "devices", "version / why not", "other devices"):
        t.add_column(h)
    for b in backends().values():
        av = b.availability()
        reads = b.cls.model_kind if b.cls is not None else "?"
        t.add_row(b.name, b.source, reads, "[green]ok[/]" if av.ok else "[red]unavailable[/]",
                  ", ".join(av.devices) or "-", av.version if av.ok else av.reason, av.other_devices)
    console.print(t)


class ThinkPrinter:
    """Prints a streamed reply; ``<think>`` blocks dimmed, or hidden with a one-line placeholder."""

    def __init__(self, console: Console, hide: bool, in_think: bool):
        from .chat import ThinkSplitter

        self.console, self.hide = console, hide
        self.split = ThinkSplitter(in_think)
        self._hidden_note = False

    def _emit(self, text: str, think: bool) -> None:
        if think and self.hide:
            if not self._hidden_note:
                self.console.print("[dim](thinking…)[/]", end="")
                self._hidden_note = True
            return
        self.console.print(text, style="dim italic" if think else None, end="", markup=False, highlight=False)

    def feed(self, piece: str) -> None:
        for text, think in self.split.feed(piece):
            self._emit(text, think)

    def finish(self) -> None:
        for text, think in self.split.flush():
            self._emit(text, think)
        self.console.print()


def _prompt_text(rt, prompt: str, raw: bool, history: list[dict] | None = None, system: str | None = None) -> str:
    from .chat import render_chat

    if raw:
        return prompt
    msgs = ([{"role": "system", "content": system}] if system else []) + (history or [])
    msgs.append({"role": "user", "content": prompt})
    return render_chat(rt.chat_template, msgs, rt.special_tokens)


def run_prompt(model: Path, prompt: str, runtime: str, device: str, max_tokens: int, sampling: Sampling,
               raw: bool, hide_think: bool, threads: int | None, console: Console | None = None) -> None:
    from .base import GenerationStats
    from .chat import starts_in_think
    from .registry import load

    console = console or Console(highlight=False)
    with load(model, runtime, device, threads=threads, n_ctx=4096) as rt:
        text = _prompt_text(rt, prompt, raw)
        printer = ThinkPrinter(console, hide_think, starts_in_think(text) and not raw)
        st = GenerationStats()
        for piece in rt.generate(rt.encode_prompt(text, special=not raw), max_tokens, sampling, stats=st):
            printer.feed(piece)
        printer.finish()
        dec = st.new_tokens / st.decode_s if st.decode_s else 0.0
        _err().print(f"[dim]{rt.description}: {st.prompt_tokens} prompt + {st.new_tokens} new tokens, "
                     f"TTFT {1000 * st.first_token_s:.0f} ms, {dec:.1f} tok/s, stop: {st.stopped_by}[/]")


def chat_loop(model: Path, runtime: str, device: str, max_tokens: int, sampling: Sampling, hide_think: bool,
              system: str | None, threads: int | None, read: Callable[[], str] | None = None,
              console: Console | None = None) -> None:
    """Read user turns until EOF or /exit; the reply's reasoning is not fed back (as R1's template expects)."""
    from .chat import THINK_CLOSE, starts_in_think
    from .registry import load

    console = console or Console(highlight=False)
    read = read or (lambda: input(">>> "))
    history: list[dict] = []
    with load(model, runtime, device, threads=threads, n_ctx=4096) as rt:
        console.print(f"[dim]{Path(model).name} in {rt.description}; /exit or Ctrl-D ends, /reset clears history[/]")
        while True:
            try:
                user = read()
            except (EOFError, KeyboardInterrupt):
                console.print()
                return
            if user.strip() in ("/exit", "/quit"):
                return
            if user.strip() == "/reset":
                history.clear()
                continue
            if not user.strip():
                continue
            text = _prompt_text(rt, user, False, history, system)
            printer = ThinkPrinter(console, hide_think, starts_in_think(text))
            reply = ""
            for piece in rt.generate(rt.encode_prompt(text), max_tokens, sampling):
                printer.feed(piece)
                reply += piece
            printer.finish()
            answer = reply.rsplit(THINK_CLOSE, 1)[-1].strip()
            history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def eval_command(quants: list[Path], ref: Path, runtime: str, text: Path | None, settings, thresholds: dict,
                 json_out: Path | None, html_out: Path | None) -> bool:
    from rich.markup import escape

    from dsq.dsquant.errors import InputError
    from dsq.dsquant.eval_report import print_eval, write_eval_html, write_json
    from dsq.dsquant.evaluate import evaluate

    if text is None:
        raise InputError("--text FILE is needed: the text to measure perplexity and KL divergence on")
    err = _err()
    with err.status("dsq eval") as status:
        report = evaluate([(q, runtime) for q in quants], ref, text, settings, thresholds,
                          log=lambda m: status.update(f"dsq eval: {m}"))
    print_eval(report, _out())
    if json_out:
        write_json(report.to_json(), json_out)
    if html_out:
        write_eval_html(report, html_out)
    for r in report.results:
        for f in r.failures:
            err.print(f"[red]FAIL[/] {escape(f'{r.model} [{r.runtime}]: {f}')}", highlight=False)
    return report.passed


def bench_command(models: list[Path], runtime: str, device: str, threads: int | None, prompt_tokens: int,
                  new_tokens: int, runs: int, warmup: int, json_out: Path | None, html_out: Path | None = None) -> None:
    from rich.table import Table

    from dsq.dsquant.eval_report import write_bench_html, write_json

    from .bench import BENCH_HEADER, bench_model, bench_rows
    from .registry import choose

    results = []
    err = _err()
    with err.status("dsq bench") as status:
        for m in models:
            for cls in choose(m, runtime):
                results.append(bench_model(cls, m, device, threads, prompt_tokens, new_tokens, runs, warmup,
                                           log=lambda msg: status.update(f"dsq bench: {msg}")))
    t = Table(title=f"dsq bench: median of {runs} runs after {warmup} warm-up, greedy, EOS ignored")
    for h in BENCH_HEADER:
        t.add_column(h, justify="left" if h in ("model", "runtime") else "right")
    for row in bench_rows(results):
        t.add_row(*row)
    _out().print(t)
    if json_out:
        write_json({"schema": "dsq.bench/1", "results": [r.to_json() for r in results]}, json_out)
    if html_out:
        write_bench_html(results, BENCH_HEADER, bench_rows(results), html_out)


def read_stdin_lines() -> Callable[[], str]:
    """A reader for piped (non-terminal) stdin: one line per turn, EOFError at the end."""

    def read() -> str:
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    return read
