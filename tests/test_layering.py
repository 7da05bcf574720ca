"""Layering: ``dsquant`` (the quantization core) imports nothing from ``runtimes/`` or ``export/``; those
build on it, never the reverse. Checked on the source with ``ast`` (every import statement, also those
inside functions, relative ones resolved), so an import that runs only on some path is caught too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dsq"
FORBIDDEN = (f"{PACKAGE}.runtimes", f"{PACKAGE}.export")
# Imports still to be moved, each with its reason; only ever shrinks. The GGUF tensor names a llama.cpp imatrix
# file is keyed by come from export/gguf_tensors.py until they live in the architecture records (issue 12).
KNOWN = {("dsquant/calib/imatrix_file.py", "dsq.export.gguf_tensors")}


def imports(path: Path) -> set[str]:
    """Absolute module names ``path`` imports (``from . import x`` resolved against its package)."""
    module = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
    package = module[:-1]  # a module's package; for __init__.py (module ends in "__init__") the package itself
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            name = ".".join([*base, *([node.module] if node.module else [])])
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names}  # `from dsq import runtimes`
    return out


def test_imports_resolve_relative_ones():
    """The checker itself: a relative import two levels up is resolved to the absolute module."""
    got = imports(ROOT / "dsquant" / "calib" / "grid.py")
    assert "dsq.dsquant.formats" in got and "torch" in got


def test_dsquant_imports_nothing_from_runtimes_or_export():
    files = sorted((ROOT / "dsquant").rglob("*.py"))
    assert len(files) > 30
    found = {
        (str(f.relative_to(ROOT)), name)
        for f in files
        for name in imports(f)
        if name == FORBIDDEN[0] or name == FORBIDDEN[1] or name.startswith(tuple(f + "." for f in FORBIDDEN))
    }
    bad = {(f, n) for f, n in found if not any(f == kf and n.startswith(kn) for kf, kn in KNOWN)}
    assert not bad, "dsquant must not import runtimes/ or export/: " + ", ".join(f"{f} -> {n}" for f, n in sorted(bad))
