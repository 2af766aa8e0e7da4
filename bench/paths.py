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


def resolve_cache_path(path: str) -> Path:
    """`cache:pretrained/x.pth` lives in the data cache; anything else is a normal path."""
    if path.startswith("cache:"):
        return cache_root() / path[len("cache:"):]
    return Path(path).expanduser()
