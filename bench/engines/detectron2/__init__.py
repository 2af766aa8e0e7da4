"""The detectron2 engine: the same RunSpecs trained by detectron2's own trainer.

Optional: only its trainer and model import detectron2 (`require` says how to install it
when it is missing); `config` is pure data, tested without it, so a recipe for this engine
is checked and planned anywhere.
"""

from bench.engines import Engine as _Engine


class Engine(_Engine):
    name = "detectron2"
    trainer = "bench.engines.detectron2.train"

    def validate(self, spec):
        from bench.engines.detectron2.config import Untranslatable, translate
        try:
            translate(spec)
        except Untranslatable as e:
            raise ValueError(f"engine detectron2: {e}") from None

    def build_model(self, spec, num_classes):
        self.require()
        from detectron2.modeling import build_model

        from bench.engines.detectron2.train import detectron2_cfg
        return build_model(detectron2_cfg(spec, num_classes=num_classes))

    def check_pretrained(self, spec, state):
        from bench.engines.detectron2.train import load_backbone_state
        load_backbone_state(self.build_model(spec, 1), spec, state, log=lambda *_: None)

    def train_step(self, spec, device, per_gpu, batches):
        """detectron2's train step for the same spec: its model and optimizer, and what its
        SimpleTrainer.run_step does (forward, summed losses, backward, SGD step). Its inputs are
        resized here as its DatasetMapper would (shorter side drawn from the train sizes, BGR,
        0-255), since data loading is left out of the timing for both engines."""
        import torch
        self.require()
        from detectron2.modeling import build_model
        from detectron2.solver import build_optimizer
        from detectron2.structures import BitMasks, Boxes, Instances, Keypoints
        from detectron2.utils.events import EventStorage

        from bench.engines.detectron2.train import detectron2_cfg
        from bench.speed import DATASET_SHAPES
        if spec.solver.amp != "off":
            raise ValueError(f"{spec.run_id}: bench speed times detectron2 without AMP only")
        cfg = detectron2_cfg(spec, num_classes=DATASET_SHAPES[spec.data.dataset][2],
                             device=str(device))
        model = build_model(cfg).train()
        optimizer = build_optimizer(cfg, model)
        for group in optimizer.param_groups:
            group["lr"] = 1e-4
        d = spec.data
        sizes = d.train_min_size if isinstance(d.train_min_size, tuple) else (d.train_min_size,)
        g = torch.Generator().manual_seed(1)

        def resized(img, target):
            h, w = img.shape[1:]
            short = sizes[int(torch.randint(len(sizes), (1,), generator=g))]
            scale = min(short / min(h, w), d.train_max_size / max(h, w))
            nh, nw = round(h * scale), round(w * scale)
            image = torch.nn.functional.interpolate(img[None].flip(1) * 255, (nh, nw),
                                                    mode="bilinear", align_corners=False)[0]
            masks = torch.nn.functional.interpolate(target["masks"][None].float(), (nh, nw))[0]
            inst = Instances((nh, nw), gt_boxes=Boxes(target["boxes"] * scale),
                             gt_classes=target["labels"] - 1, gt_masks=BitMasks(masks > 0))
            if "keypoints" in target:  # (x, y, visibility), x and y scaled with the image
                kps = target["keypoints"].clone()
                kps[..., :2] *= scale
                inst.gt_keypoints = Keypoints(kps)
            return {"image": image, "instances": inst, "height": h, "width": w}

        inputs = [[resized(i, t) for i, t in zip(*batch)] for batch in batches]

        def run(i):
            with EventStorage(i):  # detectron2's models log into the trainer's storage
                losses = sum(model(inputs[i % len(inputs)]).values())
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
        return run, per_gpu
