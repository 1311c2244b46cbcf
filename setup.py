from setuptools import find_packages, setup

setup(
    name="iecl",
    version="0.1.0",
    description="High-throughput IE-CL (Incremental-Entropy Contrastive Learning) pretraining for image encoders",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "kernels", "kernels.*", "model", "model.*",
                                    "train", "train.*", "profiling", "profiling.*"]),
    package_data={"train": ["configs/*.yaml"]},
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
        # The tests exercise every backend and the kernels (on the CPU), so they need all of them.
        "dev": ["pytest>=7", "triton>=3.0", "nvidia-dali-cuda120>=1.30", "ffcv>=1.0.2,<1.1"],
        # NVIDIA apex (optional fused optimizers) is built from NVIDIA's source,
        # never installed from the package index, whose "apex" is another project.
    },
    entry_points={
        "console_scripts": ["iecl=train.cli:main"],
        # Subcommands that live outside train/ (profiling observes train, never the reverse).
        "iecl.commands": [
            "bench=profiling.cli:register",
            "profile=profiling.cli:register_profile",
            "compare=profiling.cli:register_compare",
        ],
    },
)
