"""Readers, the task registry and the episode sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metasent.data.episodes import EpisodeSampler, NotEnoughExamplesError, fixed_episode
from metasent.data.readers import Example, arsc_target_domains, read_arsc, read_table
from metasent.data.registry import Task, TaskRegistry


def write_arsc(root: Path) -> Path:
    root.mkdir()
    lines = {
        "books.t2.train": ["good read\t1", "boring plot\t-1"],
        "books.t2.test": ["lovely story\t1", "dull\t-1", "great\t1"],
        "books.t4.dev": ["fine\t1", "poor\t-1"],
        "apparel.t5.train": ["nice fit\t1", "torn seam\t-1"],
        "extra_domain.t2.train": ["x\t1", "y\t-1"],
    }
    for name, content in lines.items():
        (root / name).write_text("\n".join(content) + "\n")
    (root / "workspace.filtered.list").write_text("apparel\nbooks\n")
    (root / "workspace.target.list").write_text("books\n")
    (root / "README.md").write_text("not a task\n")
    return root


def test_read_arsc_tasks_labels_and_splits(tmp_path: Path) -> None:
    tasks = {t.name: t for t in read_arsc(write_arsc(tmp_path / "arsc"))}
    assert sorted(tasks) == ["apparel.t5", "books.t2", "books.t4"]  # extra_domain is not listed
    books = tasks["books.t2"]
    assert books.domain == "books"
    assert books.labels == ("negative", "positive")
    assert books.split("train") == [Example("good read", "positive"), Example("boring plot", "negative")]
    assert [e.label for e in books.split("test")] == ["positive", "negative", "positive"]
    assert set(tasks["books.t4"].splits) == {"dev"}
    with pytest.raises(KeyError, match="no 'train' split"):
        tasks["books.t4"].split("train")


def test_read_arsc_include_exclude_unfiltered_and_targets(tmp_path: Path) -> None:
    root = write_arsc(tmp_path / "arsc")
    assert {t.domain for t in read_arsc(root, include=["apparel"])} == {"apparel"}
    assert {t.domain for t in read_arsc(root, exclude=["apparel"])} == {"books"}
    assert "extra_domain" in {t.domain for t in read_arsc(root, filtered=False)}
    assert arsc_target_domains(root) == ["books"]


def test_read_arsc_rejects_bad_lines_and_missing_dirs(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    (root / "books.t2.train").write_text("no label here\n")
    with pytest.raises(ValueError, match="books.t2.train:1"):
        read_arsc(root)
    with pytest.raises(FileNotFoundError):
        read_arsc(tmp_path / "missing")


def test_read_table_jsonl_with_domains(tmp_path: Path) -> None:
    path = tmp_path / "reviews.jsonl"
    rows = [
        {"text": "tasty", "label": "pos", "domain": "food"},
        {"text": "stale", "label": "neg", "domain": "food"},
        {"text": "fun", "label": "pos", "domain": "games"},
        {"text": "buggy", "label": "neg", "domain": "games"},
        {"text": "meh", "label": "neutral", "domain": "games"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    tasks = {t.name: t for t in read_table(path)}
    assert sorted(tasks) == ["food", "games"]
    assert tasks["games"].labels == ("neg", "neutral", "pos")
    assert tasks["food"].split("train") == [Example("tasty", "pos"), Example("stale", "neg")]


def test_read_table_csv_default_domain_and_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "shop.csv"
    path.write_text("text,label\ngreat,positive\nbad,negative\n")
    (task,) = read_table(path, split="test")
    assert task.domain == "shop" and set(task.splits) == {"test"}
    bad = tmp_path / "bad.csv"
    bad.write_text("review,label\ngreat,positive\n")
    with pytest.raises(ValueError, match="missing column 'text'"):
        read_table(bad)


def test_read_table_from_saved_dataset_with_class_labels(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    dataset = datasets.Dataset.from_dict({"text": ["good", "bad"], "label": [1, 0]}, features=features)
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "saved"))
    (task,) = read_table(tmp_path / "saved", default_domain="saved")
    assert task.split("train") == [Example("good", "pos"), Example("bad", "neg")]


def test_registry_selection() -> None:
    tasks = [
        Task("a.t2", "a", ("negative", "positive"), {"train": [Example("x", "positive")]}),
        Task("a.t4", "a", ("negative", "positive"), {"dev": [Example("x", "positive")]}),
        Task("b.t2", "b", ("negative", "positive"), {"train": [Example("x", "positive")]}),
    ]
    registry = TaskRegistry(tasks)
    assert registry.domains == ["a", "b"]
    assert registry.select(include=["a"]).names == ["a.t2", "a.t4"]
    assert registry.select(exclude=["a"]).names == ["b.t2"]
    assert registry.select(require_split="train").names == ["a.t2", "b.t2"]
    with pytest.raises(ValueError, match="unknown domains"):
        registry.select(include=["zzz"])
    with pytest.raises(ValueError, match="duplicate"):
        TaskRegistry(tasks + tasks[:1])
    with pytest.raises(KeyError):
        registry["nope"]


def test_sampler_shapes_and_no_overlap(food_task: Task) -> None:
    sampler = EpisodeSampler([food_task], n_way=2, k_shot=3, q_query=4, seed=1)
    for _ in range(20):
        episode = sampler.sample()
        assert episode.labels == ("negative", "positive")
        assert len(episode.support) == 6 and len(episode.query) == 8
        for label in episode.labels:
            assert sum(e.label == label for e in episode.support) == 3
            assert sum(e.label == label for e in episode.query) == 4
        assert not set(episode.support) & set(episode.query)


def test_sampler_seed_reproduces(food_task: Task) -> None:
    def draw(seed: int) -> list:
        sampler = EpisodeSampler([food_task], k_shot=2, q_query=2, seed=seed)
        return [sampler.sample() for _ in range(5)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_sampler_query_from_another_split(food_task: Task) -> None:
    sampler = EpisodeSampler([food_task], k_shot=5, q_query=None, support_split="train", query_split="test")
    episode = sampler.sample()
    assert len(episode.support) == 10
    assert sorted(episode.query, key=lambda e: e.text) == sorted(food_task.split("test"), key=lambda e: e.text)


def test_sampler_too_few_examples_is_a_clear_error(food_task: Task) -> None:
    with pytest.raises(NotEnoughExamplesError, match="label 'negative': 8 examples in 'train'.*needs 9"):
        EpisodeSampler([food_task], k_shot=5, q_query=4).sample()
    with pytest.raises(ValueError):
        EpisodeSampler([food_task], n_way=1)
    three_way = EpisodeSampler([food_task], n_way=3, k_shot=1, q_query=1)
    with pytest.raises(NotEnoughExamplesError, match="n_way=3"):
        three_way.sample()


def test_fixed_episode_uses_whole_files(food_task: Task) -> None:
    episode = fixed_episode(food_task, "train", "test")
    assert episode.support == food_task.split("train")
    assert episode.query == food_task.split("test")
    assert episode.labels == ("negative", "positive")


def test_natural_query_sampling_keeps_class_proportions() -> None:
    positives = [Example(f"good {i}", "positive") for i in range(40)]
    negatives = [Example(f"bad {i}", "negative") for i in range(10)]
    task = Task("skewed", "skewed", ("negative", "positive"), {"train": positives + negatives})
    sampler = EpisodeSampler([task], k_shot=2, q_query=10, query_sampling="natural", seed=3)
    shares = []
    for _ in range(200):
        episode = sampler.sample()
        assert len(episode.query) == 20
        assert {ex.label for ex in episode.support} == {"negative", "positive"}
        assert not {ex.text for ex in episode.support} & {ex.text for ex in episode.query}
        shares.append(sum(ex.label == "positive" for ex in episode.query) / 20)
    # 38 positives and 8 negatives remain after the support set: about 83% positive
    assert 0.78 < sum(shares) / len(shares) < 0.88
    balanced = EpisodeSampler([task], k_shot=2, q_query=5, seed=3).sample()
    assert sum(ex.label == "positive" for ex in balanced.query) == 5
    with pytest.raises(ValueError, match="query_sampling"):
        EpisodeSampler([task], query_sampling="uniform")
