"""Markdown table comparing `metasent evaluate --output` JSON files task by task, then each
file's paired difference from the first (task by task, mean ± 95% CI over tasks).

    python -m bench.compare results/default_model/dev/dev_inner_steps_0.json \\
        results/default_model/dev/dev_fomaml_matching_0_steps.json --names proto-maml shipped
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _cell(row: dict[str, Any], key: str) -> str:
    ci = row.get(f"{key}_ci95")
    return f"{row[key]:.2f} ± {ci:.2f}" if ci else f"{row[key]:.2f}"


def compare_table(summaries: list[dict[str, Any]], names: list[str]) -> str:
    """One row per task (and the mean): accuracy and macro-F1 of each summary, then the
    always-positive accuracy of the query set."""
    header = ["task"] + [f"{n} acc" for n in names] + [f"{n} macro-F1" for n in names] + ["always positive"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    tasks = list(summaries[0]["tasks"])
    for task in [*tasks, "mean"]:
        rows = [s["mean"] if task == "mean" else s["tasks"][task] for s in summaries]
        label = f"**mean ({len(tasks)} tasks)**" if task == "mean" else task
        positive = rows[0].get("always_positive_accuracy")
        cells = [_cell(r, "accuracy") for r in rows] + [_cell(r, "macro_f1") for r in rows]
        cells.append("" if positive is None else f"{positive:.2f}")
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def paired_table(summaries: list[dict[str, Any]], names: list[str]) -> str:
    """Each summary after the first minus the first: accuracy and macro-F1 in points, paired task
    by task over the tasks both evaluated (mean ± 95% CI over tasks), and the tasks it is ahead on.

    Raises:
        ValueError: when a summary shares no task with the first.
    """
    from metasent.meta.evaluate import mean_ci95

    lines = [f"| vs {names[0]} | tasks | accuracy | macro-F1 | ahead on |", "|---|---|---|---|---|"]
    reference = summaries[0]["tasks"]
    for name, summary in zip(names[1:], summaries[1:], strict=True):
        tasks = [t for t in reference if t in summary["tasks"]]
        if not tasks:
            raise ValueError(f"{name} shares no task with {names[0]}")
        cells = []
        for key in ("accuracy", "macro_f1"):
            mean, half = mean_ci95([summary["tasks"][t][key] - reference[t][key] for t in tasks])
            cells.append(f"{mean:+.2f} ± {half:.2f}")
        ahead = sum(summary["tasks"][t]["accuracy"] > reference[t]["accuracy"] for t in tasks)
        lines.append(f"| {name} | {len(tasks)} | {cells[0]} | {cells[1]} | {ahead} of {len(tasks)} |")
    return "\n".join(lines)


def restrict_seeds(result: dict[str, Any], seeds: set[int]) -> dict[str, Any]:
    """``result`` (an evaluate JSON with its ``episodes``) summarised over the episodes of
    ``seeds`` only, so that a 5-seed run pairs with a 2-seed one.

    Raises:
        ValueError: when no episode has one of ``seeds``.
    """
    from dataclasses import fields

    from metasent.meta.evaluate import EpisodeResult, summarize

    known = {f.name for f in fields(EpisodeResult)}
    episodes = [
        EpisodeResult(**{k: v for k, v in e.items() if k in known}) for e in result["episodes"] if e["seed"] in seeds
    ]
    if not episodes:
        raise ValueError(f"no episode with seed in {sorted(seeds)}")
    return summarize(episodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--names", nargs="+")
    parser.add_argument("--seeds", help="comma-separated seeds: compare the episodes of these seeds only")
    args = parser.parse_args()
    names = args.names or [p.stem for p in args.results]
    summaries = [json.loads(p.read_text()) for p in args.results]
    if args.seeds:
        seeds = {int(s) for s in args.seeds.split(",")}
        summaries = [restrict_seeds(s, seeds) for s in summaries]
    print(compare_table(summaries, names))
    if len(summaries) > 1:
        print()
        print(paired_table(summaries, names))


if __name__ == "__main__":
    main()
