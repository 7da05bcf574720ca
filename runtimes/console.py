"""What ``dsq runtimes / run / chat / eval / bench`` do, behind cli.py's thin typer functions."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from .base import Sampling


def _err() -> Console:
    return Console(stderr=True)


def _out() -> Console:
    """stdout; tables keep their columns when piped into a CI log (rich would wrap them at 80)."""
    from dsq.dsquant.render import make_console

    return make_console()


def runtime_rows() -> list[dict]:
    """One row per runtime backend (built-in and plugins): what it reads, whether it works here, and why not."""
    from .registry import backends

    rows = []
    for b in backends().values():
        av = b.availability()
        rows.append({"runtime": b.name, "from": b.source, "reads": b.cls.model_kind if b.cls is not None else "?",
                     "ok": av.ok, "devices": list(av.devices), "version": av.version if av.ok else None,
                     "why_not": None if av.ok else av.reason, "other_devices": av.other_devices})
    return rows


def list_runtimes(console: Console | None = None, as_json: bool = False) -> None:
    import json

    from rich.table import Table

    rows = runtime_rows()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    console = console or _out()
    t = Table(title="dsq runtimes")
    for h in ("runtime", "from", "reads", "status", "devices", "version / why not", "other devices"):
        t.add_column(h)
    for r in rows:  # plugin names and install hints like `pip install 'dsq[llama-cpp]'` are text, not markup
        t.add_row(escape(r["runtime"]), escape(r["from"]), escape(r["reads"]),
                  "[green]ok[/]" if r["ok"] else "[red]unavailable[/]", escape(", ".join(r["devices"]) or "-"),
                  escape(str(r["version"] if r["ok"] else r["why_not"])), escape(str(r["other_devices"] or "")))
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
        _err().print(f"[dim]{escape(rt.description)}: {st.prompt_tokens} prompt + {st.new_tokens} new tokens, "
                     f"TTFT {1000 * st.first_token_s:.0f} ms, {dec:.1f} tok/s, stop: {st.stopped_by}[/]")


def terminal_reader(prompt: str = ">>> ") -> Callable[[], str]:
    """Line editing and history (prompt_toolkit): arrows, Ctrl-R search, history kept in ~/.cache/dsq."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    history_file = Path(os.environ.get("DSQ_CACHE", Path.home() / ".cache" / "dsq")) / "chat_history"
    try:
        history_file.parent.mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(history_file))
    except OSError:
        history = InMemoryHistory()
    session = PromptSession(history=history)
    return lambda: session.prompt(prompt)


def chat_loop(model: Path, runtime: str, device: str, max_tokens: int, sampling: Sampling, hide_think: bool,
              system: str | None, threads: int | None, read: Callable[[], str] | None = None,
              console: Console | None = None) -> None:
    """Read user turns until EOF or /exit; the reply's reasoning is not fed back (as R1's template expects).

    Ctrl-C while the model answers stops that reply and returns to the prompt (the partial reply is not
    kept in the history); Ctrl-C at the prompt clears the line; Ctrl-D or /exit ends the chat.
    """
    from .chat import THINK_CLOSE, starts_in_think
    from .registry import load

    console = console or Console(highlight=False)
    read = read or terminal_reader()
    history: list[dict] = []
    with load(model, runtime, device, threads=threads, n_ctx=4096) as rt:
        console.print(f"[dim]{escape(Path(model).name)} in {escape(rt.description)}; /exit or Ctrl-D ends, "
                      "/reset clears history, Ctrl-C stops a reply[/]")
        while True:
            try:
                user = read()
            except KeyboardInterrupt:
                continue  # at the prompt: a fresh line, as in a shell
            except EOFError:
                console.print()
                return
            if user.strip() in ("/exit", "/quit"):
                return
            if user.strip() == "/reset":
                console.print(f"[dim]history cleared ({len(history) // 2} turns)[/]")
                history.clear()
                continue
            if not user.strip():
                continue
            text = _prompt_text(rt, user, False, history, system)
            printer = ThinkPrinter(console, hide_think, starts_in_think(text))
            reply = ""
            stream = rt.generate(rt.encode_prompt(text), max_tokens, sampling)
            try:
                for piece in stream:
                    printer.feed(piece)
                    reply += piece
            except KeyboardInterrupt:
                if hasattr(stream, "close"):  # a generator: let the runtime release its state
                    stream.close()
                printer.finish()
                console.print("[dim](reply stopped; not kept in the history)[/]")
                continue
            printer.finish()
            answer = reply.rsplit(THINK_CLOSE, 1)[-1].strip()
            history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def eval_command(quants: list[Path], ref: Path, runtime: str, text: str | Path | None, settings, thresholds: dict,
                 json_out: Path | None, html_out: Path | None) -> bool:
    from rich.markup import escape

    from dsq.dsquant.texts import DEFAULT_EVAL_TEXT, resolve_text
    from dsq.runtimes.eval.evaluate import evaluate
    from dsq.runtimes.eval.report import print_eval, write_eval_html, write_json

    text = resolve_text(text if text is not None else DEFAULT_EVAL_TEXT)
    from dsq.dsquant.progress import progress

    err = _err()
    with progress("dsq eval") as bar:
        report = evaluate([(q, runtime) for q in quants], ref, text, settings, thresholds, log=bar.message)
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

    from dsq.dsquant.progress import progress
    from dsq.runtimes.eval.report import write_bench_html, write_json

    from .bench import BENCH_HEADER, bench_model, bench_rows
    from .registry import choose

    results = []
    with progress("dsq bench") as bar:
        for m in models:
            for cls in choose(m, runtime):
                results.append(bench_model(cls, m, device, threads, prompt_tokens, new_tokens, runs, warmup,
                                           log=bar.message))
    t = Table(title=f"dsq bench: median of {runs} runs after {warmup} warm-up, greedy, EOS ignored")
    for h in BENCH_HEADER:
        t.add_column(h, justify="left" if h in ("model", "runtime") else "right")
    for row in bench_rows(results):
        t.add_row(*(escape(c) for c in row))
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
