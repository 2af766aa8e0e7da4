"""User code a recipe brings along: `plugins: [my_backbone.py]` next to the recipe file.

A plugin is a Python file (or an importable module name) that registers what the suite
does not ship, e.g. a backbone with `@register_backbone("resnext")`. The recipe loader
imports it before validating the runs, and every run records the plugin's absolute path
in its spec (as a label: it does not change the run id), so the worker process that trains
the run imports the same file.
"""

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

_LOADED = {}


def resolve(entries, recipe_dir: Path):
    """Plugin entries of a recipe -> absolute file paths or module names."""
    out = []
    for e in entries:
        if e.endswith(".py"):
            path = (Path(recipe_dir) / e).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"plugin {e}: no such file {path}")
            out.append(str(path))
        else:
            out.append(e)
    return tuple(out)


def load(plugins):
    """Import each plugin once per process."""
    for p in plugins:
        if p in _LOADED:
            continue
        if p.endswith(".py"):
            name = "bench_plugin_" + Path(p).stem + "_" + hashlib.sha1(p.encode()).hexdigest()[:8]
            spec = importlib.util.spec_from_file_location(name, p)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(p)
        _LOADED[p] = module
