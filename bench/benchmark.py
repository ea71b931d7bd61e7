"""``metasent benchmark``: every method trained (or loaded) and evaluated on the same tasks and
seeds, written to ``<output>/benchmark_<label>.{json,csv,md}`` with PNG plots (results/README.md indexes
the kept runs).

Tasks (never used for a choice): the 12 ARSC test tasks with their fixed 5-shot support files,
and the 6 food tasks (gourmet_food, grocery: held out of meta-training) with sampled 5-shot
support sets over seeds. Choices (which FOMAML variant is the default) use only the ``.dev``
files of the validation domains (music, video), which no method trains on.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from metasent.data.episodes import EpisodeSampler, NotEnoughExamplesError, fixed_episode
from metasent.data.readers import ARSC_HELD_OUT, ARSC_VALIDATION, read_arsc
from metasent.data.registry import Task, TaskRegistry
from metasent.meta import algorithms
from metasent.meta.checkpoint import load_checkpoint, load_model
from metasent.meta.config import CheckpointConfig, EncoderConfig, InnerLoopConfig, TrainConfig
from metasent.meta.evaluate import EpisodeResult, summarize
from metasent.meta.model import MetaLearner, resolve_encoder_path
from metasent.meta.resolve import resolve_inner_loop
from metasent.meta.train import meta_train

logger = logging.getLogger(__name__)

FOOD_DOMAINS = ["gourmet_food", "grocery"]
ARSC_TEST_DOMAINS = ["books", "dvd", "electronics", "kitchen_housewares"]

# Published mean accuracies on the 12 ARSC test tasks (2-way 5-shot), as cited.
PUBLISHED_ARSC = {
    "Induction Networks (Geng et al. 2019, EMNLP)": 85.63,
}


@dataclass(frozen=True)
class Budget:
    """How much each method gets.

    Args:
        name (`str`): the budget's name.
        train_minutes (`float`): wall-clock meta-training minutes per meta-trained method.
        outer_steps (`int | None`): a fixed number of outer steps instead (``smoke``: so that two
            runs, e.g. before and after a refactor, give the same figures).
        max_length (`int`): tokens per text (training and evaluation).
        eval_every (`int`): outer steps between validations (the best is kept).
        food_seeds (`int`): sampled 5-shot episodes per food task.
        kshot_seeds (`int`): sampled episodes per food task and K for the shots curve.
        shots (`tuple[int, ...]`): the K of the shots curve.
        dev_seeds (`int`): sampled episodes per validation task for the dev score.
        setfit_iterations (`int`): SetFit contrastive pairs per support example.
        setfit_food_seeds (`int`): SetFit episodes per food task (it is slow on a CPU).
    """

    name: str
    train_minutes: float
    max_length: int
    eval_every: int
    food_seeds: int
    kshot_seeds: int
    shots: tuple[int, ...]
    dev_seeds: int
    setfit_iterations: int
    setfit_food_seeds: int
    note: str = ""
    outer_steps: int | None = None


BUDGETS = {
    "cpu": Budget(
        "cpu", 4.0, 128, 10, 5, 2, (1, 5, 10, 20), 2, 5, 1,
        "2 CPU cores: 4 minutes of meta-training per method, 128 tokens; SetFit with 5 pair iterations, "
        "1 food seed",
    ),
    "gpu": Budget(
        "gpu", 0.7, 256, 100, 5, 3, (1, 5, 10, 20), 5, 20, 2,
        "one GPU lent for 15 minutes in all: 42 s of meta-training per method, 256 tokens; SetFit with its "
        "default 20 pair iterations, 2 food seeds",
    ),
    "smoke": Budget(
        "smoke", 60.0, 32, 2, 1, 1, (1, 5), 1, 1, 1, "4 outer steps per method: a check that everything runs", 4
    ),
}  # fmt: skip


@dataclass(frozen=True)
class MethodSpec:
    """One method of the benchmark.

    Args:
        name (`str`): its name in the results.
        algorithm (`str`): a name registered in :mod:`meta.algorithms`, or ``"setfit"``.
        inner (`dict`): overrides of the algorithm's default inner loop.
        train (`dict`): overrides of the training settings.
        default_candidate (`bool`): whether it may become the default (every meta-learned method
            and its variants; the benchmark picks the best on the dev tasks).
    """

    name: str
    algorithm: str
    inner: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    default_candidate: bool = False


ANCHORED = ("matching",)
"""Algorithms also benchmarked as ``<name>_anchors``: label-name anchors and natural query sets
(FOMAML trains with both by default)."""
VARIANTS = {
    "fomaml_head": MethodSpec(
        "fomaml_head",
        "fomaml",
        {"adapter": "full", "adapted_layers": 0, "meta_sgd": False, "classifier": "prototype", "steps": 5},
        {"outer_lr": 2e-5},
        default_candidate=True,
    ),
}
"""Further variants: ``fomaml_head`` is FOMAML as it was before LoRA, Meta-SGD and the matching head (head-only inner
loop, every encoder weight meta-trained at the encoder's learning rate)."""
RESULT_NAMES = {"none": "pretrained"}
"""Result names that differ from the algorithm's registered name."""


def select_methods(methods: Sequence[str] | None, known: dict[str, MethodSpec] | None = None) -> list[str]:
    """The methods to run: ``methods``, or every one of :func:`benchmark_methods` when empty.

    Raises:
        KeyError: naming the unknown methods and the known ones.
    """
    known = benchmark_methods() if known is None else known
    unknown = [name for name in methods or [] if name not in known]
    if unknown:
        raise KeyError(f"unknown methods {', '.join(unknown)}; choose from {', '.join(known)}")
    return list(methods or known)


def benchmark_methods() -> dict[str, MethodSpec]:
    """The benchmark's methods, by result name: each registered algorithm (in the order of
    registration; the meta-trained ones may become the default), the ``_anchors`` variants of
    :data:`ANCHORED`, and SetFit."""
    methods: dict[str, MethodSpec] = {}
    for spec in algorithms.specs().values():
        name = RESULT_NAMES.get(spec.name, spec.name)
        methods[name] = MethodSpec(name, spec.name, default_candidate=spec.meta_trained)
        if spec.name in ANCHORED:
            anchored = f"{name}_anchors"
            methods[anchored] = MethodSpec(
                anchored, spec.name, {"label_anchors": True}, {"query_sampling": "natural"}, default_candidate=True
            )
    methods.update(VARIANTS)
    methods["setfit"] = MethodSpec("setfit", "setfit")
    return methods


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the benchmark ran on."""
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _tasks(data: Path) -> TaskRegistry:
    return TaskRegistry(read_arsc(data))


def _train(
    spec: MethodSpec, tasks: TaskRegistry, budget: Budget, encoder: str, out: Path, device: torch.device, seed: int
) -> tuple[MetaLearner, CheckpointConfig, CheckpointConfig]:
    """Meta-train ``spec`` for the budget's minutes; returns the best checkpoint (model and
    config) and the final config (steps, seconds, curves)."""
    defaults = dict(algorithms.get(spec.algorithm).training_defaults)  # as `metasent train` applies them
    inner = resolve_inner_loop(spec.algorithm, **spec.inner)
    train_defaults = {k: v for k, v in defaults.items() if k in TrainConfig.model_fields}
    config = CheckpointConfig(
        algorithm=spec.algorithm,  # type: ignore[arg-type]
        encoder=EncoderConfig(name_or_path=encoder, max_length=budget.max_length),
        inner_loop=inner,
        training=TrainConfig(
            data="arsc",
            exclude_domains=ARSC_HELD_OUT,
            val_domains=ARSC_VALIDATION,
            outer_steps=budget.outer_steps or 100_000,
            max_minutes=budget.train_minutes,
            eval_every=budget.eval_every,
            save_every=100_000,
            warmup_steps=20,
            seed=seed,
            **{**train_defaults, **spec.train},
        ),
    )
    # the step count is open (100k): each method trains for the budget's minutes, its
    # learning rate flat after the warm-up
    train_tasks = tasks.select(exclude=ARSC_HELD_OUT + ARSC_VALIDATION).select(require_split="train")
    val_tasks = tasks.select(include=ARSC_VALIDATION).select(require_split="dev")
    torch.manual_seed(seed)  # the initial LoRA tensors, as `metasent train` seeds them (torch seeds itself at random)
    model = MetaLearner.from_pretrained(config.encoder).prepare(config.inner_loop).to(device)
    final = meta_train(model, list(train_tasks), list(val_tasks), config, out / spec.name, progress=False)
    best, best_config = load_checkpoint(out / spec.name / "best", device)
    return best, best_config, final


def _load(spec: MethodSpec, checkpoint: Path | None, budget: Budget, encoder: str, device: torch.device):
    if checkpoint is not None:
        return load_checkpoint(checkpoint, device)  # trained with its own budget (its config says)
    model, config = load_model(None, encoder, device, spec.algorithm)
    config.inner_loop = resolve_inner_loop(config.inner_loop, **spec.inner)
    config.encoder = config.encoder.model_copy(update={"max_length": budget.max_length})
    model.encoder_config = config.encoder
    return model, config


def _scores(results: Sequence[EpisodeResult]) -> dict[str, Any]:
    summary = summarize(results)
    block: dict[str, Any] = {
        task: {"accuracy": row["accuracy"], "macro_f1": row["macro_f1"], "accuracy_ci95": row["accuracy_ci95"]}
        for task, row in summary["tasks"].items()
    }
    mean = summary["mean"]
    block["mean"] = {k: mean[k] for k in ("accuracy", "accuracy_ci95", "macro_f1", "macro_f1_ci95", "episodes")}
    for key in ("always_positive_accuracy", "adapt_seconds", "ece", *ESTIMATE_KEYS):
        block["mean"][key] = mean[key]
    return block


ESTIMATE_KEYS = ("estimate_mae", "estimate_coverage", "estimate_seconds", "estimate_cost_ratio")
"""The figures of the accuracy estimate at adaptation (:func:`meta.evaluate.estimate_quality`)."""
SUGGEST_K = 5
"""Labels added in the what-to-label-next comparison: 5-shot + 5 suggested against + 5 random."""


def _sampled(tasks: Sequence[Task], k_shot: int, seeds: int, support: str, query: str, max_query: int | None = None):
    """``(episode, seed)`` pairs (at most ``max_query`` query examples, drawn at the task's own
    class proportions); tasks without K examples of a class are skipped."""
    pairs = []
    q_query = max_query // 2 if max_query else None
    for task in tasks:
        for seed in range(seeds):
            sampler = EpisodeSampler([task], k_shot=k_shot, q_query=q_query, support_split=support, query_split=query,
                                     seed=seed, query_sampling="natural")  # fmt: skip
            try:
                pairs.append((sampler.sample(task), seed))
            except NotEnoughExamplesError as error:
                logger.warning("skipped: %s", error)
    return pairs


def _suites(tasks: TaskRegistry, budget: Budget) -> dict[str, list[tuple[Any, int | None]]]:
    """The ``(episode, seed)`` pairs of the ARSC (fixed 5-shot), food and dev suites."""
    arsc = tasks.select(include=ARSC_TEST_DOMAINS)
    food = list(tasks.select(include=FOOD_DOMAINS))
    dev = list(tasks.select(include=ARSC_VALIDATION).select(require_split="dev"))
    return {
        "arsc": [(fixed_episode(task, "train", "test"), None) for task in arsc],
        "food": _sampled(food, 5, budget.food_seeds, "train", "test"),
        "dev": _sampled(dev, 5, budget.dev_seeds, "dev", "dev", max_query=200),
    }


def _evaluate_model(
    model: MetaLearner, inner: InnerLoopConfig, tasks: TaskRegistry, budget: Budget, suggest: bool = False
) -> dict[str, Any]:
    """Accuracy, macro-F1, calibration and the accuracy estimate on every suite and the shots
    curve; with ``suggest``, also 5-shot + 5 suggested labels against + 5 random ones."""
    from metasent.meta.adaptation import Predictor
    from metasent.meta.evaluate import EmbeddingCache, evaluate_episode

    cache = EmbeddingCache(Predictor(model, inner, 64))  # one model: its suites share encoded texts

    def run(pairs):
        return [evaluate_episode(model, episode, inner, seed, 64, True, cache) for episode, seed in pairs]

    suites = _suites(tasks, budget)
    out: dict[str, Any] = {suite: _scores(run(pairs)) for suite, pairs in suites.items()}
    food = list(tasks.select(include=FOOD_DOMAINS))
    out["shots"] = {}
    for k in budget.shots:
        pairs = _sampled(food, k, budget.kshot_seeds, "train", "test")
        out["shots"][str(k)] = _scores(run(pairs))["mean"] if pairs else None
    if suggest:
        out["suggest"] = _evaluate_suggestions(model, inner, suites, budget)
    return out


def _evaluate_suggestions(
    model: MetaLearner, inner: InnerLoopConfig, suites: dict[str, list[tuple[Any, int | None]]], budget: Budget
) -> dict[str, Any]:
    """Per suite: accuracy after the K-shot support set plus :data:`SUGGEST_K` suggested labels
    (BADGE) against plus as many random ones from the same pool, paired over tasks
    (:func:`meta.evaluate.evaluate_active`); ``budget.dev_seeds`` pool splits per ARSC task."""
    from metasent.meta.evaluate import evaluate_active, summarize_active

    out: dict[str, Any] = {}
    for suite, pairs in suites.items():
        splits = budget.dev_seeds if suite == "arsc" else 1  # sampled suites already vary the episode by seed
        results = [
            evaluate_active(model, episode, inner, SUGGEST_K, seed=(seed or 0) * splits + split)
            for episode, seed in pairs
            for split in range(splits)
        ]
        out[suite] = summarize_active(results)
    return out


def _evaluate_setfit(encoder: str, tasks: TaskRegistry, budget: Budget, device: torch.device) -> dict[str, Any]:
    from bench.setfit_baseline import evaluate_setfit

    kwargs = {"num_iterations": budget.setfit_iterations, "max_length": budget.max_length, "device": str(device)}
    path = resolve_encoder_path(encoder)
    arsc = [(fixed_episode(task, "train", "test"), None) for task in tasks.select(include=ARSC_TEST_DOMAINS)]
    food = _sampled(list(tasks.select(include=FOOD_DOMAINS)), 5, budget.setfit_food_seeds, "train", "test")
    return {
        "arsc": _scores(evaluate_setfit(path, arsc, **kwargs)),
        "food": _scores(evaluate_setfit(path, food, **kwargs)),
        "dev": None,
        "shots": {},
    }


def _always_positive(result: dict[str, Any]) -> dict[str, Any]:
    """The always-``positive`` reference row, from the query sets any method was scored on."""
    rows: dict[str, Any] = {}
    for suite in ("arsc", "food"):
        mean = result[suite]["mean"]
        rows[suite] = {"mean": {"accuracy": mean["always_positive_accuracy"]}}
    return rows


def run_benchmark(
    data: Path,
    output: Path,
    budget_name: str = "cpu",
    methods: Sequence[str] | None = None,
    checkpoints: dict[str, Path] | None = None,
    encoder: str = "sentence-transformers/all-MiniLM-L6-v2",
    device: str = "auto",
    runs: Path = Path("runs/benchmark"),
    seed: int = 0,
    label: str | None = None,
    suggest_methods: Sequence[str] | None = ("fomaml",),
) -> dict[str, Any]:
    """Train (or load) and evaluate each method on the same tasks and seeds; write
    ``<output>/benchmark[_<label>].{json,csv,md}`` and PNG plots after every method.

    Args:
        data (`Path`): the ARSC directory.
        output (`Path`): results directory.
        budget_name (`str`, defaults to ``"cpu"``): a key of :data:`BUDGETS`.
        methods (`Sequence[str]`, *optional*): keys of :func:`benchmark_methods` (default: all; SetFit is
            skipped with a warning when it is not installed).
        checkpoints (`dict[str, Path]`, *optional*): trained checkpoints to load instead of
            training, by method name.
        encoder (`str`): the encoder every method starts from.
        device (`str`, defaults to ``"auto"``): torch device.
        runs (`Path`): where the benchmark's own checkpoints go.
        seed (`int`, defaults to 0): training seed.
        label (`str`, *optional*): suffix of the result files (default: the budget's name).
        suggest_methods (`Sequence[str]`, *optional*): methods also measured on what to label
            next (5-shot + 5 suggested against + 5 random labels; three adaptations per episode).

    Returns:
        `dict`: the benchmark (also written as JSON).

    Raises:
        KeyError: for an unknown budget or method.
    """
    from metasent.meta.model import resolve_device

    budget = BUDGETS[budget_name]
    known = benchmark_methods()
    names = select_methods(methods, known)
    checkpoints = checkpoints or {}
    torch_device = resolve_device(device)
    tasks = _tasks(data)
    stem = f"benchmark_{label or budget.name}"
    result: dict[str, Any] = {
        "machine": machine_info(torch_device),
        "budget": asdict(budget),
        "default": None,
        "methods": {},
        "references": {"published_arsc_mean_accuracy": PUBLISHED_ARSC},
        "selection": "the default is the meta-learned method with the best mean accuracy on the music/video "
        ".dev tasks (never trained on); test and food tasks play no part in it",
    }
    for name in names:
        spec = known[name]
        started = time.perf_counter()
        if spec.algorithm == "setfit":
            from bench.setfit_baseline import setfit_available

            if not setfit_available():
                logger.warning("setfit is not installed (pip install -e '.[bench]'): skipped")
                continue
            try:
                entry = _evaluate_setfit(encoder, tasks, budget, torch_device)
            except Exception as error:  # an optional external library: report, don't lose the others
                logger.exception("setfit failed")
                result["methods"][name] = {"error": repr(error)}
                continue
            entry["training"] = None
        else:
            if not algorithms.get(spec.algorithm).meta_trained or name in checkpoints:
                model, config = _load(spec, checkpoints.get(name), budget, encoder, torch_device)
                final = config
            else:
                model, config, final = _train(spec, tasks, budget, encoder, runs, torch_device, seed)
            entry = _evaluate_model(model, config.inner_loop, tasks, budget, name in (suggest_methods or ()))
            entry["training"] = _training_summary(final)
            entry["inner_loop"] = config.inner_loop.model_dump()
            del model
        entry["seconds"] = round(time.perf_counter() - started, 1)
        result["methods"][name] = entry
        if "always_positive" not in result["references"]:
            result["references"]["always_positive"] = _always_positive(entry)
        result["default"] = _choose_default(result["methods"], known)
        write_results(result, output, stem)
        logger.info(
            "%s: ARSC %.2f, food %.2f", name, entry["arsc"]["mean"]["accuracy"], entry["food"]["mean"]["accuracy"]
        )
    return result


def _training_summary(config: CheckpointConfig) -> dict[str, Any] | None:
    if config.training is None:
        return None
    metrics = config.metrics
    steps = metrics.get("curve", [])
    return {
        "algorithm": config.algorithm,
        "outer_steps": config.step,
        "episodes": config.step * config.training.meta_batch_size,
        "train_seconds": metrics.get("train_seconds"),
        "best_step": metrics.get("best_step"),
        "best_val_accuracy": metrics.get("best_val_accuracy"),
        "validation": metrics.get("validation", []),
        "curve_tail_loss": statistics.fmean(r["query_loss"] for r in steps[-20:]) if steps else None,
        "query_sampling": config.training.query_sampling,
        "max_length": config.encoder.max_length,
    }


def _choose_default(methods: dict[str, Any], known: dict[str, MethodSpec] | None = None) -> str | None:
    known = benchmark_methods() if known is None else known
    candidates = {n: m for n, m in methods.items() if n in known and known[n].default_candidate and m.get("dev")}
    if not candidates:
        return None
    return max(candidates, key=lambda n: candidates[n]["dev"]["mean"]["accuracy"])


def paired_differences(result: dict[str, Any]) -> dict[str, Any]:
    """The default's accuracy minus each other method's, per suite, in points with a 95% CI.

    Where both methods ran the same episodes (same tasks and seeds) the difference is paired,
    task by task, with its CI over tasks. Where they did not (SetFit runs fewer food seeds), it is
    the difference of the two means with the CI ``sqrt(ci_a^2 + ci_b^2)``, marked unpaired.

    Returns:
        `dict`: ``{method: {"arsc" | "food": {"mean", "ci95", "tasks", "paired"}}}``; empty
        without a default.
    """
    from metasent.meta.evaluate import mean_ci95

    default = result.get("default")
    methods = _completed(result)
    if default not in methods:
        return {}
    out: dict[str, Any] = {}
    for name, entry in methods.items():
        if name == default:
            continue
        out[name] = {}
        for suite in ("arsc", "food"):
            ours, theirs = methods[default][suite], entry[suite]
            tasks = [task for task in ours if task != "mean" and task in theirs]
            if not tasks:
                continue
            if ours["mean"]["episodes"] == theirs["mean"]["episodes"]:
                mean, half = mean_ci95([ours[task]["accuracy"] - theirs[task]["accuracy"] for task in tasks])
                paired = True
            else:
                mean = ours["mean"]["accuracy"] - theirs["mean"]["accuracy"]
                half = (ours["mean"]["accuracy_ci95"] ** 2 + theirs["mean"]["accuracy_ci95"] ** 2) ** 0.5
                paired = False
            out[name][suite] = {"mean": round(mean, 2), "ci95": round(half, 2), "tasks": len(tasks), "paired": paired}
    return out


def write_results(result: dict[str, Any], output: Path, stem: str) -> list[Path]:
    """Write the JSON, a per-task CSV, a markdown table and the PNG plots; returns the paths."""
    output.mkdir(parents=True, exist_ok=True)
    result["paired_differences"] = paired_differences(result)
    path = output / f"{stem}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return [path, *write_renders(result, output, stem)]


def write_renders(result: dict[str, Any], output: Path, stem: str) -> list[Path]:
    """The renders of a benchmark JSON beside it: ``<stem>.csv``, ``<stem>.md`` and the PNG plots
    (``python -m bench.report`` rewrites them from the committed JSON)."""
    paths = [output / f"{stem}.csv", output / f"{stem}.md"]
    paths[0].write_text(csv_text(result))
    paths[1].write_text(markdown_table(result))
    try:
        paths += plot(result, output, stem)
    except ImportError:
        logger.warning("matplotlib is not installed (pip install -e '.[bench]'): no plots")
    return paths


def csv_text(result: dict[str, Any]) -> str:
    """One row per method, suite and task: accuracy (± 95% CI) and macro-F1."""
    handle = io.StringIO()
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(["method", "suite", "task", "accuracy", "accuracy_ci95", "macro_f1"])
    for method, entry in _completed(result).items():
        for suite in ("arsc", "food", "dev"):
            for task, row in (entry.get(suite) or {}).items():
                writer.writerow([method, suite, task, row["accuracy"], row.get("accuracy_ci95"), row["macro_f1"]])
    return handle.getvalue()


def _completed(result: dict[str, Any]) -> dict[str, Any]:
    """The methods that ran (a failed optional baseline holds only its error)."""
    return {name: entry for name, entry in result["methods"].items() if "error" not in entry}


def _cell(row: dict[str, Any] | None, key: str = "accuracy") -> str:
    if not row or row.get(key) is None:
        return "–"
    ci = row.get(f"{key}_ci95")
    return f"{row[key]:.2f} ± {ci:.2f}" if ci else f"{row[key]:.2f}"


def markdown_table(result: dict[str, Any]) -> str:
    """The summary table: per method, ARSC and food accuracy and macro-F1 (± 95% CI), dev
    accuracy, adaptation seconds and meta-training episodes; reference rows below."""
    budget, machine = result["budget"], result["machine"]
    lines = [
        f"Budget `{budget['name']}`: {budget['note']}. Machine: {machine.get('gpu') or machine['cpu']} "
        f"({machine['device']}, {machine['cpu_count']} CPUs). Default (chosen on dev): **{result['default']}**.",
        "",
        "| method | ARSC acc | ARSC macro-F1 | ARSC ECE | food acc | food macro-F1 | food ECE | dev acc | adapt s "
        "| meta-train episodes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in _completed(result).items():
        arsc, food = entry["arsc"]["mean"], entry["food"]["mean"]
        dev = entry["dev"]["mean"] if entry.get("dev") else None
        training = entry.get("training") or {}
        marker = " (default)" if name == result["default"] else ""
        lines.append(
            f"| {name}{marker} | {_cell(arsc)} | {_cell(arsc, 'macro_f1')} | {_cell(arsc, 'ece')} | {_cell(food)} "
            f"| {_cell(food, 'macro_f1')} | {_cell(food, 'ece')} | {_cell(dev)} | {arsc['adapt_seconds']:.3f} "
            f"| {training.get('episodes', '–')} |"
        )
    for name, entry in result["methods"].items():
        if "error" in entry:
            lines.append(f"| {name} | failed: {entry['error'][:80]} | | | | | | | | |")
    refs = result["references"]
    positive = refs.get("always_positive")
    if positive:
        lines.append(
            f"| always `positive` | {_cell(positive['arsc']['mean'])} | – | – | {_cell(positive['food']['mean'])} "
            "| – | – | – | – | – |"
        )
    for source, accuracy in refs["published_arsc_mean_accuracy"].items():
        lines.append(f"| {source} (published) | {accuracy:.2f} | – | – | – | – | – | – | – | – |")
    lines += [
        "",
        "ECE: expected calibration error of the top-label scores, points (10 bins; Guo et al. 2017); lower is "
        "better calibrated.",
    ]
    lines += _estimate_table(result) + _suggest_table(result)
    differences = result.get("paired_differences") or {}
    if differences:
        lines += [
            "",
            f"Accuracy differences, {result['default']} minus each method (points): paired task by task on the "
            "same episodes, mean ± 95% CI over tasks; 'unpaired' where the method ran fewer seeds (difference "
            "of means, CIs combined). A difference larger than its CI is significant:",
            "",
            "| method | ARSC (12 tasks) | food (6 tasks) |",
            "|---|---|---|",
        ]
        for name, row in differences.items():
            cells = [
                f"{row[s]['mean']:+.2f} ± {row[s]['ci95']:.2f}{'' if row[s].get('paired', True) else ' (unpaired)'}"
                if s in row
                else "–"
                for s in ("arsc", "food")
            ]
            lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def _estimate_table(result: dict[str, Any]) -> list[str]:
    """Markdown rows: how close each method's accuracy estimate at adaptation came to the query
    accuracy, per suite."""
    rows = []
    for name, entry in _completed(result).items():
        for suite in ("dev", "arsc", "food"):
            mean = (entry.get(suite) or {}).get("mean") or {}
            if mean.get("estimate_mae") is None:
                continue
            rows.append(
                f"| {name} | {suite} | {mean['estimate_mae']:.2f} | {mean['estimate_coverage']:.1f} "
                f"| {mean['estimate_seconds']:.4f} | {mean['estimate_cost_ratio']:.3f} |"
            )
    if not rows:
        return []
    return [
        "",
        "Accuracy estimate at adaptation (held-out over the support set, as the server makes it) against the "
        "query accuracy: mean absolute error (points), share of episodes whose 95% interval holds the query "
        "accuracy, median seconds, and median (adaptation + estimate) / adaptation:",
        "",
        "| method | suite | MAE | interval coverage % | estimate s | cost ratio |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def _suggest_table(result: dict[str, Any]) -> list[str]:
    """Markdown rows: 5-shot + 5 suggested labels against + 5 random, per method and suite."""
    rows = []
    for name, entry in _completed(result).items():
        for suite, row in (entry.get("suggest") or {}).items():
            rows.append(
                f"| {name} | {suite} | {row['tasks']} | {row['base_accuracy']:.2f} | {row['random_accuracy']:.2f} "
                f"| {row['suggested_accuracy']:.2f} | {row['suggested_minus_random']:+.2f} ± "
                f"{row['suggested_minus_random_ci95']:.2f} |"
            )
    if not rows:
        return []
    return [
        "",
        f"What to label next: query accuracy after the support set alone, plus {SUGGEST_K} random labels, and plus "
        f"{SUGGEST_K} labels suggested by BADGE (Ash et al. 2020) from the same unlabelled pool (half of the query "
        "set, at most 200; scored on the other half, at most 200). Suggested − random is paired task by task, "
        "mean ± 95% CI over tasks:",
        "",
        "| method | suite | tasks | support only | + random | + suggested | suggested − random |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]


def plot(result: dict[str, Any], output: Path, stem: str) -> list[Path]:
    """Accuracy against shots, the meta-training curves, and adaptation seconds against accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, entry in _completed(result).items():
        shots = {int(k): v["accuracy"] for k, v in (entry.get("shots") or {}).items() if v}
        if shots:
            axes.plot(list(shots), list(shots.values()), marker="o", label=name)
    axes.set(xlabel="shots K per class", ylabel="food query accuracy (%)", xscale="log", title="Accuracy against shots")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7)
    paths.append(_save(figure, output / f"{stem}_shots.png"))

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, entry in _completed(result).items():
        validation = (entry.get("training") or {}).get("validation") or []
        if validation:
            axes.plot([r.get("seconds", 0) for r in validation], [r["accuracy"] for r in validation], label=name)
    axes.set(xlabel="meta-training seconds", ylabel="validation accuracy (%)", title="Meta-training curves (dev)")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7)
    paths.append(_save(figure, output / f"{stem}_curves.png"))

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, entry in _completed(result).items():
        mean = entry["arsc"]["mean"]
        axes.scatter([max(mean["adapt_seconds"], 1e-3)], [mean["accuracy"]], label=name)
        axes.annotate(name, (max(mean["adapt_seconds"], 1e-3), mean["accuracy"]), fontsize=7)
    axes.set(xlabel="adaptation seconds (median)", ylabel="ARSC mean accuracy (%)", xscale="log",
             title="Adaptation time against accuracy")  # fmt: skip
    paths.append(_save(figure, output / f"{stem}_adapt.png"))
    return paths


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def merge_results(paths: Sequence[Path], output: Path, stem: str) -> dict[str, Any]:
    """Merge benchmark JSON files of the same budget (e.g. two calls on a lent GPU), later files
    adding or replacing methods; the default is chosen again on dev and every file rewritten.

    Raises:
        ValueError: when the files' budgets differ.
    """
    results = [json.loads(Path(p).read_text()) for p in paths]
    if len({r["budget"]["name"] for r in results}) != 1:
        raise ValueError("only results of one budget can be merged")
    merged = results[0]
    for other in results[1:]:
        merged["methods"].update(other["methods"])
        merged.setdefault("merged_from", []).append(other["machine"])
    merged["selection"] = results[-1]["selection"]
    merged["default"] = _choose_default(merged["methods"])
    write_results(merged, output, stem)
    return merged


if __name__ == "__main__":
    import typer

    def _merge(
        paths: list[Path], output: Path = Path("results"), label: str = typer.Option(..., help="file suffix")
    ) -> None:
        """Merge benchmark JSON files (later ones add or replace methods) and rewrite every file."""
        logging.basicConfig(level="INFO")
        merged = merge_results(paths, output, f"benchmark_{label}")
        typer.echo(f"default: {merged['default']}")

    typer.run(_merge)
