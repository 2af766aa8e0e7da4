"""The detectron2 engine: the same RunSpecs trained by detectron2's own trainer.

Optional: only `train` imports detectron2 (bench.engines.get says how to install it when it
is missing); `config` is pure data, tested without it.
"""
