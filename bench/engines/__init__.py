"""Engines turn a RunSpec into a trained, evaluated run dir. They share only that format.

An engine module provides `run(spec, run_dir, device, workers, log)`.
"""

import importlib

ENGINES = {"torchvision": "bench.engines.torchvision.train",
           "detectron2": "bench.engines.detectron2.train"}


class EngineUnavailable(RuntimeError):
    pass


def get(name: str):
    if name not in ENGINES:
        raise EngineUnavailable(f"unknown engine {name!r}; allowed: {', '.join(ENGINES)}")
    try:
        return importlib.import_module(ENGINES[name])
    except ImportError as e:
        if name == "detectron2" and e.name == ENGINES[name]:
            raise EngineUnavailable(
                "engine detectron2: the suite translates runs into detectron2 configs "
                "(bench/engines/detectron2/config.py) but does not train with detectron2 yet; "
                "use engine: torchvision") from e
        if name == "detectron2":
            raise EngineUnavailable(
                "engine detectron2 needs detectron2, which has no PyPI package: build it from "
                "source as its INSTALL.md says (pip install --no-build-isolation "
                "'git+https://github.com/facebookresearch/detectron2.git'), or use "
                "engine: torchvision, which needs nothing more") from e
        raise
