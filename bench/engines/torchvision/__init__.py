"""The torchvision engine: Mask / Faster R-CNN from torchvision's detection parts, our
trainer (train.py), model (model.py) and evaluation (evaluate.py)."""

from bench.engines import Engine as _Engine


class Engine(_Engine):
    name = "torchvision"
    trainer = "bench.engines.torchvision.train"

    def __init__(self):
        self._builds = {}  # (model, data) -> None, or why it cannot be built

    def validate(self, spec):
        # Build each distinct model once on the CPU: a depth the backbone lacks or GN groups
        # that do not divide a width fail here, in one line, not in every worker.
        key = (spec.model, spec.data)
        if key not in self._builds:
            try:
                self.build_model(spec, 1)
                self._builds[key] = None
            except Exception as e:  # noqa: BLE001 - a (plugin) builder may raise anything
                self._builds[key] = str(e).splitlines()[0] if str(e) else type(e).__name__
        if self._builds[key] is not None:
            raise ValueError(f"the model cannot be built: {self._builds[key]}")

    def build_model(self, spec, num_classes):
        from bench.engines.torchvision.model import build_detector
        return build_detector(spec.model, num_classes=num_classes, data=spec.data)

    def check_pretrained(self, spec, state):
        from bench.engines.torchvision.model import load_backbone_weights
        load_backbone_weights(self.build_model(spec, 1), state, log=lambda *_: None)

    def train_step(self, spec, device, per_gpu, batches):
        """Its own train step (train.Stepper) on a model built for the timing."""
        from bench.engines.torchvision.model import use_input_sizes
        from bench.engines.torchvision.train import Stepper, build_optimizer
        from bench.speed import DATASET_SHAPES
        model = self.build_model(spec, DATASET_SHAPES[spec.data.dataset][2]).to(device).train()
        use_input_sizes(model, train=True)
        optimizer = build_optimizer(model, spec.solver)
        for group in optimizer.param_groups:
            group["lr"] = 1e-4  # timing only; keep the random model finite
        micro = spec.solver.micro_batch or per_gpu
        step = Stepper(model, optimizer, micro, spec.solver.amp)

        def run(i):
            images, targets = batches[i % len(batches)]
            step(images, targets, seeds=list(range(i, i + per_gpu // micro)))
            step.apply()
        return run, micro
