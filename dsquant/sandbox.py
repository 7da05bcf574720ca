"""Untrusted text that dsq executes, bounded in time and size: chat templates and user regexes.

Chat templates come with the model (tokenizer_config.json, chat_template.jinja, GGUF metadata), so
whoever published the model wrote them. Jinja's ``ImmutableSandboxedEnvironment`` (what transformers
uses too) stops attribute escapes but bounds neither time nor size: ``10 ** (10 ** 9)``, ``"x" * 10**10``
or nested ``range(100000)`` loops hang or exhaust memory. Here, on top of that sandbox:

- integers are kept under ``MAX_INT_BITS`` and every string/list a template builds (and its output)
  under ``MAX_SIZE`` items, checked *before* the operation runs (``**``, ``*``, ``+``, ``%``, method and
  filter calls with integer arguments, ``namespace`` assignments);
- a render runs in a worker thread with a deadline, checked at every operation, range step and output
  chunk; a render that still runs past it is stopped with an asynchronous exception, and the caller
  gets an :class:`~dsquant.errors.InputError` either way (a thread, not ``SIGALRM``: renders also
  happen off the main thread).

Regexes a user writes (recipe ``re:`` overrides) run under the ``regex`` package's ``timeout``, so a
catastrophically backtracking pattern is refused instead of hanging.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import threading
import time
from collections.abc import Sequence
from datetime import date
from typing import Any

import regex
from jinja2 import TemplateError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from .errors import InputError, RecipeError

MAX_INT_BITS = 4096  # 10**1233: far above any token id, index or date a template computes
MAX_SIZE = 1 << 22  # 4M characters/items in any value and in the rendered output
MAX_INT_ARG = 1 << 20  # an integer argument to a filter or method (a width, a count)
MAX_FORMAT_WIDTH = 10_000  # a width/precision inside a %- or {}-format string
MAX_RANGE = 100_000  # items in one range() (Jinja's own sandbox limit)
RENDER_SECONDS = 10.0  # per render (DSQ_TEMPLATE_SECONDS overrides); real chat templates take milliseconds
REGEX_SECONDS = 1.0


class _Refused(Exception):
    """A template operation refused by a bound (size, integer, time)."""


class _Stop(BaseException):
    """Injected into a render thread that ran past its deadline (BaseException: nothing in Jinja catches it)."""


_state = threading.local()  # per render thread: deadline (monotonic seconds)


def _tick() -> None:
    deadline = getattr(_state, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise _Refused(f"took longer than {getattr(_state, 'seconds', RENDER_SECONDS):g}s")


def _check_value(x: Any) -> Any:
    if isinstance(x, bool):
        return x
    if isinstance(x, int) and x.bit_length() > MAX_INT_BITS:
        raise _Refused(f"an integer of more than {MAX_INT_BITS} bits")
    if isinstance(x, str | bytes | list | tuple | dict) and len(x) > MAX_SIZE:
        raise _Refused(f"a value of more than {MAX_SIZE} items")
    return x


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _sized(x: Any) -> bool:
    return isinstance(x, str | bytes | list | tuple)


_PCT_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_FIELD = re.compile(r"\{[^{}]*:([^{}]*)\}")


def _check_format_string(fmt: str) -> None:
    """Refuse %- and {}-format strings whose widths would allocate huge strings ("%999999999d")."""
    for m in _PCT_FIELD.finditer(fmt):
        for g in m.groups():
            if g == "*" or (g and int(g) > MAX_FORMAT_WIDTH):
                raise _Refused(f"a format width of {g} (limit {MAX_FORMAT_WIDTH})")
    for m in _BRACE_FIELD.finditer(fmt):
        for digits in re.findall(r"\d+", m.group(1)):
            if int(digits) > MAX_FORMAT_WIDTH:
                raise _Refused(f"a format width of {digits} (limit {MAX_FORMAT_WIDTH})")


def _check_args(args: tuple, kwargs: dict) -> None:
    for a in (*args, *kwargs.values()):
        if _int(a) and abs(a) > MAX_INT_ARG:
            raise _Refused(f"an integer argument of {a} (limit {MAX_INT_ARG})")
        _check_value(a)


class _BoundedRange(Sequence):
    """range() whose iteration checks the render deadline (nested loops are bounded in time)."""

    def __init__(self, *args: int):
        for a in args:
            if not _int(a):
                raise _Refused(f"range() of a non-integer {a!r}")
            if abs(a) > MAX_INT_ARG * 1024:
                raise _Refused(f"range() bound {a}")
        self._r = range(*args)
        if len(self._r) > MAX_RANGE:
            raise _Refused(f"range() of {len(self._r)} items (limit {MAX_RANGE})")

    def __len__(self) -> int:
        return len(self._r)

    def __getitem__(self, i):
        return self._r[i]

    def __iter__(self):
        for i, v in enumerate(self._r):
            if not i % 256:
                _tick()
            yield v

    def __repr__(self) -> str:
        return repr(self._r)


class _BoundedNamespace(Namespace):
    """``namespace()`` whose assignments are size-checked (a loop doubling ``ns.s`` is refused)."""

    def __setitem__(self, name: str, value: Any) -> None:
        _tick()
        super().__setitem__(name, _check_value(value))


class _Generation(Extension):
    """transformers' ``{% generation %}`` tag (marks assistant text for masks): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson filter: no HTML escaping, unlike Jinja's own.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _bounded_filter(fn):
    @functools.wraps(fn)  # keeps jinja_pass_arg (pass_context/pass_environment) on the wrapper
    def wrapper(*args, **kwargs):
        _tick()
        _check_args(tuple(a for a in args if not hasattr(a, "environment")), kwargs)
        if fn.__name__ == "do_format" and args and isinstance(args[0], str):
            _check_format_string(args[0])
        return _check_value(fn(*args, **kwargs))

    return wrapper


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox plus size/integer bounds and deadline checks on every operation.

    The environment transformers renders chat templates in (``apply_chat_template``): trim_blocks,
    lstrip_blocks, loop controls, ``{% generation %}``, ``raise_exception``, ``strftime_now``, ``tojson``.
    """

    intercepted_binops = frozenset({"**", "*", "+", "%", "//", "-", "/"})

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _Generation])
        self.filters = {k: _bounded_filter(f) for k, f in self.filters.items()}
        self.filters["tojson"] = _bounded_filter(_tojson)
        self.globals.update(
            range=_BoundedRange, namespace=_BoundedNamespace, raise_exception=_raise_exception,
            strftime_now=lambda fmt: date.today().strftime(fmt),
        )

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "**" and _int(left) and _int(right) and right > 0 and abs(left) > 1:
            if right * abs(left).bit_length() > MAX_INT_BITS:
                raise _Refused(f"{left} ** {right} (more than {MAX_INT_BITS} bits)")
        elif operator == "*":
            if _int(left) and _int(right) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _Refused(f"a product of more than {MAX_INT_BITS} bits")
            for seq, n in ((left, right), (right, left)):
                if _sized(seq) and _int(n) and len(seq) * n > MAX_SIZE:
                    raise _Refused(f"a repetition of {len(seq)} x {n} items (limit {MAX_SIZE})")
        elif operator == "+" and _sized(left) and _sized(right) and len(left) + len(right) > MAX_SIZE:
            raise _Refused(f"a concatenation of more than {MAX_SIZE} items")
        elif operator == "%" and isinstance(left, str):
            _check_format_string(left)
        return _check_value(super().call_binop(context, operator, left, right))

    def getattr(self, obj, attribute):
        _tick()
        if isinstance(obj, str) and attribute in ("format", "format_map"):
            _check_format_string(obj)  # Jinja wraps str.format; the widths are in the string itself
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _tick()
        return super().getitem(obj, argument)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's signature
        _tick()
        _check_args(args, kwargs)
        return _check_value(super().call(__context, __obj, *args, **kwargs))


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    return BoundedEnvironment().from_string(template)


def _async_raise(thread: threading.Thread) -> None:
    """Raise _Stop inside ``thread`` at its next bytecode (CPython's PyThreadState_SetAsyncExc)."""
    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_Stop))


def _render_seconds() -> float:
    try:
        return float(os.environ.get("DSQ_TEMPLATE_SECONDS", RENDER_SECONDS))
    except ValueError:
        return RENDER_SECONDS


def render_template(template: str, source: str, seconds: float | None = None, **context: Any) -> str:
    """Render an untrusted Jinja ``template`` with ``context``, bounded in time (``seconds``) and size.

    ``source`` names where the template came from, for the error. Raises InputError naming it for a
    syntax error, a ``raise_exception`` in the template, any exception while rendering (OverflowError,
    RecursionError, MemoryError...), a refused size or integer, or a render past the deadline.
    """
    seconds = _render_seconds() if seconds is None else seconds
    result: dict[str, Any] = {}

    def work() -> None:
        _state.deadline, _state.seconds = time.monotonic() + seconds, seconds
        try:
            out, n = [], 0
            for chunk in _compile(template).generate(**context):
                n += len(chunk)
                if n > MAX_SIZE:
                    raise _Refused(f"output of more than {MAX_SIZE} characters")
                out.append(chunk)
                _tick()
            result["text"] = "".join(out)
        except _Stop:
            result["error"] = _Refused(f"took longer than {seconds:g}s")
        except BaseException as e:  # noqa: BLE001 - reported to the caller's thread below
            result["error"] = e

    worker = threading.Thread(target=work, name="dsq-template-render", daemon=True)
    worker.start()
    try:
        worker.join(seconds + 1.0)
        if worker.is_alive():  # stuck between checks (a loop with no operation in it): stop it
            _async_raise(worker)
            worker.join(2.0)
            raise InputError(f"{source}: rendering took longer than {seconds:g}s; refused (a loop or size bomb?)")
    except KeyboardInterrupt:
        _async_raise(worker)
        raise
    e = result.get("error")
    if e is None:
        return result["text"]
    if isinstance(e, _Refused):
        raise InputError(f"{source}: refused while rendering: {e}")
    if isinstance(e, TemplateError):
        raise InputError(f"{source}: failed to render: {' '.join(str(e).split())[:300]}")
    if isinstance(e, RecursionError):
        raise InputError(f"{source}: failed to render: recursion too deep")
    if isinstance(e, Exception | MemoryError):
        raise InputError(f"{source}: failed to render ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
    raise e


def pick_template(template: Any) -> str | None:
    """A chat template as str from the forms Hugging Face stores: a string, a {name: template} dict, or a
    list of {"name", "template"} (the ``default`` one, else the first)."""
    if isinstance(template, str) or template is None:
        return template or None
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        chosen = named.get("default", next(iter(named.values()), None))
        return chosen if isinstance(chosen, str) else None
    return None


def render_chat_template(template: str, messages: list[dict], special_tokens: dict[str, Any],
                         add_generation_prompt: bool = True, source: str = "the model's chat template",
                         seconds: float | None = None) -> str:
    """``messages`` through an untrusted chat ``template``, as transformers' ``apply_chat_template`` renders
    it (special tokens as variables), bounded by :func:`render_template`."""
    tokens = {k: v for k, v in special_tokens.items() if isinstance(k, str) and k.isidentifier()}
    tokens.setdefault("bos_token", "")
    tokens.setdefault("eos_token", "")
    return render_template(template, source, seconds, messages=messages,
                           add_generation_prompt=add_generation_prompt, **tokens)


# -- user regexes ------------------------------------------------------------------------------------
def compile_user_regex(pattern: str, where: str) -> regex.Pattern:
    """Compile a user regex (``regex`` package, ``re``-compatible syntax); RecipeError naming ``where``."""
    if len(pattern) > 1024:
        raise RecipeError(f"{where}: regex of {len(pattern)} characters (limit 1024)")
    try:
        return regex.compile(pattern)
    except (regex.error, ValueError, OverflowError, RecursionError) as e:
        raise RecipeError(f"{where}: bad regex ({e})") from None


def search_user_regex(pattern: str, text: str, where: str, seconds: float = REGEX_SECONDS) -> bool:
    """Whether ``pattern`` matches somewhere in ``text``, refusing (RecipeError naming ``where``) a match that
    runs longer than ``seconds`` (catastrophic backtracking)."""
    try:
        return compile_user_regex(pattern, where).search(text, timeout=seconds) is not None
    except TimeoutError:
        raise RecipeError(
            f"{where}: regex {pattern!r} took longer than {seconds:g}s on `{text}` (catastrophic backtracking); "
            "simplify it"
        ) from None


__all__ = [
    "render_template", "render_chat_template", "pick_template", "compile_user_regex", "search_user_regex",
    "BoundedEnvironment", "MAX_SIZE", "MAX_INT_BITS",
]
