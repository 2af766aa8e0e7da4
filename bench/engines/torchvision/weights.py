"""ImageNet (or stand-in) initializations for the backbone.

Accepted: a checkpoint written by `bench pretrain` ({"backbone": state_dict, "meta": ...}),
or a plain torchvision ResNet state_dict. Paths may start with `cache:` (the data cache).
"""

import torch

from bench.paths import resolve_cache_path


def load_imagenet_backbone(path: str, model_spec) -> dict:
    if not path:
        raise ValueError("init is 'imagenet' but `pretrained` is empty; set pretrained: PATH")
    file = resolve_cache_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"pretrained checkpoint {path} not found at {file}; create it with "
                                f"`bench pretrain RECIPE` (or `make mini`), or point `pretrained` "
                                f"at an existing file")
    if file.suffix == ".pkl":
        raise ValueError(f"pretrained checkpoint {file} is a Detectron/Caffe2 .pkl, which the "
                         f"torchvision engine cannot convert yet; point run.pretrained at a "
                         f"torchvision ResNet state_dict (.pth), or run the scratch half only "
                         f"(--only=-scratch-)")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"pretrained checkpoint {file} is unreadable ({type(e).__name__}); "
                         f"delete it and rerun `bench pretrain`") from None
    if isinstance(obj, dict) and "backbone" in obj:
        meta = obj.get("meta", {})
        for key in ("backbone", "depth", "width", "norm"):
            if key in meta and meta[key] != getattr(model_spec, key):
                raise ValueError(f"pretrained checkpoint {file} was trained with {key}="
                                 f"{meta[key]!r}, but this run has model.{key}="
                                 f"{getattr(model_spec, key)!r}; pre-train a matching backbone")
        return obj["backbone"]
    return obj
