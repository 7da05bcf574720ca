"""Finding runtime backends: the ``dsq.runtimes`` entry-point group, plus dsq's own.

A third-party package adds a backend by declaring, in its pyproject.toml::

    [project.entry-points."dsq.runtimes"]
    my-runtime = "my_package.module:MyRuntime"

where ``MyRuntime`` subclasses :class:`dsq.runtimes.base.Runtime`. dsq's own backends are declared
the same way in dsq's pyproject.toml (the one list of them); ``Runtime.priority`` orders them for
``auto``. An entry point that fails to import is listed as unavailable with the error, never crashes
``dsq runtimes``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from dsq.dsquant.errors import InputError, UnsupportedError

from .base import Availability, Runtime

GROUP = "dsq.runtimes"

@dataclass(frozen=True)
class Backend:
    """A registered backend: its class if it imported, otherwise the import error."""

    name: str
    target: str  # "module:Class"
    source: str  # "dsq" or the distribution that declared it
    cls: type[Runtime] | None
    error: str = ""

    def availability(self) -> Availability:
        if self.cls is None:
            return Availability(False, f"entry point {self.target} failed to load: {self.error}")
        try:
            return self.cls.available()
        except Exception as e:  # a plugin's own bug must not break the listing
            return Availability(False, f"{self.target}.available() raised {type(e).__name__}: {e}")


def _load_target(target: str) -> type[Runtime]:
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Runtime)):
        raise TypeError(f"{target} is not a subclass of dsq.runtimes.base.Runtime")
    return obj


def backends() -> dict[str, Backend]:
    """Every backend of the ``dsq.runtimes`` entry-point group, by name, in ``auto`` order (priority, name)."""
    found: dict[str, tuple[str, str]] = {}
    for ep in entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        source = dist.metadata["Name"] if dist is not None else "?"
        found.setdefault(ep.name, (ep.value, source))
    out: list[Backend] = []
    for name, (target, source) in found.items():
        try:
            out.append(Backend(name, target, source, _load_target(target)))
        except Exception as e:
            out.append(Backend(name, target, source, None, f"{type(e).__name__}: {e}"))
    out.sort(key=lambda b: (b.cls.priority if b.cls else 1000, b.name))
    return {b.name: b for b in out}


def get_backend(name: str) -> type[Runtime]:
    """The class of backend ``name``; a clear error if unknown or not usable here."""
    all_ = backends()
    if name not in all_:
        raise InputError(f"--runtime {name}: unknown runtime; known: {', '.join(all_)} (see `dsq runtimes`)")
    b = all_[name]
    av = b.availability()
    if not av.ok or b.cls is None:
        raise UnsupportedError(f"runtime {name} is not available: {av.reason}")
    return b.cls


def model_path(path: str | Path) -> Path:
    """A MODEL argument as a path: ``default`` is the bundled model (built on first use)."""
    from dsq.dsquant.default_model import resolve_model_arg

    return Path(resolve_model_arg(str(path)))


def choose(path: Path, runtime: str = "auto") -> list[type[Runtime]]:
    """Backends to run ``path`` with. ``auto``: the first available one that reads it; ``all``: every
    available one that reads it; a name (or comma list): those, checked against the file."""
    path = model_path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if runtime in ("auto", "all"):
        picked, why = [], []
        for b in backends().values():
            if b.cls is None:
                continue
            reason = b.cls.accepts(path)
            if reason is not None:
                why.append(f"{b.name}: {reason}")
                continue
            av = b.availability()
            if not av.ok:
                why.append(f"{b.name}: reads it but is not available ({av.reason})")
                continue
            picked.append(b.cls)
            if runtime == "auto":
                break
        if not picked:
            raise UnsupportedError(f"{path}: no available runtime reads this model; " + "; ".join(why))
        return picked
    out = []
    for name in [n.strip() for n in runtime.split(",") if n.strip()]:
        cls = get_backend(name)
        reason = cls.accepts(path)
        if reason is not None:
            raise InputError(f"--runtime {name}: {reason}")
        out.append(cls)
    return out


def load(path: Path, runtime: str = "auto", device: str = "cpu", **kwargs) -> Runtime:
    """Load ``path`` in one runtime (``auto``: the first that reads it)."""
    if runtime == "all":
        raise InputError("--runtime all: this command runs one runtime; name one, or auto")
    path = model_path(path)
    (cls,) = choose(path, runtime)[:1]
    av = cls.available()
    if device not in av.devices:
        raise UnsupportedError(
            f"--device {device}: runtime {cls.name} here has {', '.join(av.devices) or 'no devices'} (see `dsq runtimes`)"
        )
    return cls.load(Path(path), device, **kwargs)
