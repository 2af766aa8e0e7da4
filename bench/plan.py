"""`bench plan`'s rows: what each run of a study trains, whether it forks from a longer
run, and its GPU-hours from the measured throughput table (no estimate, never a guess)."""


def select(specs, only):
    """The runs whose id contains `only` (--only); none is a mistake (a typo), not an empty
    success."""
    if not only:
        return specs
    kept = [s for s in specs if only in s.run_id]
    if specs and not kept:
        from bench.spec import SpecError
        raise SpecError(f"--only {only!r} matches none of the {len(specs)} runs (e.g. "
                        f"{specs[0].run_id}); `bench plan` lists their ids")
    return kept


def rows(studies, root, gpu="H100", full=False):
    """One row per run: what it trains, and its GPU-hours from the measured throughput table
    (None when this model was never measured on a `gpu`: no estimate, never a guess); with
    `full`, also the whole resolved RunSpec of each run (what it will train, every value)."""
    from bench import fork, speed
    from bench.rundir import is_done, run_dir_for
    table = speed.read_table()
    rows = []
    for study in studies:
        parents = fork.parent_of(study.runs) if study.fork else {}
        for s in study.runs:
            measured = speed.lookup(s, gpu, table)
            parent, fork_at = parents.get(s.run_id, (None, 0))
            hours = speed.gpu_hours(s, measured) if measured else None
            rows.append({
                "study": study.name, "run_id": s.run_id, "arch": s.model.detector_name,
                "backbone": s.model.backbone_name, "norm": s.model.norm,
                "init": s.init, "schedule": s.solver.schedule, "iterations": s.solver.max_iter,
                "lr_drops": list(s.solver.steps), "lr": s.solver.lr, "batch": s.solver.batch,
                "train_images": s.data.train_images or "all", "dataset": s.data.dataset,
                "gpus": s.gpus, "sec_per_iter": float(measured["sec_per_iter"]) if measured
                else None, "gpu_hours": round(hours, 2) if measured else None,
                "measured_on": measured["device"] if measured else None,
                # a shorter schedule trains only past its parent's checkpoint (bench.fork)
                "forks_from": parent.run_id if parent else None, "fork_at": fork_at,
                "gpu_hours_forked": round(hours * (1 - fork_at / s.solver.max_iter), 2)
                if measured else None,
                "done": is_done(run_dir_for(s, root))})
            if full:
                rows[-1]["spec"] = s.to_dict()
    return rows


def report(studies, root, gpu: str, full: bool = False, as_json: bool = False):
    """Print `bench plan`: the table (and with `full` every run's whole spec) and the cost,
    or all of it as JSON."""
    import json

    import yaml
    runs = rows(studies, root, gpu, full=full)
    unsupported = [{"study": st.name, "recipe": str(st.path), "reason": st.unsupported}
                   for st in studies if st.unsupported]
    known = [r["gpu_hours"] for r in runs if r["gpu_hours"] is not None]
    total = round(sum(known), 2) if len(known) == len(runs) and runs else None
    forked = (round(sum(r["gpu_hours_forked"] for r in runs), 2) if total is not None else None)
    if as_json:
        print(json.dumps({"gpu": gpu, "runs": runs, "total_gpu_hours": total,
                          "total_gpu_hours_forked": forked,
                          "runs_without_estimate": len(runs) - len(known),
                          "unsupported": unsupported}, indent=1))
        return
    names = {r["run_id"]: r["schedule"] for r in runs}
    shown = [{**r, "GPU-h": "no estimate" if r["gpu_hours"] is None else f"{r['gpu_hours']:.1f}",
              "forked": "-" if r["gpu_hours_forked"] is None else f"{r['gpu_hours_forked']:.1f}",
              "fork": f"{names[r['forks_from']]} @{r['fork_at']}" if r["forks_from"] else "-"}
             for r in runs]
    if runs:
        print_table(shown, ["run_id", "arch", "backbone", "norm", "init", "schedule",
                            "iterations", "lr_drops", "lr", "batch", "train_images", "gpus",
                            "fork", "GPU-h", "forked", "done"])
    if full:
        # every value, as detectron2 dumps its config: what a user checks before GPU time
        for r in runs:
            print(f"\n# {r['run_id']} ({r['study']})")
            print(yaml.dump(r["spec"], Dumper=_flow_list_dumper(), sort_keys=False).rstrip())
        print()
    if total is not None:
        digits = 1 if total >= 1 else 3
        cost = f"{total:,.{digits}f} GPU-hours on {gpu}"
        if forked < total:
            cost += (f" trained separately, {forked:,.{digits}f} with shorter schedules forked "
                     f"from the longest ({total / forked:.2f}x cheaper; --no-fork trains "
                     f"each separately)")
    elif known:
        cost = (f"{sum(known):,.1f} GPU-hours on {gpu} for the {len(known)} measured runs; "
                f"{len(runs) - len(known)} runs have no estimate")
    else:
        cost = f"no estimate on {gpu}"
    if len(known) < len(runs):
        cost += " (measure a model with `bench speed RECIPE --record` on that GPU)"
    print(f"{len(runs)} runs, {sum(r['iterations'] for r in runs):,} iterations; {cost}")
    for u in unsupported:
        print(f"not yet supported: {u['study']} ({u['recipe']}): {u['reason']}")


def _flow_list_dumper():
    """A YAML dumper writing block mappings with lists on one line (`steps: [120000,
    160000]`): a spec to read."""
    import yaml

    class FlowListDumper(yaml.SafeDumper):
        pass

    for seq in (list, tuple):
        FlowListDumper.add_representer(seq, lambda dumper, value: dumper.represent_sequence(
            "tag:yaml.org,2002:seq", value, flow_style=True))
    return FlowListDumper


def print_table(rows, cols):
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols} if rows else {}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
