"""The layout pyproject.toml cannot say: the repository's root is the `iecl`
package, and its folders install as iecl.<folder>. The metadata (name,
version, dependencies, extras, the `iecl` script) is in pyproject.toml."""

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

#: the repository's folders, each installed as iecl.<folder> (the folders keep
#: the user's layout; one name on sys.path keeps them from colliding with a
#: user's own model.py or train/)
PARTS = ("pipeline", "kernels", "model", "train", "profiling")


class BuildPy(build_py):
    """The repository's root is the `iecl` package (its __init__, __main__ and
    cli); this file is not part of it."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if not (package == "iecl" and m[1] == "setup")]


setup(
    package_dir={"iecl": "."},
    packages=["iecl"] + ["iecl." + p for p in find_packages(include=[f for part in PARTS for f in (part, part + ".*")])],
    package_data={"iecl.train": ["configs/*.yaml"]},
    cmdclass={"build_py": BuildPy},
)
