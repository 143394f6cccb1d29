"""meta.json: the interchange format the ZSAD papers share.

``{"train": {cls: [item]}, "test": {cls: [item]}}`` with item = ``{img_path, mask_path ("" when
normal), cls_name, specie_name, anomaly (0|1)}``; paths relative to the dataset root (absolute
paths also work, as in the official loaders, which join them with the root).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from zsadcli.atomic import refuse_overwrite, write_text_atomic
from zsadcli.errors import BadInput

SPLITS = ("train", "test")
ITEM_KEYS = ("img_path", "mask_path", "cls_name", "specie_name", "anomaly")


@dataclass(frozen=True)
class MetaItem:
    img_path: str
    mask_path: str
    cls_name: str
    specie_name: str
    anomaly: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # key order = the official scripts' order


Meta = dict[str, dict[str, list[MetaItem]]]


def meta_path(root: str | os.PathLike) -> Path:
    return Path(root) / "meta.json"


def parse_meta(data: Any, source: str) -> Meta:
    """Validate a decoded meta.json; every error names the file and what is wrong."""
    if not isinstance(data, dict) or not any(s in data for s in SPLITS):
        hint = ("this file uses 'Train'/'Test' keys (AnomalyCLIP's DAGM script); regenerate it with "
                "`zsad prepare`" if isinstance(data, dict) and {"Train", "Test"} & set(data) else
                "regenerate it with `zsad prepare <dataset> <root>`")
        raise BadInput(f"{source} has no 'train' or 'test' section.", hint=hint)
    meta: Meta = {}
    for split in SPLITS:
        classes = data.get(split, {}) or {}
        if not isinstance(classes, dict):
            raise BadInput(f"{source}: '{split}' must map class names to lists of items.")
        meta[split] = {}
        for cls, items in classes.items():
            if not isinstance(items, list):
                raise BadInput(f"{source}: {split}/{cls} must be a list of items.")
            parsed = []
            for i, item in enumerate(items):
                missing = [k for k in ITEM_KEYS if not isinstance(item, dict) or k not in item]
                if missing:
                    raise BadInput(f"{source}: {split}/{cls} item {i} lacks {', '.join(missing)}.",
                                   hint="regenerate it with `zsad prepare`")
                anomaly = item["anomaly"]
                if anomaly not in (0, 1):
                    raise BadInput(f"{source}: {split}/{cls} item {i} has anomaly={anomaly!r}; expected 0 or 1.")
                parsed.append(MetaItem(str(item["img_path"]), str(item["mask_path"] or ""),
                                       str(item["cls_name"]), str(item["specie_name"]), int(anomaly)))
            meta[split][cls] = parsed
    return meta


def load_meta(root: str | os.PathLike) -> Meta:
    path = meta_path(root)
    if not path.is_file():
        raise BadInput(f"{path} does not exist.",
                       hint=f"create it with `zsad prepare <dataset> {root}` (see `zsad prepare --list`)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path} is not valid JSON ({exc}).", hint="regenerate it with `zsad prepare`") from None
    return parse_meta(data, str(path))


def meta_to_json(meta: Meta) -> str:
    """Serialised exactly as the official scripts do: ``json.dumps(info, indent=4) + "\\n"``."""
    data = {split: {cls: [it.to_dict() for it in items] for cls, items in meta.get(split, {}).items()}
            for split in SPLITS}
    return json.dumps(data, indent=4) + "\n"


def write_meta(root: str | os.PathLike, meta: Meta, *, force: bool = False) -> Path:
    """Write ``root/meta.json`` atomically; an existing file is kept unless ``force``."""
    path = meta_path(root)
    refuse_overwrite(path, force, "meta.json")
    return write_text_atomic(path, meta_to_json(meta))


def resolve_item_path(root: str | os.PathLike, path: str) -> Path:
    """Join like the official loaders (``os.path.join``: absolute paths win)."""
    return Path(os.path.join(str(root), path))
