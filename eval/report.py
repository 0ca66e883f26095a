"""metrics.json per evaluation folder, and reports comparing runs: a markdown table, plots, image grids.

An evaluation folder is what `generate_images` wrote (images/, manifest.jsonl, generation.json) plus the
metrics.json that `compute_fid`, `compute_clip` and the preference metrics fill in, one section each:
    {"fid": {...}, "clip": {"<convention>": {...}}, "preference": {"<metric>": {...}}}
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from stepdistill.core.io import atomic_write_text

METRICS = "metrics.json"


def read_json(path) -> dict:
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def update_metrics(run_dir, section: str, value, key: str | None = None) -> dict:
    """Set metrics[section] (or metrics[section][key]) in run_dir/metrics.json, keeping everything else."""
    path = Path(run_dir) / METRICS
    metrics = read_json(path)
    if key is None:
        metrics[section] = value
    else:
        metrics.setdefault(section, {})[key] = value
    atomic_write_text(path, json.dumps(metrics, indent=2))
    return metrics


def load_run(run_dir) -> dict:
    """One row of a report: the run's name, what generated it and its metrics."""
    from .generate import GENERATION_INFO

    run_dir = Path(run_dir)
    if not (run_dir / METRICS).is_file() and not (run_dir / GENERATION_INFO).is_file():
        raise FileNotFoundError(f"{run_dir} is not an evaluation folder: run `stepdistill eval generate` / `fid` there")
    generation = read_json(run_dir / GENERATION_INFO)
    return {"dir": run_dir, "name": generation.get("name") or run_dir.name,
            "generation": generation, "metrics": read_json(run_dir / METRICS)}


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 1e-2 or value == 0 else f"{value:.2e}"
    return str(value)


def _clip_columns(runs: list[dict]) -> list[str]:
    return sorted({conv for r in runs for conv in r["metrics"].get("clip", {})})


def markdown_table(runs: list[dict]) -> str:
    """Teacher vs students: steps, cfg, FID, KID, patch-FID, CLIP per convention, preference metrics, images/s."""
    clip_convs = _clip_columns(runs)
    prefs = sorted({m for r in runs for m in r["metrics"].get("preference", {})})
    clip_labels = [next(r["metrics"]["clip"][c]["label"] for r in runs if c in r["metrics"].get("clip", {}))
                   for c in clip_convs]
    header = ["run", "model", "steps", "cfg", "train step", "FID", "KID x1e3", "patch-FID", *clip_labels, *prefs,
              "images/s", "protocol"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        g, m = r["generation"], r["metrics"]
        fid = m.get("fid", {})
        kid = fid.get("kid")
        row = [r["name"], g.get("model", "-"), g.get("steps"), g.get("guidance_scale"), g.get("training_step"),
               fid.get("fid"), kid * 1e3 if kid is not None else None, fid.get("patch_fid")]
        row += [m.get("clip", {}).get(c, {}).get("score") for c in clip_convs]
        row += [m.get("preference", {}).get(p, {}).get("score") for p in prefs]
        protocol = fid.get("protocol")
        if protocol:
            protocol = f"{protocol} ({fid.get('n_gen')} vs {fid.get('n_ref')})"
        row += [g.get("images_per_s"), protocol]
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def _series(runs, x_key: str, group_key) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        x, fid = r["generation"].get(x_key), r["metrics"].get("fid", {}).get("fid")
        if x is not None and fid is not None:
            series.setdefault(group_key(r), []).append((x, fid))
    return {k: sorted(v) for k, v in series.items()}


def plot_fid(runs: list[dict], x_key: str, xlabel: str, path, group_key, log_x: bool = False) -> bool:
    """Line plot of FID against generation.json's x_key, one line per group; False when nothing to plot."""
    from matplotlib.figure import Figure

    series = _series(runs, x_key, group_key)
    if not series:
        return False
    fig = Figure(figsize=(5, 3.5), dpi=120)
    ax = fig.add_subplot()
    for label, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=label)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("FID (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return True


def image_grid(runs: list[dict], n_prompts: int = 6, thumb: int = 128) -> Image.Image | None:
    """Rows = runs, columns = the first prompts all runs share (same id, same seed); None if they share none."""
    from .generate import finished_entries

    entries = [finished_entries(r["dir"]) for r in runs]
    common = [i for i in entries[0] if all(i in e for e in entries[1:])]
    ids = sorted(common)[:n_prompts]
    if not ids:
        return None
    label_w, draw_h = 160, thumb
    grid = Image.new("RGB", (label_w + thumb * len(ids), draw_h * len(runs)), "white")
    draw = ImageDraw.Draw(grid)
    for row, (r, e) in enumerate(zip(runs, entries)):
        draw.text((4, row * draw_h + 4), r["name"][:24], fill="black")
        for col, i in enumerate(ids):
            with Image.open(Path(r["dir"]) / e[i]["file"]) as img:
                tile = img.convert("RGB").resize((thumb, thumb), Image.LANCZOS)
            grid.paste(tile, (label_w + col * thumb, row * draw_h))
    return grid


def _group(r: dict) -> str:
    g = r["generation"]
    return str(g.get("method") or g.get("model") or r["name"])


def _group_with_steps(r: dict) -> str:
    return f"{_group(r)} {r['generation'].get('steps')}-step"


def report(runs, out_dir, n_grid_prompts: int = 6) -> str:
    """Write out_dir/report.md (+ fid_vs_steps.png, fid_vs_training_step.png, grid.png); return the markdown."""
    runs = [load_run(r) for r in runs]
    if not runs:
        raise ValueError("no runs to report: pass one or more evaluation folders")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = ["# Evaluation report", "", markdown_table(runs), ""]
    parts += _protocol_notes(runs)
    figures = [
        ("fid_vs_steps.png", plot_fid(runs, "steps", "sampling steps", out_dir / "fid_vs_steps.png", _group, True)),
        ("fid_vs_training_step.png", plot_fid(
            [r for r in runs if r["generation"].get("training_step") is not None], "training_step",
            "training step", out_dir / "fid_vs_training_step.png", _group_with_steps,
        )),
    ]
    grid = image_grid(runs, n_grid_prompts)
    if grid is not None:
        grid.save(out_dir / "grid.png")
        figures.append(("grid.png", True))
    parts += [f"![{name}]({name})" for name, made in figures if made]
    text = "\n".join(parts) + "\n"
    (out_dir / "report.md").write_text(text, encoding="utf-8")
    return text


def _protocol_notes(runs: list[dict]) -> list[str]:
    """One line per distinct protocol/convention, so every number in the table says how it was measured."""
    notes = set()
    for r in runs:
        fid = r["metrics"].get("fid")
        if fid:
            library = fid.get("implementation", {}).get("library")
            incomplete = "" if fid.get("complete", True) else " **(incomplete: fewer images than the protocol)**"
            notes.add(f"- FID `{fid['protocol']}`: {fid.get('preprocessing')}; {library}; reference "
                      f"{fid.get('reference')}; comparable to: {fid.get('comparable_to')}{incomplete}")
        for conv in r["metrics"].get("clip", {}).values():
            notes.add(f"- {conv['label']}: {conv.get('description')}")
    return sorted(notes) + ([""] if notes else [])
