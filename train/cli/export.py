"""`iecl export`: a pretrained backbone as a plain ResNet state_dict for
torchvision, timm or this project's own ResNet."""

from __future__ import annotations

import argparse
from pathlib import Path

EXPORT_HELP = """\
Write a checkpoint's backbone as a plain ResNet state_dict: the spectral norm
folded into the weights (each convolution's stored weight is W / sigma), no
projector and no iecl method around it, so that any ResNet of the same depth
loads it.

  --format torchvision (default) or timm: the names torchvision's and timm's
  resnet18 / resnet50 use (conv1, bn1, layer1..4, downsample), without their
  classifier `fc`; --format state_dict: this project's own names
  (iecl.model.resnet.build_backbone(name, spectral_norm=False)).
  --projector also writes OUT's stem + ".projector.pt": the projection head's
  state_dict (this project's names), for those who want the embeddings.

Loading it:

  m = torchvision.models.resnet50(); m.fc = torch.nn.Identity()
  m.load_state_dict(torch.load("backbone.pt"))                      # strict: every key fits
  m = timm.create_model("resnet50", num_classes=0); m.load_state_dict(torch.load("backbone.pt"))

  iecl export runs/iecl-resnet50-20261125-101500 --out backbone.pt
  iecl export runs/byol-resnet50-20261125-101500/last.pt --format state_dict --projector --out byol.pt
"""

FORMATS = ("torchvision", "timm", "state_dict")


def add_commands(commands) -> None:
    p = commands.add_parser(
        "export", help="a checkpoint's backbone as a plain ResNet state_dict (torchvision, timm)",
        description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="RUN|CHECKPOINT", help="a run folder holding last.pt, or a checkpoint file")
    p.add_argument("--out", required=True, metavar="PATH", help="where to write the state_dict (.pt)")
    p.add_argument("--format", choices=FORMATS, default="torchvision", help="parameter names (default torchvision)")
    p.add_argument("--projector", action="store_true", help="also write the projector's state_dict beside OUT")
    p.set_defaults(run=run_export)


def run_export(args) -> int:
    import torch

    from iecl.model.resnet import plain_state_dict, to_torchvision_names
    from iecl.train.factory import load_pretrained
    from iecl.train.run_dir import RunDirError

    method, cfg, state = load_pretrained(args.checkpoint, "cpu")
    backbone = plain_state_dict(method.backbone())
    if args.format != "state_dict":
        backbone = to_torchvision_names(backbone)
    out = Path(args.out)
    outputs = {out: backbone}
    if args.projector:
        encoder = method.encoders()["online"]
        outputs[out.with_name(out.stem + ".projector.pt")] = {k: v.detach().clone()
                                                              for k, v in encoder.projector.state_dict().items()}
    for path, tensors in outputs.items():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(tensors, tmp)
            tmp.replace(path)
        except OSError as err:
            raise RunDirError(f"cannot write {path}: {err.strerror or err}") from None
    params = sum(v.numel() for k, v in backbone.items() if not k.endswith(("running_mean", "running_var",
                                                                          "num_batches_tracked")))
    print(f"iecl export: {cfg.method.name} {cfg.model.backbone} at step {state.get('step')} -> {out} "
          f"({args.format} names, {len(backbone)} tensors, {params / 1e6:.1f} M parameters; spectral norm folded"
          f"{', projector beside it' if args.projector else ''})")
    return 0
