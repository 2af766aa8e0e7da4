"""`bench`: the command line of the suite.

    bench data                      generate the embedded datasets (cached)
    bench pretrain RECIPE...        pre-train the backbone a recipe names as its imagenet init
    bench plan RECIPE... [--json] [--full]   list every run a study expands to, with its
                                    GPU-hours (--full: and every resolved value of each run)
    bench speed RECIPE... [--record]  time train steps of each model, for the throughput table
    bench subsets --annotations F   draw the nested 1k/10k/35k training subsets of a dataset
    bench run RECIPE...             train and evaluate every run (skips finished ones)
    bench parity RECIPE             run a study through both engines, compare them side by side
    bench status RECIPE...          state of every run
    bench figures [--collect]       every figure and table under results/ (and its index.html)

Errors in recipes, data or checkpoints end with one line naming the file, the key and the fix.
"""

import argparse
import os
import signal
import sys
import time
from pathlib import Path


from bench import plan, preflight
from bench.paths import runs_root
from bench.preflight import PreflightError


def _common(ap):
    ap.add_argument("recipes", nargs="+", help="recipe files or directories of recipes")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe value, e.g. --set solver.batch=4 (repeatable)")
    ap.add_argument("--runs-root", default=None, help="where run dirs go (default: $BENCH_RUNS "
                                                      "or ./runs)")
    ap.add_argument("--coco", default=None, metavar="PATH",
                    help="COCO 2017 root (default: $BENCH_COCO, else $DETECTRON2_DATASETS/coco)")
    ap.add_argument("--voc", default=None, metavar="PATH",
                    help="the folder holding PASCAL VOC's VOC2007/ and VOC2012/ (default: "
                         "$BENCH_VOC, else $DETECTRON2_DATASETS)")
    ap.add_argument("--engine", choices=["torchvision", "detectron2"], default=None,
                    help="train with this engine whatever the recipes say (same as --set "
                         "engine=NAME; the run ids change with it)")


def _device(choice: str) -> str:
    """--device auto: a GPU when one is visible, else the CPU."""
    if choice != "auto":
        return choice
    from bench.runner import _cuda_count
    return "cuda" if _cuda_count() else "cpu"


def _studies(args):
    from bench import recipe
    engine = [f"engine={args.engine}"] if getattr(args, "engine", None) else []
    return recipe.load_all(args.recipes, recipe.parse_overrides(args.set + engine))


def cmd_data(args):
    from bench.data import registry, synthetic
    from bench.pretrain import SOURCES
    names = args.names or ["shapes", "shapes-cls"]
    for name in names:
        t0 = time.time()
        if name in registry.EMBEDDED:
            root = synthetic.ensure(registry.EMBEDDED[name])
        elif name in SOURCES:
            root = synthetic.ensure(SOURCES[name])
        else:
            raise SystemExit(f"bench data: unknown dataset {name!r}; allowed: "
                             f"{', '.join(list(registry.EMBEDDED) + list(SOURCES))}")
        print(f"{name}: {root} ({time.time() - t0:.1f}s)")


def cmd_pretrain(args):
    from bench import pretrain
    pretrain.run_command(_studies(args), lambda: _device(args.device), args.workers, args.force)


def cmd_plan(args):
    if not args.gpu.strip():
        raise SystemExit("bench plan: --gpu must name a device, e.g. --gpu H100 (or --gpu CPU)")
    root = Path(args.runs_root) if args.runs_root else runs_root()
    plan.report(_studies(args), root, args.gpu, full=args.full, as_json=args.json)


def cmd_speed(args):
    from bench import speed
    specs = plan.select([s for study in _studies(args) for s in study.runs], args.only)
    speed.run_command(specs, _device(args.device), vs_detectron2=args.vs_detectron2,
                      force=args.force, to_table=args.record, warmup=args.warmup,
                      iters=args.iters)


def cmd_run(args):
    from bench import runner
    studies = _studies(args)
    specs = plan.select([s for study in studies for s in study.runs], args.only)
    root = Path(args.runs_root) if args.runs_root else runs_root()
    if args.skip_unavailable:
        specs, lines = preflight.available(studies, specs, root)
        for line in lines:
            print(line, file=sys.stderr, flush=True)
    device = _device(args.device)
    slot_names = runner.default_slots(device, args.threads, args.per_gpu, args.slots)
    if args.slurm:  # one Slurm job per unfinished run; followed unless --no-wait
        from bench import slurm
        return slurm.run_study(studies, specs, root, slurm.options_from(args),
                               wait=not args.no_wait)
    from bench import group
    if group.under_torchrun():
        preflight.check(studies, specs, root)
        outcome = group.run_in_group(specs, root, device=device, workers=args.workers)
        if int(os.environ.get("RANK", 0)) == 0:
            outcome.print_summary()
        return 1 if outcome.failed else 0
    nodes = runner.Nodes(args.nnodes, args.node_rank, args.master_addr, args.master_port)
    if not 0 <= nodes.node_rank < nodes.nnodes:
        raise SystemExit(f"bench run: --node-rank {nodes.node_rank} is not in 0..{nodes.nnodes - 1}")
    preflight.check(studies, specs, root, slots=slot_names, device=device, nodes=nodes)
    names = list(dict.fromkeys(s.name for s in studies))  # a study may span several files
    print(f"{len(specs)} runs of {', '.join(names)} -> {root}/ on {device}",
          flush=True)
    # by run, not study name: one file of a study may turn forking off for its own runs only
    no_fork = {r.run_id for st in studies if not st.fork for r in st.runs}
    outcome = runner.run(specs, root, device=device, slots=slot_names, threads=args.threads,
                         workers=args.workers, nodes=nodes,
                         forking=(lambda s: not args.no_fork and s.run_id not in no_fork))
    outcome.print_summary()
    return 1 if outcome.failed else 0


def cmd_parity(args):
    from bench import parity
    for study in _studies(args):
        parity.check(study)  # before any training
    code = cmd_run(args)
    parity.report(_studies(args), Path(args.runs_root) if args.runs_root else runs_root())
    return code


def cmd_subsets(args):
    from bench.data import subsets
    subsets.run_command(Path(args.annotations), args.sizes, args.out, args.seed)


def cmd_status(args):
    from bench import status
    root = Path(args.runs_root) if args.runs_root else runs_root()
    status.report([s for study in _studies(args) for s in study.runs], root)


def cmd_figures(args):
    """Copy the named studies' run files into results/ (--collect), then draw every study
    there from those committed files alone, and the index page."""
    from bench.analysis import report
    collect_from = None
    if args.collect:
        collect_from = Path(args.runs_root) if args.runs_root else runs_root()
    report.redraw(Path(args.results), args.study, Path(args.recipes), collect_from)


def cmd_compare(args):
    """Two copies of a study's runs, run by run: identical, or inside each other's interval."""
    from bench.analysis import agreement
    for root in (args.first, args.second):
        if not Path(root).is_dir():
            raise FileNotFoundError(f"{root}: no such folder; give a runs root (e.g. "
                                    f"runs/mini) or a study's results/<study>/runs")
    try:
        rows = agreement.compare(Path(args.first), Path(args.second), only=args.only)
    except agreement.CompareError as e:
        print(f"bench compare: {e}", file=sys.stderr)
        return 2
    print(agreement.summary(rows, args.first, args.second))
    if args.csv:
        rows.to_csv(args.csv, index=False, float_format="%.4f")
    return 0 if agreement.agree(rows) else 1


def _count(least: int):
    """An argparse type: an integer of at least `least` (argparse names the option)."""
    def parse(text):
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is less than {least}")
        return value
    parse.__name__ = "integer"
    return parse


def _local_run_options(p):
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--slots", type=_count(0), default=0,
                   help="runs at a time (default: one per GPU, or cores/threads on a CPU)")
    p.add_argument("--threads", type=_count(1), default=1, help="CPU threads per run")
    p.add_argument("--per-gpu", type=_count(1), default=1,
                   help="runs sharing one GPU (small models such as the mini study's)")
    p.add_argument("--workers", type=_count(0), default=0, help="data loader processes per run")
    p.add_argument("--only", default=None, help="only runs whose id contains this text")
    p.add_argument("--skip-unavailable", action="store_true",
                   help="leave out (one line each) the runs whose dataset or ImageNet "
                        "checkpoint is not on this machine, instead of stopping "
                        "(make reproduce-he2019: the paper's COCO, VOC and ResNeXt-152 runs)")
    p.add_argument("--no-fork", action="store_true",
                   help="train every run from iteration 0 (default: a shorter schedule starts "
                        "from the longest run's checkpoint at its first LR drop; the recipe "
                        "key fork: false does the same)")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("data", help="generate the embedded datasets")
    p.add_argument("names", nargs="*", help="shapes, shapes-tiny, people, people-tiny, "
                                            "shapes-cls (default: the mini study's target and "
                                            "source)")
    p.set_defaults(fn=cmd_data)

    p = sub.add_parser("pretrain", help="pre-train the backbone a recipe uses as imagenet init")
    _common(p)
    p.add_argument("--force", action="store_true", help="redo even if the checkpoint exists")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, default=-1,
                   help="data loader processes (default: 4 on a GPU, 0 on a CPU)")
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("plan", help="list the runs of a study and their GPU-hours")
    _common(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--full", action="store_true", help="also print (with --json: write) every "
                                                       "resolved value of each run's spec")
    p.add_argument("--gpu", default="H100", help="estimate GPU-hours from throughput rows "
                                                 "measured on this device (default: H100)")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("speed", help="time train steps of each distinct model of a study")
    _common(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--warmup", type=_count(0), default=5)
    p.add_argument("--iters", type=_count(1), default=20, help="timed steps (the median is kept)")
    p.add_argument("--only", default=None, help="only runs whose id contains this text")
    p.add_argument("--record", action="store_true",
                   help="append the measurements to results/throughput.csv")
    p.add_argument("--force", action="store_true", help="measure models already in the table")
    p.add_argument("--vs-detectron2", action="store_true",
                   help="also time each model through detectron2 and print the ratio (done on "
                        "a GPU whenever detectron2 is installed)")
    p.set_defaults(fn=cmd_speed)

    p = sub.add_parser("run", help="train and evaluate every run of a study")
    _common(p)
    _local_run_options(p)
    p.add_argument("--nnodes", type=int, default=1,
                   help="nodes of a multi-node launch: start the same command on each, with "
                        "its --node-rank; runs then span all nodes, one at a time")
    p.add_argument("--node-rank", type=int, default=0, metavar="R")
    p.add_argument("--master-addr", default="127.0.0.1", metavar="HOST", help="node 0's address")
    p.add_argument("--master-port", type=int, default=29500, metavar="PORT",
                   help="base port on node 0 (each run uses base + a number from its id)")
    from bench.slurm import add_arguments
    add_arguments(p.add_argument_group("Slurm (also settable in a recipe's slurm: section)"))
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("parity", help="a recipe pair through both engines (torchvision, "
                                      "detectron2), their figures side by side")
    _common(p)
    _local_run_options(p)
    p.set_defaults(fn=cmd_parity, slurm=False, nnodes=1, node_rank=0, master_addr="127.0.0.1",
                   master_port=29500)

    p = sub.add_parser("subsets", help="draw nested training subsets (1k in 3.5k in 10k in 35k) of a "
                                       "COCO-format annotation file")
    p.add_argument("--annotations", required=True, help="e.g. datasets/coco/annotations/"
                                                        "instances_train2017.json")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 3500, 10000, 35000])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: bench_subsets/ beside annotations/, "
                                               "where `bench run` looks for them")
    p.set_defaults(fn=cmd_subsets)

    p = sub.add_parser("status", help="state of every run of a study")
    _common(p)
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("compare", help="do two copies of a study's runs agree? (a rerun against "
                                       "the committed runs: row by row, and final AP against "
                                       "the first copy's interval over val images)")
    p.add_argument("first", help="run dirs of the first copy (e.g. results/mini/runs)")
    p.add_argument("second", help="run dirs of the second (e.g. a rerun's runs root)")
    p.add_argument("--csv", default=None, help="also write the table, one row per run")
    p.add_argument("--only", default=None, help="only runs whose id contains this text (a "
                                                "rerun of part of a study)")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("figures", help="every figure and table under results/, from the run "
                                       "files committed there")
    p.add_argument("--study", action="append", default=[], metavar="NAME",
                   help="only this study (repeatable; default: every study in results/)")
    p.add_argument("--collect", action="store_true",
                   help="first copy the studies' spec, status and metrics files from the runs "
                        "root into results/<study>/runs/ (what `make mini` does)")
    p.add_argument("--runs-root", default=None, help="with --collect (default: $BENCH_RUNS or "
                                                     "./runs)")
    p.add_argument("--results", default="results", help="the results folder (default: results)")
    p.add_argument("--recipes", default="recipes", help="where the index page finds each "
                                                         "study's recipe (default: recipes)")
    p.set_defaults(fn=cmd_figures)

    args = ap.parse_args(argv)
    if getattr(args, "coco", None):  # for this process and the run workers it starts
        os.environ["BENCH_COCO"] = args.coco
    if getattr(args, "voc", None):
        os.environ["BENCH_VOC"] = args.voc
    from bench.data.coco import AnnotationError
    from bench.data.registry import DatasetMissing
    from bench.engines import EngineUnavailable
    from bench.runner import NoSlots
    from bench.spec import SpecError
    # `kill`, a scheduler's SIGTERM or a Slurm job's USR2 stop a runner the way Ctrl-C does:
    # its runs save a checkpoint where they are (bench.interrupt); the next call resumes them
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGUSR2, signal.default_int_handler)  # a Slurm job's warning
    try:
        return args.fn(args) or 0
    except (SpecError, DatasetMissing, EngineUnavailable, OSError, NoSlots, PreflightError,
            AnnotationError) as e:  # OSError: a path that cannot be read or written, named
        print(f"bench {args.cmd}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bench {args.cmd}: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
