"""Where things live on disk: the data cache (outside git) and the default runs root."""

import os
from pathlib import Path


def cache_root() -> Path:
    """Generated datasets and pre-trained checkpoints: `$BENCH_DATA`, else `~/.cache/bench`."""
    env = os.environ.get("BENCH_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bench"


def runs_root() -> Path:
    """Run dirs (checkpoints inside them are large): `$BENCH_RUNS`, else `./runs`."""
    env = os.environ.get("BENCH_RUNS")
    return Path(env).expanduser() if env else Path("runs")


def torchvision_weights(path: str):
    """`torchvision:resnet50` (or `torchvision:resnet50/IMAGENET1K_V2`) -> (url, file in
    torch's hub cache, where torchvision itself keeps downloaded weights)."""
    import torch
    import torchvision
    name, _, tag = path[len("torchvision:"):].partition("/")
    try:
        weights = torchvision.models.get_model_weights(name)[tag or "IMAGENET1K_V1"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"pretrained {path!r}: not torchvision ImageNet weights ({e}); e.g. "
                         f"torchvision:resnet50 or torchvision:resnet101/IMAGENET1K_V2") from None
    return weights.url, Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[1]


def resolve_cache_path(path: str) -> Path:
    """`cache:pretrained/x.pth` lives in the data cache, `torchvision:resnet50` in torch's hub
    cache; anything else is a normal path."""
    if path.startswith("cache:"):
        return cache_root() / path[len("cache:"):]
    if path.startswith("torchvision:"):
        return torchvision_weights(path)[1]
    return Path(path).expanduser()
