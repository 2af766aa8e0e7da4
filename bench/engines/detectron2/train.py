"""The detectron2 engine's trainer: RunSpec in, run dir out, trained by detectron2's own parts.

detectron2 builds the model (`build_model` from the translated config, bench/engines/
detectron2/config.py), the optimizer (its `build_optimizer`: SGD, no decay on norms), the
LR schedule (`build_lr_scheduler`: linear warm-up, then steps), the data pipeline
(`DatasetMapper`, `build_detection_train_loader` with its aspect-ratio grouping), trains with
its `SimpleTrainer` (`AMPTrainer` when solver.amp is set) and evaluates with its
`COCOEvaluator`. What is ours is the run dir around it: one hook (RunDirHook) hands each step
to the run session both engines share (bench.engines.session: metrics.jsonl rows with the
torchvision engine's keys, status.json, atomic last-K checkpoints, the checkpoints shorter
schedules fork from, evaluations, stop requests). Under torchrun the runner's process group
is detectron2's. A VOC dataset is scored by VOC's metric on its predictions (VocEvaluator).

Resume: model, optimizer, gradient scaler, the open log window and the iteration come back;
the data stream goes on after the images already seen; the LR is this spec's at that
iteration (a forked child drops where its own schedule says). Unlike the torchvision engine,
a resumed run is not bitwise the uninterrupted one: detectron2's RoI sampling and its
aspect-ratio batching draw from state a checkpoint does not hold.
"""

import itertools
import os
import time

import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper, MetadataCatalog, build_detection_test_loader, \
    build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import AMPTrainer, HookBase, SimpleTrainer, hooks
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, inference_on_dataset
from detectron2.modeling import GeneralizedRCNNWithTTA, build_model
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from torch.nn.parallel import DistributedDataParallel

from bench import checkpoint, distributed, engines, interrupt, per_image
from bench.data.registry import voc_metric
from bench.engines.detectron2 import data as d2data
from bench.engines.detectron2.config import Untranslatable, flatten, translate
from bench.engines.detectron2.weights import to_detectron2
from bench.engines.session import RunSession
from bench.engines.coco_stats import no_detection_stats, stat_names
from bench.imagenet import load_imagenet_backbone
from bench.norms import backbone_init_, init_mask_logits_
from bench.rundir import RunDir

# detectron2's loss names -> the torchvision engine's, so both engines' metrics.jsonl rows
# have the same keys (bench.analysis reads either)
LOSS_KEYS = {"total_loss": "loss", "loss_cls": "loss_classifier", "loss_box_reg": "loss_box_reg",
             "loss_mask": "loss_mask", "loss_keypoint": "loss_keypoint",
             "loss_rpn_cls": "loss_objectness", "loss_rpn_loc": "loss_rpn_box_reg"}
# a cascade's per-stage box losses (CascadeROIHeads names them loss_cls_stage0 ...)
LOSS_KEYS.update({f"{theirs}_stage{k}": f"{ours}_stage{k}" for k in range(8)
                  for theirs, ours in (("loss_cls", "loss_classifier"),
                                       ("loss_box_reg", "loss_box_reg"))})


class NonFiniteLoss(FloatingPointError):
    # detectron2 checks the loss on rank 0 only: the other processes of the run do not fail
    # at the same point, and torchrun ends them when rank 0 exits.
    every_process = False


def detectron2_cfg(spec, num_classes=80, train_dataset="", test_dataset="", weights="",
                   device="cpu", workers=0, mask_format=None):
    """detectron2's CfgNode for `spec`: its defaults with our translation merged in (which
    raises on any key detectron2 does not have)."""
    cfg = get_cfg()
    opts = []
    for key, value in flatten(translate(spec, num_classes, train_dataset, test_dataset,
                                        weights)).items():
        if isinstance(value, list):  # detectron2's config holds tuples
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        opts += [key, value]
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = device
    cfg.DATALOADER.NUM_WORKERS = workers
    if mask_format:
        cfg.INPUT.MASK_FORMAT = mask_format
    cfg.freeze()
    return cfg


class WorkerSafeMapper:
    """detectron2's DatasetMapper, made to ignore SIGTERM in a loader worker process (as the
    torchvision engine's loader workers do, bench.interrupt.loader_worker_init): detectron2
    sets its own worker init function, and a Slurm SIGTERM reaches every process of a job,
    so a worker killed by it would fail the run instead of letting it stop cleanly."""

    def __init__(self, mapper):
        self.mapper, self.guarded = mapper, False

    def __call__(self, dataset_dict):
        if not self.guarded and torch.utils.data.get_worker_info() is not None:
            interrupt.loader_worker_init(None)
            self.guarded = True  # per worker: each holds its own copy of this object
        return self.mapper(dataset_dict)


class SkipAhead(torch.utils.data.Sampler):
    """A sampler's stream after its first `skip` indices: a resumed run goes on with the
    images it has not seen yet instead of the start of the stream again."""

    def __init__(self, sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)


class Evaluator(COCOEvaluator):
    """detectron2's COCOEvaluator reporting all COCOeval stats under the torchvision
    engine's names (`bbox/AP` .. `segm/ARl`, `keypoints/AP` .. `keypoints/ARl`, percent; NaN where a size range has no ground
    truth, also when there is no detection), and how many detections it scored."""

    def reset(self):
        super().reset()
        self.detections = 0  # also when the val set gives no prediction to score
        self.per_image = {}  # per task, bench.per_image's arrays of the last evaluation

    def _eval_predictions(self, predictions, img_ids=None):
        self.detections = sum(len(p.get("instances", [])) for p in predictions)
        return super()._eval_predictions(predictions, img_ids)

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        if coco_eval is None:
            self.per_image[iou_type] = per_image.without_detections(self._coco_api, None,
                                                                    iou_type)
            return no_detection_stats(self._coco_api, None, iou_type)
        self.per_image[iou_type] = per_image.from_cocoeval(coco_eval)
        return {n: float(v) * 100 if v >= 0 else float("nan")
                for n, v in zip(stat_names(iou_type), coco_eval.stats)}


class VocEvaluator(DatasetEvaluator):
    """PASCAL VOC's metric (bench.voc_eval, the torchvision engine's too) on detectron2's
    predictions, as `voc/AP50` (the paper's VOC mAP), `voc/AP`, `voc/AP75`, with the per-image
    results of the IoU-0.5 matches. Not detectron2's PascalVOCDetectionEvaluator: it reads
    the XML files of one year folder by VOC's string ids (our val set is the converted COCO
    file), rounds scores to 3 decimals and keeps no per-image results; on the same
    detections the two agree (tests/test_voc.py)."""

    def __init__(self, dataset_name, metric, distributed=True):
        from bench.data.coco import load_coco
        self._meta = MetadataCatalog.get(dataset_name)
        self._coco = load_coco(self._meta.json_file)
        self._metric, self._distributed = metric, distributed
        self.reset()

    def reset(self):
        self._predictions = []
        self.detections = 0
        self.per_image = {}

    def process(self, inputs, outputs):
        from detectron2.evaluation.coco_evaluation import instances_to_coco_json
        # detectron2 numbers the classes 0..K-1; the file's category ids are 1..K
        dataset_id = {v: k for k, v in self._meta.thing_dataset_id_to_contiguous_id.items()}
        for inp, out in zip(inputs, outputs):
            for r in instances_to_coco_json(out["instances"].to("cpu"), inp["image_id"]):
                r["category_id"] = dataset_id[r["category_id"]]
                self._predictions.append(r)

    def evaluate(self):
        predictions = self._predictions
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        from bench.voc_eval import voc_stats
        self.detections, self.per_image = len(predictions), {}
        stats = voc_stats(self._coco, predictions, sorted(self._coco.imgs), self._metric,
                          self.per_image)
        return {"voc": {name.split("/", 1)[1]: v for name, v in stats.items()}}


def _seek_lr(scheduler, optimizer, iteration):
    """Put detectron2's LR multiplier at `iteration` of *this* spec's schedule; a forked
    child's checkpoint holds the longer parent's LR."""
    scheduler.last_epoch = iteration
    for group, lr in zip(optimizer.param_groups, scheduler.get_lr()):
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


class RunDirHook(HookBase):
    """Hands each of detectron2's steps to the run session (registered last, so the step's
    losses, data time and LR are in the event storage)."""

    def __init__(self, session, solver, world, device):
        self.session, self.solver, self.world, self.device = session, solver, world, device

    def before_step(self):
        self.t_step = time.perf_counter()

    def after_step(self):
        seconds = time.perf_counter() - self.t_step
        done = self.session.reached = self.trainer.iter + 1  # a failure below says so
        storage, losses, data_time = self.trainer.storage, None, None
        if self.world.main:
            latest = storage.latest()
            data_time = latest["data_time"][0]
            losses = {ours: latest[theirs][0] for theirs, ours in LOSS_KEYS.items()
                      if theirs in latest and latest[theirs][1] == self.trainer.iter}
        stop = interrupt.requested()
        if self.world.size > 1:  # every process stops after the same iteration
            flag = torch.tensor([float(stop)], device=self.device)
            stop = distributed.mean(flag, self.world).item() > 0
        self.session.step(done, seconds, data_time, losses, self._lr, stop)

    def _lr(self):
        # detectron2 logs the LR of the group its LRScheduler hook picks (the largest), which
        # with a bias_lr_factor can be the biases': log the base LR
        optimizer = self.trainer.optimizer
        picked = optimizer.param_groups[hooks.LRScheduler.get_best_param_group_id(optimizer)]
        lr = self.trainer.storage.latest()["lr"][0]
        return lr * self.solver.lr / picked.get("initial_lr", self.solver.lr)


def train(spec, run_dir, device="cpu", workers=0, log=print):
    """Train `spec` into `run_dir` with detectron2, resuming from its newest checkpoint."""
    world, device = distributed.join_run(spec, device)
    if world.size > 1 and comm._LOCAL_PROCESS_GROUP is None:
        # what detectron2's own launch() sets up: its per-machine group
        comm.create_local_process_group(int(os.environ.get("LOCAL_WORLD_SIZE", world.size)))
    if spec.solver.amp != "off" and device.type != "cuda":
        raise ValueError(f"solver.amp={spec.solver.amp}: detectron2's AMPTrainer needs a GPU; "
                         f"set solver.amp: off to train on the CPU")
    if not world.main:
        log = lambda msg: None  # noqa: E731 - rank 0 speaks for the run
    rd = RunDir(run_dir)
    if world.main:
        rd.write_spec(spec)
    solver = spec.solver

    train_name, val_name = d2data.register(spec.data)
    # images without a labelled keypoint are not trained on (MIN_KEYPOINTS_PER_IMAGE 1, as
    # the torchvision engine's loader): detectron2 applies it only when asked here
    train_dicts = get_detection_dataset_dicts(
        [train_name], filter_empty=True,
        min_keypoints=1 if spec.model.arch == "keypoint_rcnn" else 0)
    num_classes = len(MetadataCatalog.get(train_name).thing_classes)
    try:
        cfg = detectron2_cfg(spec, num_classes, train_name, val_name,
                             weights=spec.pretrained if spec.init == "imagenet" else "",
                             device=str(device), workers=workers,
                             mask_format=_mask_format(train_dicts))
    except Untranslatable as e:
        raise ValueError(f"{spec.run_id}: {e}") from None

    # detectron2's default_setup seeds each process so; DDP then gives every process rank 0's
    # initial weights
    seed_all_rng(spec.seed + world.rank)
    model = build_model(cfg)
    _initialize(model, spec)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    start, state = checkpoint.load_latest(rd.checkpoints, log=log, set_aside=world.main)
    if state is not None:
        if state.get("engine") != "detectron2":
            raise ValueError(f"{rd.checkpoints}: the checkpoint at iteration {start} was not "
                             f"written by the detectron2 engine; delete {rd.path} to retrain")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        log(f"resumed {rd.path.name} at iteration {start}")
    elif spec.init == "imagenet":
        _load_backbone(model, spec, log)
    _seek_lr(scheduler, optimizer, start)

    session = RunSession(spec, rd, world, device, start, state, log)
    if session.nothing_left():
        return rd

    net = model
    if world.size > 1:
        # detectron2's create_ddp_model, except that a CPU model (gloo) takes no device ids
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)
    per_gpu = solver.batch // world.size
    sampler = SkipAhead(TrainingSampler(len(train_dicts), shuffle=True, seed=spec.seed),
                        start * per_gpu)
    loader = build_detection_train_loader(
        cfg, dataset=train_dicts, sampler=sampler,
        mapper=WorkerSafeMapper(DatasetMapper(cfg, is_train=True)))
    if solver.amp != "off":
        dtype = torch.bfloat16 if solver.amp == "bf16" else torch.float16
        trainer = AMPTrainer(model, loader, optimizer, precision=dtype,
                             grad_scaler=torch.amp.GradScaler("cuda",
                                                              enabled=solver.amp == "fp16"))
        if state is not None and state.get("grad_scaler"):
            trainer.grad_scaler.load_state_dict(state["grad_scaler"])
    else:
        trainer = SimpleTrainer(model, loader, optimizer)

    test_loader = build_detection_test_loader(
        cfg, val_name, mapper=WorkerSafeMapper(DatasetMapper(cfg, is_train=False)))
    tasks = ("bbox",) + (("segm",) if cfg.MODEL.MASK_ON else ()) + \
        (("keypoints",) if cfg.MODEL.KEYPOINT_ON else ())
    if voc_metric(spec.data.dataset):  # a VOC dataset is scored by VOC's metric
        evaluator = VocEvaluator(val_name, voc_metric(spec.data.dataset),
                                 distributed=world.size > 1)
    else:
        evaluator = Evaluator(val_name, tasks=tasks,
                              distributed=world.size > 1, output_dir=None,
                              # pycocotools' COCOeval, as the torchvision engine: detectron2's
                              # C++ one keeps its per-image results out of Python
                              use_fast_impl=False)

    def evaluate(tta=False):
        t0 = time.time()
        # plain BN's running statistics drift apart per process (buffers are not broadcast
        # while training): evaluate everywhere with rank 0's, the saved ones
        distributed.broadcast_buffers(net, world)
        # test-time augmentation: detectron2's own wrapper, as its train_net's test_with_TTA
        # one augmented image per forward pass: batched, the passes' different sizes would
        # be padded together and GroupNorm would normalize over the padding (the torchvision
        # engine runs each pass alone, as its plain evaluation does)
        runner = GeneralizedRCNNWithTTA(cfg, net, batch_size=1) if tta else model
        results = inference_on_dataset(runner, test_loader, evaluator)
        if not world.main:
            return None
        stats = {f"{task}/{k}": v for task in sorted(results) for k, v in results[task].items()}
        return {**stats, "eval_time": time.time() - t0, "detections": evaluator.detections}, \
            evaluator.per_image

    def engine_state():
        return {"engine": "detectron2", "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "grad_scaler": trainer.grad_scaler.state_dict() if solver.amp == "fp16" else None}

    trainer.register_hooks([hooks.LRScheduler(optimizer=optimizer, scheduler=scheduler),
                            RunDirHook(session, solver, world, device)])
    session.open(len(train_dicts), engine_state, evaluate)
    try:
        if start < solver.max_iter:
            trainer.train(start, solver.max_iter)
    except FloatingPointError as e:  # detectron2's check of the loss, on rank 0
        last = checkpoint.list_checkpoints(rd.checkpoints)
        first = str(e).splitlines()[0]
        error = NonFiniteLoss(f"{first} (detectron2 counts from 0); last good checkpoint: "
                              f"{last[-1][1] if last else 'none'}; lower solver.base_lr or "
                              f"check the data")
        error.iteration_done = trainer.iter  # the iteration that failed, counted from 0
        raise error from None
    except BaseException as e:
        session.failed(e)
        raise
    finally:
        session.close()
        _close_loader(trainer)
    session.finish()
    return rd


def _close_loader(trainer):
    """End the train loader's worker processes now. detectron2's loader never runs out, so
    they are still prefetching when training ends; they ignore SIGTERM (WorkerSafeMapper), the
    signal Python's exit would end them with, so the process would wait for them forever."""
    it = getattr(trainer, "_data_loader_iter_obj", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    trainer._data_loader_iter_obj = None


def _mask_format(dicts):
    """detectron2's INPUT.MASK_FORMAT for these annotations: "bitmask" when the masks are
    RLE (the embedded datasets, a COCO-layout copy of them), else the translation's choice
    (COCO's own masks are polygons; its RLE ones are crowds, which training skips)."""
    for d in dicts:
        for ann in d.get("annotations", []):
            if not ann.get("iscrowd", 0) and "segmentation" in ann:
                return "bitmask" if isinstance(ann["segmentation"], dict) else None
    return None


def _initialize(model, spec):
    """The inits detectron2's config has no key for (config.NOT_EXPRESSED), applied to the
    model it built. A default spec redraws nothing, so its weights are detectron2's own."""
    m = spec.model
    if m.conv_init != "msra":  # detectron2's ResNet: c2_msra_fill, the "msra" of the spec
        backbone_init_(model.backbone.bottom_up, m.conv_init)
    if m.arch == "mask_rcnn" and m.mask_logits_init != "normal":  # detectron2: N(0, 0.001)
        init_mask_logits_(model.roi_heads.mask_head.predictor, m.mask_logits_init)


def _load_backbone(model, spec, log):
    """The ImageNet (or stand-in) backbone, read by the same code as the torchvision engine
    (bench pretrain checkpoints, torchvision weights, Caffe2 .pkl) and renamed for detectron2."""
    load_backbone_state(model, spec, load_imagenet_backbone(spec.pretrained, spec.model, log=log),
                        log)


def load_backbone_state(model, spec, state, log):
    """`state` (bench.imagenet's layout) into detectron2's ResNet of `model`."""
    state = to_detectron2(state, spec.pretrained)
    bottom_up = model.backbone.bottom_up
    theirs = bottom_up.state_dict()
    wrong = [k for k, v in state.items() if k in theirs and v.shape != theirs[k].shape]
    if wrong:  # load_state_dict would raise a multi-line RuntimeError
        raise ValueError(f"pretrained {spec.pretrained}: does not fit detectron2's ResNet-"
                         f"{spec.model.depth} (shape of {wrong[0]}: {tuple(state[wrong[0]].shape)}"
                         f" vs {tuple(theirs[wrong[0]].shape)}); pre-train a matching backbone")
    missing, unexpected = bottom_up.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # a BN counter
    if missing or unexpected:
        what = missing or unexpected
        raise ValueError(f"pretrained {spec.pretrained}: does not fit detectron2's ResNet-"
                         f"{spec.model.depth} ({'missing' if missing else 'unexpected'}: "
                         f"{', '.join(what[:3])}{'...' if len(what) > 3 else ''}); pre-train "
                         f"a matching backbone")
    log(f"pretrained {spec.pretrained}: {len(state)} backbone tensors loaded into detectron2's "
        f"ResNet-{spec.model.depth}")


run = engines.recording_failure(train)
