"""iecl: high-throughput self-supervised pretraining of image encoders with
IE-CL and its baselines.

The repository's folders are this package's parts, installed under one name
so that none of them collides with a user's own `model.py` or `train/`:
`iecl.pipeline` (data), `iecl.kernels` (Triton kernels and their references),
`iecl.model` (SAIB, ResNets, heads, losses, methods), `iecl.train` (config,
loop, checkpoints, evaluation) and `iecl.profiling` (benchmarks, step
breakdowns, the GPU report). `iecl.cli` assembles the `iecl` command.
"""

__version__ = "0.1.0"


def load_backbone(checkpoint, device="cpu"):
    """A run folder's (or checkpoint file's) backbone as a plain ResNet
    (`torch.nn.Module`, eval mode, spectral norm folded into its weights):
    `features = iecl.load_backbone("runs/iecl-resnet50-...")(images)`, images
    normalised (B, 3, H, W); (B, 2048) for a ResNet-50, (B, 512) for a ResNet-18."""
    from iecl.train.factory import load_backbone as load

    return load(checkpoint, device)


def load_method(checkpoint, device="cpu"):
    """A run folder's (or checkpoint file's) whole method (encoders, heads,
    SAIB) with its weights, in eval mode; `.backbone()` is its trunk."""
    from iecl.train.factory import load_pretrained

    return load_pretrained(checkpoint, device)[0]
