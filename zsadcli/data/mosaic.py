"""2x2 same-class mosaics, the training augmentation of April-GAN (and AdaCLIP) on MVTec AD.

With probability ``rate`` an item is replaced by four random items of its own class stitched
into a 2x2 grid (each drawn as the official loader draws them: a random defect type, "good"
included, then a random image of that type), with their masks stitched the same way. As in the
official loader the canvas is twice the first image's size, the item keeps its own label and
``cls_name``, and the mosaic then goes through the method's usual preprocessing.

Draws are seeded: item ``i`` in epoch ``e`` uses ``random.Random(f"{seed}:{e}:{i}")`` (the training
loop calls ``set_epoch``, as with torch's DistributedSampler), so a run is reproducible whatever
the batch order, a resumed run draws what an uninterrupted one would, and every epoch sees new
mosaics.
"""
from __future__ import annotations

import random
from collections import defaultdict

from PIL import Image
from torch.utils.data import Dataset

from zsadcli.data.dataset import MetaDataset
from zsadcli.data.images import mask_to_tensor, open_image, open_mask
from zsadcli.data.meta import MetaItem, resolve_item_path


def stitch(images: list[Image.Image], mode: str) -> Image.Image:
    """Paste four images into a 2x2 grid (row-major) on a canvas twice the first one's size."""
    width, height = images[0].size
    canvas = Image.new(mode, (2 * width, 2 * height))
    for index, image in enumerate(images):
        canvas.paste(image, ((index % 2) * width, (index // 2) * height))
    return canvas


class MosaicDataset(Dataset):
    """A MetaDataset whose items become same-class 2x2 mosaics with probability ``rate``."""

    def __init__(self, base: MetaDataset, rate: float, seed: int) -> None:
        self.base = base
        self.rate = float(rate)
        self.seed = int(seed)
        groups: dict[str, dict[str, list[MetaItem]]] = defaultdict(lambda: defaultdict(list))
        for item in base.items:
            groups[item.cls_name][item.specie_name].append(item)
        self.species = {cls: {s: groups[cls][s] for s in sorted(groups[cls])} for cls in groups}
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def draw(self, cls_name: str, rng: random.Random) -> list[MetaItem]:
        species = self.species[cls_name]
        return [rng.choice(species[rng.choice(list(species))]) for _ in range(4)]

    def _mask_image(self, item: MetaItem, image: Image.Image) -> Image.Image:
        if item.anomaly and item.mask_path:
            path = resolve_item_path(self.base.root, item.mask_path)
            if not path.is_dir():
                return open_mask(path)
        return Image.new("L", image.size)

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        if rng.random() >= self.rate:
            return self.base[index]
        item = self.base.items[index]
        picks = self.draw(item.cls_name, rng)
        images = [open_image(resolve_item_path(self.base.root, p.img_path)) for p in picks]
        image = stitch(images, "RGB")
        mask = stitch([self._mask_image(p, im) for p, im in zip(picks, images)], "L")
        return {"image": self.base.preprocess(image), "mask": mask_to_tensor(mask, self.base.size, self.base.mask_resample),
                "label": item.anomaly, "cls_name": item.cls_name,
                "path": "mosaic:" + "|".join(str(p.img_path) for p in picks)}
