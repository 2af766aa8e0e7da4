"""Our ResNet checkpoints (torchvision's layout) under detectron2's ResNet names.

Every ImageNet initialization the suite reads (`bench pretrain` checkpoints, torchvision's
weights, Detectron's Caffe2 `.pkl`) comes out of bench.imagenet in torchvision's layout
with an RGB first conv; this renames it for detectron2's `backbone.bottom_up` and turns
the first conv to BGR, the order detectron2 feeds (INPUT.FORMAT BGR).
Pure tensors: tested without detectron2.
"""

import re

_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(.+)$")
_NORM = re.compile(r"^bn(\d)\.(.+)$")
_SHORTCUT = re.compile(r"^downsample\.([01])\.(.+)$")


def _rename(key: str):
    """detectron2's name for one of our backbone keys, or None for what it has no place for
    (the classifier, BN's batch counters)."""
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
        return None
    if key.startswith("conv1."):
        return "stem." + key
    if key.startswith("bn1."):
        return "stem.conv1.norm." + key[len("bn1."):]
    m = _BLOCK.match(key)
    if not m:
        raise KeyError(key)
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    if (n := _NORM.match(rest)):
        rest = f"conv{n.group(1)}.norm.{n.group(2)}"
    elif (s := _SHORTCUT.match(rest)):
        rest = ("shortcut." if s.group(1) == "0" else "shortcut.norm.") + s.group(2)
    return f"res{stage}.{block}.{rest}"


def to_detectron2(state: dict, source: str = "checkpoint") -> dict:
    """{detectron2 bottom_up key: tensor}; raises ValueError naming `source` on a key that is
    not part of a ResNet."""
    out = {}
    for key, value in state.items():
        try:
            name = _rename(key)
        except KeyError:
            raise ValueError(f"pretrained {source}: {key!r} is not a ResNet weight; the "
                             f"detectron2 engine loads ResNet backbones only") from None
        if name is None:
            continue
        if name == "stem.conv1.weight":
            value = value.flip(1)  # RGB -> BGR input channels
        out[name] = value
    return out
