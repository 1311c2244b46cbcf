"""Frozen-backbone features of several augmented views of every image, for
the MI critic (`iecl mi`): the backbone, the expensive part, runs once per
view, and the critic then trains on the cached features."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from iecl.kernels.view_prep import prepare_view_reference
from iecl.pipeline import DataError, ImageList
from iecl.pipeline.augment import ViewRecipe, apply_view
from iecl.pipeline.decode import DECODE_ERRORS, decode_rgb, describe
from iecl.pipeline.draws import draw_two_views
from iecl.pipeline.views import MEAN_255, STD_255
from iecl.train.eval.knn import extract_features


class _ManyViews(torch.utils.data.Dataset):
    """Image i -> (i, uint8 (V, H, W, 3) or None, why it could not be read).

    Views (2e, 2e + 1) are the batch draws of image i in epoch e (recipes 0
    and 1): exactly the pair the pretraining loader makes for it in that epoch. An unreadable image is reported, not replaced by
    its neighbour as in training: a duplicated image would be a false
    "different image" in the pairs.
    """

    def __init__(self, images: ImageList, recipes: tuple[ViewRecipe, ViewRecipe], image_size: int, views: int,
                 seed: int) -> None:
        self.images, self.recipes = images, recipes
        self.image_size, self.views, self.seed = image_size, views, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            img = decode_rgb(self.images.read(i))
        except DECODE_ERRORS as err:
            return i, None, f"{self.images.name(i)} ({describe(err)})"
        width, height = img.size
        out = []
        for epoch in range((self.views + 1) // 2):
            pair = draw_two_views(self.recipes, self.seed, epoch, [i], [width], [height], self.image_size,
                                  reference=True)
            out.extend(apply_view(img, d.params(0), self.image_size) for d in pair)
        return i, np.stack(out[:self.views]), None


def _collate(items):
    return items  # ragged (unreadable images have no views): stacked in the consumer


@torch.no_grad()
def extract_view_features(
    backbone: nn.Module,
    images: ImageList,
    *,
    recipes: tuple[ViewRecipe, ViewRecipe],
    image_size: int,
    views: int,
    seed: int,
    workers: int,
    device: torch.device,
    batch_images: int = 64,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    desc: str = "features",
) -> tuple[torch.Tensor, list[int], list[str]]:
    """Frozen-backbone features of `views` augmented views of every image of
    `images` (an `ImageList`): `(n, V, F)` float32 on `device` (L2-normalised
    rows, as `train.eval.knn.extract_features` gives them), the indices of the n
    readable images, and "name (reason)" of each unreadable one."""
    mean = torch.tensor(MEAN_255, device=device)
    std = torch.tensor(STD_255, device=device)
    loader = torch.utils.data.DataLoader(
        _ManyViews(images, recipes, image_size, views, seed),
        batch_size=batch_images, num_workers=workers, collate_fn=_collate,
    )
    kept: list[int] = []
    bad: list[str] = []
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress, dynamic_ncols=True, mininterval=0.5)

    def batches():
        for items in loader:
            bar.update(len(items))
            bad.extend(reason for _, arr, reason in items if arr is None)
            ok = [(i, arr) for i, arr, _ in items if arr is not None]
            if not ok:
                continue
            kept.extend(i for i, _ in ok)
            u8 = torch.from_numpy(np.concatenate([a for _, a in ok])).to(device)  # (b * V, H, W, 3)
            x = prepare_view_reference(u8, mean, std, torch.float32)
            yield x, torch.zeros(len(x), dtype=torch.long)

    try:
        feats, _ = extract_features(backbone, batches(), device, autocast_dtype)
    except ValueError:
        if kept:
            raise
        raise DataError(f"none of the {len(images)} images of {images.root} can be read, e.g. {bad[0]}") from None
    finally:
        bar.close()
    return feats.reshape(len(kept), views, -1), kept, bad
