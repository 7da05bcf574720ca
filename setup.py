"""Package discovery for dsq's flat layout (pyproject.toml holds everything else).

The repository root *is* the ``dsq`` package (``package-dir dsq = "."``), so setuptools' automatic
discovery would see ``dsquant`` where the import name is ``dsq.dsquant``. Every folder with an
``__init__.py`` below the listed top-level packages is found here and prefixed, so a new subpackage
can never be left out of the wheel again (tests/test_wheel.py installs the wheel and imports it all).
"""

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

TOP_LEVEL = ("dsquant", "export", "runtimes", "calib_data")


class BuildPy(build_py):
    """The root package is the repository root: ship its modules, not this build script."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if not (package == "dsq" and m[1] == "setup")]


setup(
    packages=["dsq"] + [f"dsq.{p}" for p in find_packages(include=[f"{t}*" for t in TOP_LEVEL])],
    package_dir={"dsq": "."},
    cmdclass={"build_py": BuildPy},
)
