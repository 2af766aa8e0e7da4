"""results/index.html: every study's figures and tables with its recipe and run states, one
self-contained page (relative links, no scripts) that opens offline."""

import html
from pathlib import Path

import pandas as pd
import yaml

FIGURES = [("ap_vs_iterations", "AP against iterations (learning curves; LR drops filled on "
                                "the x axis)"),
           ("ap_vs_train_size", "final AP against training-set size"),
           ("final_ap_by_model", "final AP, scratch vs pre-trained, per model and schedule"),
           ("gap_vs_schedule", "scratch − pre-trained against schedule length, per "
                               "training-set size (95% bars)"),
           ("ours_vs_published", "our final AP against the published number of the same run")]


def find_recipes(study: str, recipes_root: Path):
    """[(path, description), ...] of every recipe file that defines `study` (a study may be
    several files, e.g. the mini study's schedules and its extra seed), in name order."""
    found = []
    for path in sorted(Path(recipes_root).rglob("*.yaml")):
        if path.name.startswith("_"):
            continue
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            continue
        if isinstance(doc, dict) and doc.get("study") == study:
            found.append((path, " ".join(str(doc.get("description", "")).split())))
    return found


def _table(csv: Path, columns=None) -> str:
    df = pd.read_csv(csv)
    if columns:
        df = df[[c for c in columns if c in df.columns]]
    if "train_images" in df.columns:  # -1 is how the tidy table spells "the whole set"
        df["train_images"] = df["train_images"].map(lambda n: "all" if n == -1 else str(n))
    return df.to_html(index=False, na_rep="-", float_format=lambda v: f"{v:.1f}", border=0)


def write_index(results_root: Path, studies, recipes_root: Path) -> Path:
    root = Path(results_root)
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             "<title>Rethinking ImageNet Pre-training: reproduction results</title>",
             "<style>body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:85%;margin:.5em 0 1.5em}"
             "td,th{border-bottom:1px solid #ccc;padding:2px 8px;text-align:right}"
             "img{max-width:100%;border:1px solid #ddd}</style></head><body>",
             "<h1>Rethinking ImageNet Pre-training: reproduction results</h1>",
             "<p>Every study under <code>results/</code>, drawn by <code>make figures</code> "
             "from the committed run files (<code>&lt;study&gt;/runs/</code>). AP in percent."
             "</p><ul>"]
    parts += [f"<li><a href='#{html.escape(s)}'>{html.escape(s)}</a></li>" for s in studies]
    parts.append("</ul>")
    for study in studies:
        out = root / study
        parts.append(f"<h2 id='{html.escape(study)}'>{html.escape(study)}</h2>")
        found = find_recipes(study, recipes_root)
        for recipe, description in found:
            where = html.escape(str(recipe.relative_to(Path(recipes_root).parent)))
            parts.append(f"<p>Recipe: <code>{where}</code>. {html.escape(description)}</p>")
        if not found:
            parts.append("<p>Recipe: <code>no recipe of this name in recipes/</code>.</p>")
        final = out / "final_ap.csv"
        if final.is_file():
            parts.append("<h3>Runs</h3>" + _table(final, ["run_id", "engine", "init", "schedule",
                                                          "train_images", "seed", "state",
                                                          "iteration", "max_iter", "bbox/AP",
                                                          "segm/AP", "keypoints/AP",
                                                          "voc/AP50"]))
        for stem, caption in FIGURES:
            if (out / f"{stem}.png").is_file():
                parts.append(f"<h3>{html.escape(caption)}</h3><p><img src='{study}/{stem}.png' "
                             f"alt='{stem}'> <a href='{study}/{stem}.pdf'>PDF</a></p>")
        if (out / "pairs.csv").is_file():
            parts.append("<h3>Pairs: scratch − pre-trained</h3>" + _table(
                out / "pairs.csv", ["schedule", "max_iter", "train_images", "seed",
                                    "bbox/AP scratch", "bbox/AP imagenet",
                                    "bbox/AP scratch-imagenet", "segm/AP scratch",
                                    "segm/AP imagenet", "segm/AP scratch-imagenet",
                                    "keypoints/AP scratch", "keypoints/AP imagenet",
                                    "keypoints/AP scratch-imagenet",
                                    "voc/AP50 scratch", "voc/AP50 imagenet",
                                    "voc/AP50 scratch-imagenet",
                                    "state scratch", "state imagenet"])
                + f"<p>All 12 COCO stats: <a href='{study}/pairs.csv'>pairs.csv</a>, "
                  f"<a href='{study}/final_ap.csv'>final_ap.csv</a>.</p>")
        if (out / "gaps.csv").is_file():
            gaps = pd.read_csv(out / "gaps.csv")
            parts.append("<h3>Gaps, seeds pooled, with 95% intervals</h3>" + _table(
                out / "gaps.csv", [c for c in gaps.columns if c in (
                    "engine", "schedule", "max_iter", "train_images", "seeds") or "AP gap" in c]))
        if (out / "saturation.csv").is_file():
            parts.append("<h3>Has the longest schedule stopped improving? (final AP per "
                         "schedule, seeds averaged)</h3>" + _table(out / "saturation.csv"))
        if (out / "vs_published.csv").is_file():
            parts.append("<h3>Ours vs published</h3>" + _table(out / "vs_published.csv"))
        else:
            parts.append("<p>No published number belongs to this study "
                         "(<code>results/reference/</code> has no row naming it).</p>")
    parts.append("</body></html>\n")
    path = root / "index.html"
    path.write_text("\n".join(parts))
    return path
