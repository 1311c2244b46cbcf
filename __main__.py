"""`python -m iecl ARGS` is `iecl ARGS`; so is `python3 CHECKOUT ARGS`, which
runs a source checkout with no installation (an air-gapped GPU machine with
no package index, say): the checkout's folder becomes the `iecl` package."""

import sys

if not __package__:  # run as a script: this file's folder is the package
    import importlib.util
    import os

    root = os.path.dirname(os.path.abspath(__file__))
    # Python put the checkout first on sys.path; take it off, so that its folders
    # are only ever imported as iecl.model, iecl.train, ... and never as top-level names.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.util.spec_from_file_location("iecl", os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    package = importlib.util.module_from_spec(spec)
    sys.modules["iecl"] = package
    spec.loader.exec_module(package)

from iecl.cli import main

if __name__ == "__main__":
    sys.exit(main())
