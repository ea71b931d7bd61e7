"""Every figure of the README, the docs site and the model card, generated from ``results/`` and
the shipped artifact, never copied by hand.

    python -m bench.report            # rewrite the renders, the generated blocks and the model card
    python -m bench.report --check    # exit 1, naming each file that differs from what it would write

What it writes:

* the renders of every ``results/**/benchmark_*.json`` beside it: ``.md``, ``.csv`` and the PNG
  plots (``bench.benchmark.write_renders``; ``raw/`` folders are left as they are);
* the generated blocks of ``README.md`` and ``docs/*.md``: the text between
  ``<!-- generated: KIND ARG... -->`` and ``<!-- /generated -->`` is replaced by what ``KIND``
  renders from its arguments (paths relative to the repository root; see ``BLOCKS``);
* the model card ``metasent/models/default/README.md``, from ``bench/model_card.md`` (a template
  with generated blocks and ``{field}`` slots filled from the artifact's ``metasent.json``).

``--check`` compares the text files only (PNG bytes depend on the matplotlib build);
``tests/test_report.py`` runs it, so a committed figure cannot drift from its source.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
ARTIFACT = ROOT / "metasent" / "models" / "default"
MODEL_CARD = ARTIFACT / "README.md"
MODEL_CARD_TEMPLATE = Path(__file__).with_name("model_card.md")
PAGES = ["README.md", "docs/*.md"]

BLOCK = re.compile(r"(<!-- generated: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.DOTALL)

HEAD_NAMES = {"matching": "matching-network head", "prototype": "prototype-initialised linear head (Proto-MAML)"}


def _load(path: str | Path) -> dict[str, Any]:
    return json.loads((ROOT / path).read_text())


def _ci(value: float, ci: float | None) -> str:
    return f"{value:.2f} ± {ci:.2f}" if ci else f"{value:.2f}"


def artifact_config(artifact: Path = ARTIFACT) -> dict[str, Any]:
    """The shipped model's ``metasent.json``."""
    return json.loads((artifact / "metasent.json").read_text())


# --- sentences about the model, from the artifact ------------------------------------------------


def adapter_phrase(inner: dict[str, Any]) -> str:
    """How the encoder is adapted, e.g. 'LoRA adapters (rank 8, alpha 16) on the query, key, value
    and dense projections of every layer'."""
    if inner.get("adapter") != "lora":
        return "the encoder's own weights"
    layers = "every layer" if inner["lora_layers"] == -1 else f"the top {inner['lora_layers']} layers"
    targets = inner["lora_targets"]
    names = ", ".join(targets[:-1]) + f" and {targets[-1]}" if len(targets) > 1 else targets[0]
    rank = f"rank {inner['lora_rank']}, alpha {inner['lora_alpha']}"
    return f"LoRA adapters ({rank}) on the {names} projections of {layers}"


def head_phrase(inner: dict[str, Any]) -> str:
    """The head, e.g. 'matching-network head with label anchors'."""
    head = HEADS_TEXT.get(inner["classifier"], f"{inner['classifier']} head")
    return head + (" with label anchors" if inner.get("label_anchors") else "")


HEADS_TEXT = HEAD_NAMES


def steps_phrase(inner: dict[str, Any]) -> str:
    """The inner loop, e.g. '3 SGD steps on the top 2 layers' LoRA tensors, each at its own
    meta-learned learning rate (Meta-SGD)', or 'no inner step'."""
    if inner["steps"] == 0:
        return "no inner step: the head is built from the support set's embeddings in one encoder pass"
    layers = {0: "the head only", -1: "every encoder tensor"}.get(
        inner["adapted_layers"], f"the top {inner['adapted_layers']} layers'"
    )
    tensors = " LoRA tensors" if inner.get("adapter") == "lora" and inner["adapted_layers"] > 0 else ""
    tensors = tensors or (" tensors" if inner["adapted_layers"] > 0 else "")
    rates = ", each at its own meta-learned learning rate (Meta-SGD)" if inner.get("meta_sgd") else f" at {inner['lr']}"
    step = "step" if inner["steps"] == 1 else "steps"
    return f"{inner['steps']} SGD {step} on {layers}{tensors}{rates}"


def model_sentence(config: dict[str, Any]) -> str:
    """One sentence: algorithm, encoder, adapters, head and the inner loop served."""
    inner = config["inner_loop"]
    trained = config.get("metrics", {}).get("trained_inner_loop") or inner
    served = (
        f"It is served with {steps_phrase(inner)}"
        if inner["steps"] == trained["steps"]
        else f"It was meta-trained with {steps_phrase(trained)}, and is served with {steps_phrase(inner)}"
    )
    return (
        f"`{config['name']}`: `{config['algorithm']}` meta-training of {adapter_phrase(inner)} over "
        f"`{config['encoder']['name_or_path']}` (frozen), with a {head_phrase(inner)}. {served}."
    )


# --- generated blocks ----------------------------------------------------------------------------


def block_model_summary(*args: str) -> str:
    """README: the shipped model in a sentence and its headline figures."""
    config = artifact_config()
    bench = _load(args[0] if args else "results/default_model/benchmark_default_model.json")
    entry = bench["methods"][bench["default"]]
    positive = bench["references"]["always_positive"]
    rows = [
        "| suite | accuracy | macro-F1 | always positive |",
        "|---|---|---|---|",
    ]
    for suite, label in (("arsc", "ARSC, 12 test tasks (5-shot)"), ("food", "food, 6 held-out tasks (5-shot)")):
        mean = entry[suite]["mean"]
        rows.append(
            f"| {label} | {_ci(mean['accuracy'], mean.get('accuracy_ci95'))} "
            f"| {_ci(mean['macro_f1'], mean.get('macro_f1_ci95'))} | {positive[suite]['mean']['accuracy']:.2f} |"
        )
    return model_sentence(config) + "\n\n" + "\n".join(rows) + "\n"


def block_train_defaults(*args: str) -> str:
    """docs/training.md: what ``metasent train`` does with no option, from ``TrainingArguments``."""
    from metasent.meta.algorithms import get
    from metasent.meta.config import DEFAULT_ALGORITHM, TrainingArguments

    defaults = {name: field.default for name, field in TrainingArguments.model_fields.items()}
    spec = get(DEFAULT_ALGORITHM)
    inner = spec.default_inner_loop().model_dump()
    inner.update({k: v for k, v in spec.training_defaults.items() if k in inner})
    return (
        f"With no option, `metasent train` meta-trains with `{DEFAULT_ALGORITHM}`: "
        f"{adapter_phrase(inner)}, a {head_phrase(inner)} and an inner loop of {steps_phrase(inner)}; "
        f"meta-batches of {defaults['meta_batch_size']} {defaults['n_way']}-way {defaults['k_shot']}-shot episodes "
        f"with {defaults['q_query']} queries per class, AdamW at an outer learning rate of "
        f"{spec.training_defaults.get('outer_lr', defaults['outer_lr'])}.\n"
    )


def block_benchmark(path: str) -> str:
    """The tables of one benchmark JSON (``metasent benchmark``), as its ``.md`` render."""
    from bench.benchmark import markdown_table

    return markdown_table(_load(path))


def block_methods(path: str) -> str:
    """The methods of a benchmark JSON with the head and inner loop each one ran with."""
    result = _load(path)
    rows = ["| method | head | inner loop at adaptation | meta-train episodes |", "|---|---|---|---|"]
    for name, entry in result["methods"].items():
        inner = entry.get("inner_loop")
        if inner is None:
            rows.append(f"| {name} | logistic regression (SetFit) | contrastive fine-tuning | – |")
            continue
        episodes = (entry.get("training") or {}).get("episodes", "–")
        rows.append(f"| {name} | {head_phrase(inner)} | {steps_phrase(inner)} | {episodes} |")
    return "\n".join(rows) + "\n"


def block_compare(*args: str) -> str:
    """``bench.compare``: evaluate JSONs side by side, then each one's paired difference from the
    first. Arguments ``name=path`` (paths relative to the root); ``--seeds=0,1`` restricts seeds."""
    from bench.compare import compare_table, paired_table, restrict_seeds

    seeds = None
    names, summaries = [], []
    for arg in args:
        if arg.startswith("--seeds="):
            seeds = {int(s) for s in arg.split("=", 1)[1].split(",")}
            continue
        name, path = arg.split("=", 1)
        names.append(name)
        summaries.append(_load(path))
    if seeds is not None:
        summaries = [restrict_seeds(s, seeds) for s in summaries]
    return compare_table(summaries, names) + "\n\n" + paired_table(summaries, names) + "\n"


def block_dev_table(*args: str) -> str:
    """Dev accuracy and macro-F1 (± 95% CI over episodes) of evaluate JSONs, one row each
    (arguments ``name=path``)."""
    rows = ["| model | accuracy | macro-F1 | adapt s | file |", "|---|---|---|---|---|"]
    for arg in args:
        name, path = arg.split("=", 1)
        mean = _load(path)["mean"]
        seconds = f"{mean['adapt_seconds']:.2f}" if mean.get("adapt_seconds") else ""
        rows.append(
            f"| {name} | {_ci(mean['accuracy'], mean.get('accuracy_ci95'))} "
            f"| {_ci(mean['macro_f1'], mean.get('macro_f1_ci95'))} | {seconds} | `{Path(path).name}` |"
        )
    positive = _load(args[0].split("=", 1)[1])["mean"].get("always_positive_accuracy")
    if positive is not None:
        rows.append(f"| always `positive` | {positive:.2f} | | | |")
    return "\n".join(rows) + "\n"


def block_paired(*args: str) -> str:
    """Rows of paired differences, each ``question|tried|reference.json|other.json[|seeds]``: the
    other run minus the reference, task by task (mean ± 95% CI over tasks), tasks ahead."""
    from bench.compare import restrict_seeds
    from metasent.meta.evaluate import mean_ci95

    rows = ["| question | tried vs reference | accuracy | macro-F1 | ahead on |", "|---|---|---|---|---|"]
    for arg in args:
        question, tried, reference, other, *rest = arg.split("|")
        a, b = _load(reference), _load(other)
        if rest:
            seeds = {int(s) for s in rest[0].split(",")}
            a, b = restrict_seeds(a, seeds), restrict_seeds(b, seeds)
        tasks = [t for t in a["tasks"] if t in b["tasks"]]
        cells = []
        for key in ("accuracy", "macro_f1"):
            mean, half = mean_ci95([b["tasks"][t][key] - a["tasks"][t][key] for t in tasks])
            cells.append(f"{mean:+.2f} ± {half:.2f}")
        ahead = sum(b["tasks"][t]["accuracy"] > a["tasks"][t]["accuracy"] for t in tasks)
        rows.append(f"| {question} | {tried} | {cells[0]} | {cells[1]} | {ahead} of {len(tasks)} |")
    return "\n".join(rows) + "\n"


def block_paired_methods(path: str) -> str:
    """The default method of a merged benchmark JSON against every other method (paired)."""
    result = _load(path)
    rows = [f"| {result['default']} minus | ARSC (12 tasks) | food (6 tasks) |", "|---|---|---|"]
    for name, row in result["paired_differences"].items():
        cells = [
            f"{row[s]['mean']:+.2f} ± {row[s]['ci95']:.2f}{'' if row[s].get('paired', True) else ' (unpaired)'}"
            if s in row
            else "–"
            for s in ("arsc", "food")
        ]
        rows.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows) + "\n"


def block_speed(*args: str) -> str:
    """``metasent speed`` JSONs (``name=path``): adaptation, bytes per domain, classification and
    meta-training throughput, one column each."""
    runs = [(arg.split("=", 1)[0], _load(arg.split("=", 1)[1])) for arg in args]
    lines = ["| figure | " + " | ".join(name for name, _ in runs) + " |", "|---|" + "---|" * len(runs)]

    def row(label: str, cell: Callable[[dict[str, Any]], str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(r) for _, r in runs) + " |")

    row("inner steps at adaptation", lambda r: str(r["model"]["inner_loop"]["steps"]))
    row("adaptation, 5-shot binary support set (median s)", lambda r: f"{r['adaptation']['adapt_seconds_median']:.3f}")
    row("one encoder forward over the same texts (s)", lambda r: f"{r['adaptation']['forward_seconds_median']:.3f}")
    row("bytes stored per domain", lambda r: f"{r['model']['bytes_per_domain_tensors']:,}")
    row("classification, service path (texts/s)", lambda r: f"{r['classification']['service_texts_per_s']:.1f}")
    row(
        "bare length-sorted encoder forward (texts/s)",
        lambda r: f"{r['classification']['bare_sorted_texts_per_s']:.1f}",
    )
    row(
        "meta-training outer steps/s (meta-batch 4)",
        lambda r: f"{r['meta_training']['outer_steps_per_s']['per_episode_passes']:.3f}",
    )
    row(
        "torch threads / CPUs",
        lambda r: f"{r['machine']['torch_threads']} / {r['machine']['cpu_count']} ({r['machine']['device']})",
    )
    return "\n".join(lines) + "\n"


def block_distributed(path: str) -> str:
    """``python -m bench.distributed``: one row per rank count."""
    result = _load(path)
    lines = [
        "| ranks | device | threads/rank | median step (s) | episodes/s | ratio to 1 rank |",
        "|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        lines.append(
            f"| {run['ranks']} | {run['device']} | {run['threads_per_rank']} | {run['step_seconds_median']:.1f} "
            f"| {run['episodes_per_s']:.3f} | {run['ratio_to_first']:.2f} |"
        )
    lines += [
        "",
        f"{result['algorithm']}, meta-batch {result['meta_batch_size']}, median of {result['steps_timed']} outer "
        f"steps, {result['cpu_count']} CPUs.",
    ]
    return "\n".join(lines) + "\n"


def block_load(path: str) -> str:
    """``python -m bench.load``: requests, statuses and latencies per operation."""
    result = _load(path)

    def ms(value: float) -> str:
        return f"{value / 1000:.1f} s" if value >= 1000 else f"{value:.0f} ms"

    lines = ["| operation | requests | statuses | p50 | p99 |", "|---|---|---|---|---|"]
    for name, op in result["operations"].items():
        statuses = ", ".join(f"{n} × {code}" for code, n in op["statuses"].items())
        lines.append(f"| {name} | {op['requests']} | {statuses} | {ms(op['p50_ms'])} | {ms(op['p99_ms'])} |")
    servers = result.get("servers", 1)
    lines += [
        "",
        f"{result['requests']} requests in {result['duration_s']} s ({result['requests_per_s']:.2f} requests/s) "
        f"from {result['clients']} clients on {servers} server{'s' if servers > 1 else ''}, "
        f"**{result['errors']} errors**; mean adaptation {result['server_adaptation_seconds_mean']:.2f} s "
        f"on the server. Command: `{result.get('command', 'python -m bench.load')}`.",
    ]
    return "\n".join(lines) + "\n"


def block_estimate_calibration(path: str) -> str:
    """``python -m bench.calibrate_estimate``: the spread between tasks added to Wilson's interval."""
    result = _load(path)
    return (
        f"On {result['episodes']} dev episodes ({', '.join(result['domains'])}; {result['k_shot']}-shot, "
        f"{result['seeds']} seeds), Wilson's interval alone held the query accuracy in "
        f"{result['wilson_coverage']:.1f}% of episodes (estimate MAE {result['estimate_mae']:.2f} points); the "
        f"spread between tasks it misses, `task_sd` = {result['task_sd']}, is recorded in the shipped model "
        f"(`inner_loop.estimate_task_sd` = {artifact_config()['inner_loop'].get('estimate_task_sd')}) and added "
        "in quadrature.\n"
    )


BLOCKS: dict[str, Callable[..., str]] = {
    "model-summary": block_model_summary,
    "train-defaults": block_train_defaults,
    "benchmark": block_benchmark,
    "methods": block_methods,
    "compare": block_compare,
    "dev-table": block_dev_table,
    "paired": block_paired,
    "paired-methods": block_paired_methods,
    "speed": block_speed,
    "distributed": block_distributed,
    "load": block_load,
    "estimate-calibration": block_estimate_calibration,
}


def render_blocks(text: str) -> str:
    """``text`` with every generated block rendered again.

    Raises:
        KeyError: for a block of an unknown kind.
    """

    def replace(match: re.Match[str]) -> str:
        kind, *args = shlex.split(match["spec"])
        return match[1] + "\n" + BLOCKS[kind](*args).rstrip("\n") + "\n\n" + match[4]

    return BLOCK.sub(replace, text)


def model_card(artifact: Path = ARTIFACT) -> str:
    """The model card of ``artifact``: the template's ``{field}`` slots filled from its
    ``metasent.json``, then its generated blocks rendered."""
    config = artifact_config(artifact)
    inner = config["inner_loop"]
    trained = config["metrics"].get("trained_inner_loop") or inner
    training = config["training"]
    size = sum(p.stat().st_size for p in artifact.iterdir() if p.name in ("metasent.json", "model.safetensors"))
    fields = {
        "name": config["name"],
        "algorithm": config["algorithm"],
        "encoder": config["encoder"]["name_or_path"],
        "max_length": config["encoder"]["max_length"],
        "adapter": adapter_phrase(inner),
        "head": head_phrase(inner),
        "served_steps": steps_phrase(inner),
        "trained_steps": steps_phrase(trained),
        "served_steps_n": inner["steps"],
        "trained_steps_n": trained["steps"],
        "model_sentence": model_sentence(config),
        "size": f"{size:,}",
        "base_sha256": config["base_sha256"],
        "step": config["step"],
        "best_val": config["metrics"]["best_val_accuracy"],
        "held_out": ", ".join(training["exclude_domains"]),
        "val_domains": ", ".join(training["val_domains"]),
        "extra_data": ", ".join(training["extra_data"]),
        "episodes": (
            f"meta-batches of {training['meta_batch_size']} {training['n_way']}-way {training['k_shot']}-shot "
            f"episodes with {training['q_query']} queries per class ({training['query_sampling']} class "
            f"proportions), AdamW at {training['outer_lr']} with {training['warmup_steps']} warm-up steps"
        ),
        "estimate_task_sd": inner.get("estimate_task_sd"),
    }
    text = MODEL_CARD_TEMPLATE.read_text()
    if text.startswith("<!--"):  # the template's own note
        text = text.split("-->\n", 1)[1]
    text = re.sub(r"\{(\w+)\}", lambda m: str(fields[m[1]]) if m[1] in fields else m[0], text)
    # the card is generated whole, so it keeps no block markers
    return re.sub(r"<!-- /?generated[^>]*-->\n\n?", "", render_blocks(text))


# --- the files -----------------------------------------------------------------------------------


def benchmark_jsons(results: Path = RESULTS) -> list[Path]:
    """Every benchmark JSON under ``results/`` except the raw runs merged into them."""
    return sorted(p for p in results.rglob("benchmark_*.json") if "raw" not in p.relative_to(results).parts)


def expected_texts() -> dict[Path, str]:
    """Every text file this command writes, with the content it would write."""
    from bench.benchmark import csv_text, markdown_table

    out: dict[Path, str] = {}
    for path in benchmark_jsons():
        result = json.loads(path.read_text())
        out[path.with_suffix(".md")] = markdown_table(result)
        out[path.with_suffix(".csv")] = csv_text(result)
    for pattern in PAGES:
        for page in sorted(ROOT.glob(pattern)):
            out[page] = render_blocks(page.read_text())
    out[MODEL_CARD] = model_card()
    return out


def stale() -> list[Path]:
    """The text files whose committed content differs from what ``python -m bench.report`` writes."""
    return [path for path, text in expected_texts().items() if not path.exists() or path.read_text() != text]


def write() -> list[Path]:
    """Rewrite every render (PNG plots included), generated block and the model card; returns the
    files whose content changed."""
    from bench.benchmark import write_renders

    changed = []
    for path in benchmark_jsons():
        renders = sorted(path.parent.glob(f"{path.stem}*.png")) + [path.with_suffix(".md"), path.with_suffix(".csv")]
        before = {p: p.read_bytes() for p in renders if p.exists()}
        for render in write_renders(json.loads(path.read_text()), path.parent, path.stem):
            if before.get(render) != render.read_bytes():
                changed.append(render)
    for path, text in expected_texts().items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is out of date")
    args = parser.parse_args()
    if args.check:
        old = stale()
        for path in old:
            print(f"out of date: {path.relative_to(ROOT)} (run python -m bench.report)", file=sys.stderr)
        sys.exit(1 if old else 0)
    for path in write():
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
