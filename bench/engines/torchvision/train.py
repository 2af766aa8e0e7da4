"""The torchvision engine's trainer: RunSpec in, trained and evaluated run dir out.

Read top to bottom: build data, model and optimizer; resume from the newest checkpoint;
loop over iterations (SGD, linear warm-up, step LR). What the run dir gets after each step
(train rows, evaluations, checkpoints, status) is bench.engines.session's, shared with the
detectron2 engine.

A run of `gpus` > 1 is that many processes (bench.distributed) under DDP: each takes its
slice of every batch (bench.data.sampler), evaluates its slice of the val set, and only
rank 0 writes the run dir. Every forward pass reseeds torch's RNG from (seed, iteration,
pass), so RoI sampling draws the same numbers whichever process runs the pass: 2 processes
train the same model as 1 with the same global batch and passes (tests/test_ddp.py).
"""

import contextlib
import math
import time
import warnings

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from bench import checkpoint, distributed, engines, interrupt, schedule
from bench.data import registry
from bench.data.coco import CocoDetection, load_coco
from bench.data.sampler import PositionSampler, TrainStream, collate
from bench.engines.session import RunSession
from bench.engines.torchvision.evaluate import evaluate
from bench.engines.torchvision.model import build_detector, load_backbone_weights, use_input_sizes
from bench.imagenet import load_imagenet_backbone
from bench.norms import is_norm, use_torch_sync_bn
from bench.rundir import RunDir


class NonFiniteLoss(FloatingPointError):
    # The loss checked is the mean over processes, so every process raises this at the same
    # iteration and their process group stays usable (bench.worker.FAILED_EVERYWHERE).
    every_process = True


def build_optimizer(model, solver):
    """SGD with momentum and detectron2's parameter groups: norm parameters get
    `weight_decay_norm` (detectron2's default 0); every parameter named `bias`, a norm's
    too, gets `bias_lr_factor` x the LR and `weight_decay_bias` (when None, the decay of its
    kind: weight_decay, or weight_decay_norm for a norm's bias).
    The groups are always [other, norm] then the biases' when they differ, so checkpoints of
    runs without bias settings resume as before; group 0 trains at the logged LR."""
    bias_apart = solver.bias_lr_factor != 1.0 or solver.weight_decay_bias is not None
    groups = {"other": [], "norm": [], "other bias": [], "norm bias": []}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                kind = "norm" if is_norm(module) else "other"
                groups[f"{kind} bias" if bias_apart and name == "bias" else kind].append(p)
    def bias_decay(kind_decay):  # detectron2: WEIGHT_DECAY_BIAS None keeps the kind's decay
        return kind_decay if solver.weight_decay_bias is None else solver.weight_decay_bias
    settings = {"other": (solver.weight_decay, 1.0), "norm": (solver.weight_decay_norm, 1.0),
                "other bias": (bias_decay(solver.weight_decay), solver.bias_lr_factor),
                "norm bias": (bias_decay(solver.weight_decay_norm), solver.bias_lr_factor)}
    return torch.optim.SGD(
        [{"params": params, "weight_decay": settings[kind][0], "lr": solver.lr * settings[kind][1]}
         for kind, params in groups.items() if params or kind in ("other", "norm")],
        lr=solver.lr, momentum=solver.momentum)


def datasets_for(spec):
    files = registry.resolve(spec.data.dataset)
    ids = registry.train_ids(files, spec.data)
    masks = spec.model.arch == "mask_rcnn"
    keypoints = spec.model.num_keypoints if spec.model.arch == "keypoint_rcnn" else 0
    train = CocoDetection(files.train_images, files.train_annotations, ids, train=True, masks=masks,
                          polygons=spec.model.mask_target == "polygon", keypoints=keypoints)
    val = CocoDetection(files.val_images, files.val_annotations, train=False, masks=masks,
                        coco=load_coco(files.val_annotations), keypoints=keypoints)
    return train, val


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pass_seed(seed: int, iteration: int, pass_index: int) -> int:
    """The torch seed of one forward pass: a function of where it is in the run only."""
    return int(np.random.SeedSequence([seed, iteration, pass_index]).generate_state(1)[0])


class Stepper:
    """One SGD step over this process's images, `micro` images per forward pass.

    Each pass's loss is divided by the number of passes and DDP averages the gradients over
    processes, so the step follows the mean loss of all passes of the global batch,
    however they are spread over processes. Returns the loss terms averaged the same way
    (identical on every process, so a non-finite loss stops every process together), and
    sets `stop` when any process was asked to stop (bench.interrupt) in the same exchange.
    """

    def __init__(self, model, optimizer, micro, amp="off", world=distributed.World()):
        self.model, self.optimizer, self.micro, self.world = model, optimizer, micro, world
        self.dtype = AMP_DTYPES[amp]
        device = next(model.parameters()).device
        self.device_type = device.type
        # fp16 needs loss scaling against gradient underflow; bf16 has fp32's range
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        self.stop = False

    def __call__(self, images, targets, seeds):
        passes = len(images) // self.micro
        self.optimizer.zero_grad(set_to_none=True)
        total, keys = None, None
        for k in range(passes):
            torch.manual_seed(seeds[k])
            last = k == passes - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") \
                else self.model.no_sync()  # DDP all-reduces once, after the last pass
            part = slice(k * self.micro, (k + 1) * self.micro)
            with sync:
                with torch.autocast(self.device_type, dtype=self.dtype,
                                    enabled=self.dtype is not None):
                    loss_dict = self.model(images[part], targets[part])
                keys = keys or sorted(loss_dict)
                loss = sum(loss_dict[key] for key in keys)
                scaled = loss / passes
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            terms = torch.stack([loss_dict[key].detach().float() for key in keys]
                                + [loss.detach().float()])
            total = terms if total is None else total + terms
        flag = torch.tensor([float(interrupt.requested())], device=total.device)
        values = distributed.mean(torch.cat([total / passes, flag]), self.world).tolist()
        self.stop = values.pop() > 0
        return dict(zip(keys + ["loss"], values))

    def apply(self):
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()


def train(spec, run_dir, device="cpu", workers=0, log=print):
    """Train `spec` into `run_dir`, resuming from its newest checkpoint if any."""
    world, device = distributed.join_run(spec, device)
    if not world.main:
        log = lambda msg: None  # noqa: E731 - rank 0 speaks for the run
    rd = RunDir(run_dir)
    if world.main:
        rd.write_spec(spec)
    solver = spec.solver
    torch.manual_seed(spec.seed)
    per_rank = solver.batch // world.size
    micro = solver.micro_batch or per_rank

    train_set, val_set = datasets_for(spec)
    model = build_detector(spec.model, num_classes=len(train_set.cat_ids), data=spec.data)
    start, state = checkpoint.load_latest(rd.checkpoints, log=log, set_aside=world.main)
    if spec.init == "imagenet" and state is None:  # a resumed run needs only its checkpoint
        load_backbone_weights(model, load_imagenet_backbone(spec.pretrained, spec.model, log=log),
                              log=log)
    if device.type == "cuda":
        use_torch_sync_bn(model)
    model.to(device).train()
    use_input_sizes(model, train=True)
    net = model  # what is saved, evaluated, and loaded into; `model` may be its DDP wrapper
    optimizer = build_optimizer(model, solver)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: schedule.lr_factor(solver, it))

    if state is not None:
        try:
            net.load_state_dict(state["model"])
        except RuntimeError as e:  # e.g. a checkpoint from before a change of model layout
            first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
            raise ValueError(f"{rd.checkpoints}: the checkpoint at iteration {start} does not fit "
                             f"this code's model ({first}); check out the suite version in "
                             f"{rd.spec_file.name} to resume, or delete {rd.path} to retrain") from None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # The LR of the next iteration is a function of the iteration and *this* spec: a
        # shorter schedule forked from a longer run (bench.fork) drops here, where the
        # checkpoint's optimizer still holds the longer run's LR.
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * schedule.lr_factor(solver, start)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        log(f"resumed {rd.path.name} at iteration {start}")
    if world.size > 1:
        # Every parameter gets a gradient in every pass (torchvision's heads return a zero
        # loss, not none, when a pass has no positive RoI). Buffers are not broadcast, as in
        # detectron2: BN statistics are each process's own (SyncBN's are shared anyway).
        with warnings.catch_warnings():  # torch >= 2.12 renames the option; 2.4 lacks the new name
            warnings.simplefilter("ignore", FutureWarning)
            model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False)
    stepper = Stepper(model, optimizer, micro, solver.amp, world)
    if state is not None and state.get("grad_scaler") and stepper.scaler:
        stepper.scaler.load_state_dict(state["grad_scaler"])

    session = RunSession(spec, rd, world, device, start, state, log)
    if session.nothing_left():
        return rd

    def engine_state():
        return {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "grad_scaler": stepper.scaler.state_dict() if stepper.scaler else None}

    def evaluate_now(tta=False):
        # plain BN's running statistics drift apart per process (buffers are not
        # broadcast while training): evaluate everywhere with rank 0's, the saved ones
        distributed.broadcast_buffers(net, world)
        kept = {}
        stats = evaluate(net, val_set, device, masks=spec.model.arch == "mask_rcnn",
                         keypoints=spec.model.arch == "keypoint_rcnn",
                         backend=spec.eval.backend, world=world, per_image_out=kept,
                         voc=registry.voc_metric(spec.data.dataset),
                         tta=spec.eval if tta else None)
        return stats, kept

    session.open(len(train_set), engine_state, evaluate_now)
    try:
        stream = TrainStream(train_set, seed=spec.seed, hflip=spec.data.hflip,
                             group=micro if spec.data.aspect_grouping else 0)
        # The loader gets its own generator: creating its iterator would otherwise draw a seed
        # from the global RNG after a resume restored it, shifting every later RoI sampling
        # draw and breaking exact resume. (The data order itself needs no RNG:
        # bench.data.sampler.)
        loader = torch.utils.data.DataLoader(
            stream, batch_size=per_rank, num_workers=workers, collate_fn=collate,
            sampler=PositionSampler(start, solver.max_iter, solver.batch, world.rank, world.size),
            generator=torch.Generator().manual_seed(spec.seed),
            worker_init_fn=interrupt.loader_worker_init if workers else None)
        passes = per_rank // micro

        t_data = time.perf_counter()
        for iteration, (images, targets) in enumerate(loader, start=start):
            t_step = time.perf_counter()
            images = [img.to(device, torch.float32, non_blocking=True) / 255 for img in images]
            targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()}
                       for t in targets]
            seeds = [pass_seed(spec.seed, iteration, world.rank * passes + k) for k in range(passes)]
            loss_terms = stepper(images, targets, seeds)
            if not math.isfinite(loss_terms["loss"]):
                terms = ", ".join(f"{k}={v:.4g}" for k, v in loss_terms.items() if k != "loss")
                last = checkpoint.list_checkpoints(rd.checkpoints)
                raise NonFiniteLoss(
                    f"loss is {loss_terms['loss']} at iteration {iteration + 1} ({terms}); last good "
                    f"checkpoint: {last[-1][1] if last else 'none'}; lower solver.base_lr or check "
                    f"the data")
            lr = optimizer.param_groups[0]["lr"]  # the LR this iteration trained with
            stepper.apply()
            scheduler.step()
            session.step(iteration + 1, time.perf_counter() - t_data, t_step - t_data,
                         loss_terms, lr, stepper.stop)
            t_data = time.perf_counter()
    except BaseException as e:
        session.failed(e)
        raise
    session.finish()
    return rd


run = engines.recording_failure(train)
