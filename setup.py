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
    name="iecl",
    version="0.1.0",
    description="High-throughput IE-CL (Incremental-Entropy Contrastive Learning) pretraining for image encoders",
    python_requires=">=3.10",
    package_dir={"iecl": "."},
    packages=["iecl"] + ["iecl." + p for p in find_packages(include=[f for part in PARTS for f in (part, part + ".*")])],
    package_data={"iecl.train": ["configs/*.yaml"]},
    cmdclass={"build_py": BuildPy},
    # A range, so a GPU machine keeps its CUDA build of torch; CPU machines pin
    # the CPU build themselves (see README).
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "pillow>=9.1",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "tensorboard>=2.12",
        "matplotlib>=3.5",  # iecl compare's bar chart
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120>=1.30"],
        # FFCV builds from source: first `apt-get install libturbojpeg0-dev libopencv-dev pkg-config`.
        "ffcv": ["ffcv>=1.0.2,<1.1"],  # pipeline/ffcv.py builds on 1.0.x internals (EpochIterator, the writer)
        "kernels": ["triton>=3.0"],
        "wandb": ["wandb>=0.16"],  # log.wandb=true
        # The tests exercise every backend and the kernels (on the CPU), so they need all of them.
        "dev": ["pytest>=7", "triton>=3.0", "nvidia-dali-cuda120>=1.30", "ffcv>=1.0.2,<1.1", "wandb>=0.16"],
        # NVIDIA apex (optional fused optimizers) is built from NVIDIA's source,
        # never installed from the package index, whose "apex" is another project.
    },
    entry_points={"console_scripts": ["iecl=iecl.cli:main"]},
)
