"""Readers that turn review files into :class:`~data.registry.Task` objects.

Two sources are supported:

* the ARSC directory format (Yu et al., "Diverse Few-Shot Text Classification with Multiple
  Metrics", NAACL 2018): one binary task per ``<domain>.t{2,4,5}`` with ``.train``, ``.dev`` and
  ``.test`` files of ``text<TAB>label`` lines, label ``-1``/``1``;
* generic tables (JSON Lines, CSV, a Hugging Face dataset saved to disk or on a hub) with ``text``,
  ``label`` and optionally ``domain`` columns, read through the ``datasets`` library.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .registry import Task, TaskRegistry

logger = logging.getLogger(__name__)

ARSC_LABELS: dict[str, str] = {"-1": "negative", "1": "positive"}
ARSC_SPLITS = ("train", "dev", "test")
# Held out of meta-training in this project: ARSC's 4 test domains and the 2 food domains.
ARSC_HELD_OUT = ["books", "dvd", "electronics", "kitchen_housewares", "gourmet_food", "grocery"]
# Validation domains: they have only .dev and .test files, so no method ever trains on them.
ARSC_VALIDATION = ["music", "video"]
_ARSC_FILE = re.compile(r"^(?P<domain>[a-z_]+)\.(?P<threshold>t[245])\.(?P<split>train|dev|test)$")


@dataclass(frozen=True)
class Example:
    """One labelled text.

    Args:
        text (`str`): the review text.
        label (`str`): its label name, e.g. ``"positive"``.
    """

    text: str
    label: str


def _read_arsc_file(path: Path) -> list[Example]:
    examples = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            text, sep, raw_label = line.rpartition("\t")
            if not sep or raw_label.strip() not in ARSC_LABELS:
                raise ValueError(
                    f"{path}:{line_number}: expected 'text<TAB>label' with label -1 or 1, got {line[:80]!r}"
                )
            examples.append(Example(text=text.strip(), label=ARSC_LABELS[raw_label.strip()]))
    return examples


def arsc_target_domains(root: str | Path) -> list[str]:
    """The 4 ARSC test domains listed in ``workspace.target.list`` (books, dvd, electronics,
    kitchen_housewares in the standard protocol).

    Raises:
        FileNotFoundError: when ``root`` has no ``workspace.target.list``.
    """
    path = Path(root) / "workspace.target.list"
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_arsc(
    root: str | Path,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    filtered: bool = True,
) -> list[Task]:
    """Read ARSC tasks from a directory of ``<domain>.t{2,4,5}.{train,dev,test}`` files.

    A task whose ``.train`` file is missing (music and video in the public snapshot) is still
    returned with the splits it has.

    Args:
        root (`str | Path`): the ARSC directory.
        include (`list[str]`, *optional*): domain names to keep (default: all).
        exclude (`list[str]`, *optional*): domain names to drop.
        filtered (`bool`, defaults to True): keep only the 23 domains of
            ``workspace.filtered.list`` when that file exists (the standard protocol; the source
            snapshot has a few more, too small, domains).

    Returns:
        `list[Task]`: tasks sorted by name, labels ``("negative", "positive")``.

    Raises:
        FileNotFoundError: when ``root`` is not a directory or holds no ARSC file.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ARSC directory not found: {root}")
    files: dict[tuple[str, str], dict[str, Path]] = defaultdict(dict)
    for path in sorted(root.iterdir()):
        match = _ARSC_FILE.match(path.name)
        if match is None:
            continue
        key = (match["domain"], match["threshold"])
        files[key][match["split"]] = path
    if not files:
        raise FileNotFoundError(f"no '<domain>.t[245].<split>' files in {root}")
    listed = root / "workspace.filtered.list"
    if filtered and listed.is_file():
        allowed = {line.strip() for line in listed.read_text().splitlines() if line.strip()}
        files = {key: value for key, value in files.items() if key[0] in allowed}
    tasks = []
    for (domain, threshold), split_paths in sorted(files.items()):
        if include is not None and domain not in include:
            continue
        if exclude is not None and domain in exclude:
            continue
        splits = {split: _read_arsc_file(path) for split, path in split_paths.items()}
        tasks.append(
            Task(
                name=f"{domain}.{threshold}",
                domain=domain,
                labels=tuple(sorted(ARSC_LABELS.values())),
                splits=splits,
            )
        )
    logger.info("read %d ARSC tasks from %s", len(tasks), root)
    return tasks


def _load_dataset_dict(source: str, split: str | None) -> dict[str, Any]:
    """Load ``source`` with the ``datasets`` library: a ``.jsonl``/``.json``/``.csv`` file, a
    dataset directory written by ``save_to_disk``, or a hub name (needs network or a cache)."""
    import datasets  # heavy import, only at this edge

    path = Path(source)
    if path.is_file():
        builder = "csv" if path.suffix.lower() == ".csv" else "json"
        loaded = datasets.load_dataset(builder, data_files={split or "train": str(path)})
    elif path.is_dir():
        loaded = datasets.load_from_disk(str(path))
    else:
        loaded = datasets.load_dataset(source)
    if isinstance(loaded, datasets.Dataset):
        return {split or "train": loaded}
    return dict(loaded)


def read_table(
    source: str | Path,
    split: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    domain_column: str = "domain",
    default_domain: str | None = None,
) -> list[Task]:
    """Read a table of labelled texts into one task per domain.

    Args:
        source (`str | Path`): a JSON Lines / JSON / CSV file, a directory written by
            ``datasets.Dataset.save_to_disk``, or a Hugging Face hub dataset name.
        split (`str`, *optional*): split name given to a single file (default ``"train"``).
        text_column (`str`, defaults to ``"text"``): column holding the text.
        label_column (`str`, defaults to ``"label"``): column holding the label (names or ints;
            ints are turned into strings unless the dataset has a ``ClassLabel`` feature).
        domain_column (`str`, defaults to ``"domain"``): optional column naming each row's domain.
        default_domain (`str`, *optional*): domain for rows without a domain column (default:
            the file's stem or the dataset name).

    Returns:
        `list[Task]`: one task per domain, named after the domain, labels sorted by name.

    Raises:
        FileNotFoundError / datasets errors: when ``source`` cannot be loaded.
        ValueError: when a required column is missing or a text or label is empty.
    """
    source = str(source)
    fallback_domain = default_domain or Path(source).stem or source
    per_domain: dict[str, dict[str, list[Example]]] = defaultdict(lambda: defaultdict(list))
    for split_name, dataset in _load_dataset_dict(source, split).items():
        columns = dataset.column_names
        for column in (text_column, label_column):
            if column not in columns:
                raise ValueError(f"{source}: missing column {column!r} (columns: {columns})")
        label_feature = dataset.features[label_column]
        names = getattr(label_feature, "names", None)
        for row_number, row in enumerate(dataset):
            text, label = row[text_column], row[label_column]
            label = names[label] if names is not None else label
            if not isinstance(text, str) or not text.strip() or label is None or str(label) == "":
                raise ValueError(f"{source}[{split_name}] row {row_number}: empty text or label")
            domain = str(row.get(domain_column) or fallback_domain)
            per_domain[domain][split_name].append(Example(text=text.strip(), label=str(label)))
    tasks = []
    for domain, splits in sorted(per_domain.items()):
        labels = tuple(sorted({ex.label for exs in splits.values() for ex in exs}))
        tasks.append(Task(name=domain, domain=domain, labels=labels, splits=dict(splits)))
    return tasks


def is_arsc(source: str | Path) -> bool:
    """Whether ``source`` is an ARSC directory (files ``<domain>.t2.train`` and so on)."""
    path = Path(source)
    return path.is_dir() and any(path.glob("*.t[245].*"))


def read_tasks(source: str | Path, include: list[str] | None = None, exclude: list[str] | None = None) -> TaskRegistry:
    """The tasks of ``source``: an ARSC directory (:func:`read_arsc`), else a table or dataset
    (:func:`read_table`), restricted to the domains in ``include`` (all when ``None``) and not in
    ``exclude``.

    Returns:
        `TaskRegistry`: the selected tasks.

    Raises:
        ValueError: when ``include`` names a domain that ``source`` lacks, or (as
            :func:`read_table`) a row is invalid.
        FileNotFoundError: when ``source`` cannot be found.
    """
    tasks = read_arsc(source) if is_arsc(source) else read_table(str(source))
    return TaskRegistry(tasks).select(include=include, exclude=exclude)


def read_table_folders(sources: list[str], exclude: list[str]) -> TaskRegistry:
    """Tasks from JSONL/CSV files, or every ``*.jsonl``/``*.csv`` file of a folder: one task per
    domain, their rows the ``train`` split (``metasent train --extra-data``), without the domains
    in ``exclude``.

    Returns:
        `TaskRegistry`: the tasks that have a ``train`` split.

    Raises:
        FileNotFoundError: naming a source that is missing or a folder with no such file.
        ValueError: when two files hold the same domain, or a row is invalid.
    """
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        found = sorted([*path.glob("*.jsonl"), *path.glob("*.csv")]) if path.is_dir() else [path]
        if not found or not all(f.is_file() for f in found):
            raise FileNotFoundError(f"{source}: no JSONL or CSV file there")
        files += found
    tasks = [task for file in files for task in read_table(str(file))]
    return TaskRegistry(tasks).select(exclude=exclude).select(require_split="train")


def validation_tasks(source: str | Path, extra: list[str], domains: list[str], split: str) -> TaskRegistry:
    """Validation tasks: the ``domains`` of ``source`` with their ``split``, and the ``domains`` of
    the ``extra`` tables (:func:`read_table_folders`), each held out of meta-training whole, all its
    rows becoming its ``split`` (e.g. a Chinese category as a dev domain).

    Raises:
        ValueError: when a domain is in neither ``source`` nor ``extra``.
        FileNotFoundError: naming an extra source that is missing.
    """
    main = read_tasks(source)
    tasks = list(main.select(include=[d for d in domains if d in main.domains], require_split=split))
    rest = [d for d in domains if d not in main.domains]
    if rest:
        held = read_table_folders(extra, exclude=[]) if extra else TaskRegistry([])
        tasks += [Task(t.name, t.domain, t.labels, {split: t.split("train")}) for t in held.select(include=rest)]
    return TaskRegistry(tasks)
