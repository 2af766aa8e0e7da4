"""`bench plan`'s rows: what each run of a study trains, whether it forks from a longer
run, and its GPU-hours from the measured throughput table (no estimate, never a guess)."""


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
                "study": study.name, "run_id": s.run_id, "arch": s.model.arch,
                "backbone": f"{s.model.backbone}{s.model.depth}", "norm": s.model.norm,
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
