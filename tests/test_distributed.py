"""Distributed meta-training (meta/distributed.py, torchrun): each rank's share of the meta-batch,
gradients averaged over ranks, rank 0 alone writing checkpoints, and two gloo ranks on the CPU
reaching the meta-parameters of one process with the same total meta-batch and seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from typer.testing import CliRunner

from metasent.cli import cli
from metasent.meta import algorithms, distributed
from metasent.meta.algorithms import AlgorithmSpec, OuterLoop, default_inner_loop
from metasent.meta.config import CheckpointConfig, TrainConfig
from metasent.meta.model import MetaLearner
from metasent.meta.train import MetaTrainer, meta_train
from tests.conftest import free_port, make_task, make_tiny_model, save_tiny_encoder, write_arsc_like

ATOL = 1e-5
"""Meta-parameters of 2 ranks vs 1 process after the same steps: equal up to float summation order."""

ALGORITHMS = ("fomaml", "reptile", "multitask")
"""One per kind of outer step: the query-loss gradient (fomaml_step, also protonet and matching),
Reptile's parameter difference, the multi-task supervised gradient (with its extra head)."""


def _config(model: MetaLearner, algorithm: str, **training: Any) -> CheckpointConfig:
    inner = default_inner_loop(algorithm)
    if algorithm in ("fomaml", "reptile"):
        inner = inner.model_copy(update={"adapted_layers": 1, "steps": 2})
    settings: dict[str, Any] = dict(
        k_shot=2, q_query=2, meta_batch_size=4, outer_steps=3, outer_lr=1e-3, warmup_steps=1, eval_every=2,
        save_every=3, val_episodes=1, val_split="dev", val_q_query=2, query_sampling="natural",
        episode_seeds="per_episode",
    )  # fmt: skip
    settings.update(training)
    return CheckpointConfig(
        algorithm=algorithm, encoder=model.encoder_config, inner_loop=inner, training=TrainConfig(**settings)
    )


def _model(directory: Path, algorithm: str) -> MetaLearner:
    model = make_tiny_model(directory)
    torch.manual_seed(1)  # the initial LoRA tensors, as `metasent train` seeds them
    return model.prepare(_config(model, algorithm).inner_loop)


def _tasks():
    return [make_task("food"), make_task("drinks", "drinks")], [make_task("snacks", "snacks")]


def _fake_world(monkeypatch: pytest.MonkeyPatch, rank: int, world: int) -> None:
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: world)


def test_each_rank_draws_its_slice_of_the_one_process_meta_batch(monkeypatch, tmp_path: Path) -> None:
    model = _model(tmp_path, "fomaml")
    train, _ = _tasks()

    def batches(rank: int, world: int, step: int, **training: Any) -> list[tuple[str, list[str]]]:
        _fake_world(monkeypatch, rank, world)
        trainer = MetaTrainer(model, train, [], _config(model, "fomaml", **training), tmp_path / "run", progress=False)
        trainer.config.step = step
        return [(e.task, [ex.text for ex in e.support + e.query]) for e in trainer.meta_batch()]

    for step in (0, 7):
        whole = batches(0, 1, step)
        assert len(whole) == 4 and len(set(map(str, whole))) == 4  # four different episodes
        assert batches(0, 2, step) + batches(1, 2, step) == whole
        assert batches(0, 4, step) + batches(1, 4, step) + batches(2, 4, step) + batches(3, 4, step) == whole
    assert batches(0, 1, 0) != batches(0, 1, 7)
    # the default single-process stream is what it always was: one generator seeded once
    from metasent.data.episodes import EpisodeSampler

    sampler = EpisodeSampler(train, 2, 2, 2, seed=0, query_sampling="natural")
    expected = [sampler.sample() for _ in range(4)]
    assert batches(0, 1, 0, episode_seeds="stream") == [
        (e.task, [ex.text for ex in e.support + e.query]) for e in expected
    ]
    # a distributed run records per-episode seeds even when given the stream
    _fake_world(monkeypatch, 1, 2)
    trainer = MetaTrainer(model, train, [], _config(model, "fomaml", episode_seeds="stream"), tmp_path, progress=False)
    assert trainer.args.episode_seeds == "per_episode" and trainer.per_rank == 2 and not trainer.progress


def test_a_distributed_meta_batch_must_divide_by_the_world_size(monkeypatch, tmp_path: Path) -> None:
    model = _model(tmp_path, "fomaml")
    train, _ = _tasks()
    _fake_world(monkeypatch, 0, 2)
    with pytest.raises(ValueError, match=r"meta_batch_size=3 .* multiple of WORLD_SIZE=2"):
        MetaTrainer(model, train, [], _config(model, "fomaml", meta_batch_size=3), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"multiple of WORLD_SIZE=4"):
        distributed.check_meta_batch(2, 4)
    assert distributed.check_meta_batch(8, 4) == 2
    # the command says so before loading anything, naming the option
    data = write_arsc_like(tmp_path / "arsc")
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    args = ["train", "--data", str(data), "--output", str(tmp_path / "out"), "--meta-batch-size", "3"]
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 2 and "--meta-batch-size" in result.output and "WORLD_SIZE=2" in result.output
    assert not (tmp_path / "out").exists()


def test_an_algorithm_that_does_not_average_over_ranks_is_refused(monkeypatch, tmp_path: Path) -> None:
    assert all(algorithms.get(name).distributed for name in algorithms.meta_trained())
    spec = AlgorithmSpec("local_only", "a probe (tests)", make_outer_loop=lambda context: OuterLoop(lambda e: (0, 0)))
    algorithms.register(spec)
    try:
        model = _model(tmp_path, "fomaml")
        config = _config(model, "fomaml").model_copy(update={"algorithm": "local_only"})
        _fake_world(monkeypatch, 0, 2)
        with pytest.raises(ValueError, match="'local_only' does not average its outer update"):
            MetaTrainer(model, _tasks()[0], [], config, tmp_path, progress=False)
        _fake_world(monkeypatch, 0, 1)
        MetaTrainer(model, _tasks()[0], [], config, tmp_path, progress=False)  # fine in one process
    finally:
        algorithms.unregister("local_only")


def test_environment_reads_torchrun_variables(monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.environment() == distributed.DistributedEnvironment(0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = distributed.environment()
    assert (env.rank, env.world_size, env.local_rank, env.is_main) == (3, 4, 1, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match=r"RANK=4 must lie in \[0, WORLD_SIZE=4\)"):
        distributed.environment()
    # no process group: the helpers are the single process's
    assert (distributed.rank(), distributed.world_size(), distributed.is_distributed()) == (0, 1, False)
    assert distributed.reduce_step_figures([0.5, 0.25], 2, True) == ([0.5, 0.25], True)


# -- two gloo ranks on the CPU -------------------------------------------------------------------


def _rank_worker(rank: int, world: int, port: int, root: str) -> None:
    """One rank: meta-train each of ALGORITHMS, save its parameters, then a run that rank 0's time
    limit stops; rank 1 must never write a checkpoint."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a rank that misses a collective fails the test in a minute instead of gloo's 30
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        if rank != 0:
            import metasent.meta.train as train_module

            def refuse(*args: Any, **kwargs: Any) -> None:
                raise AssertionError(f"rank {rank} wrote a checkpoint")

            train_module.save_checkpoint = refuse  # type: ignore[assignment]
        for algorithm in ALGORITHMS:
            directory = Path(root) / f"rank{rank}" / algorithm
            directory.mkdir(parents=True)
            model = _model(directory, algorithm)
            if rank != 0:  # a different start on rank 1: the ranks must begin from rank 0's
                with torch.no_grad():
                    for parameter in model.parameters():
                        parameter.add_(0.5)
            train, val = _tasks()
            final = meta_train(model, train, val, _config(model, algorithm), Path(root) / algorithm, progress=False)
            params = {n: p.detach().clone() for n, p in model.named_parameters()}
            torch.save({"params": params, "curve": final.metrics["curve"]}, directory / "result.pt")
        # rank 0's time limit stops every rank at its step (rank 1, given none, would go on to 5)
        model = _model(Path(root) / f"rank{rank}" / "fomaml", "fomaml")
        limit = 1e-9 if rank == 0 else None
        config = _config(model, "fomaml", outer_steps=5, max_minutes=limit)
        final = meta_train(model, *_tasks(), config, Path(root) / "stopped", progress=False)
        (Path(root) / f"rank{rank}" / "stopped_at").write_text(str(final.step))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_with_the_whole_meta_batch(tmp_path: Path) -> None:
    mp.spawn(_rank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}" / "stopped_at").read_text() for r in (0, 1)] == ["1", "1"]
    for algorithm in ALGORITHMS:
        ranks = [torch.load(tmp_path / f"rank{r}" / algorithm / "result.pt") for r in (0, 1)]
        (tmp_path / "one" / algorithm).mkdir(parents=True)
        model = _model(tmp_path / "one" / algorithm, algorithm)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        train, val = _tasks()
        final = meta_train(model, train, val, _config(model, algorithm), tmp_path / "one" / algorithm, progress=False)
        moved = False
        for name, parameter in model.named_parameters():
            for result in ranks:
                torch.testing.assert_close(result["params"][name], parameter.detach(), rtol=0, atol=ATOL, msg=name)
            moved |= not torch.equal(parameter.detach(), start[name])
        assert moved, algorithm
        # rank 0's learning curve holds the whole meta-batch's loss and accuracy
        for mine, theirs in zip(ranks[0]["curve"], final.metrics["curve"], strict=True):
            assert mine["query_loss"] == pytest.approx(theirs["query_loss"], abs=2e-4), algorithm
            assert mine["query_accuracy"] == pytest.approx(theirs["query_accuracy"], abs=2e-4), algorithm
        saved = load_file(tmp_path / algorithm / "last" / "model.safetensors")  # rank 0's checkpoint
        for name, tensor in saved.items():
            if name in ranks[0]["params"]:
                torch.testing.assert_close(tensor, ranks[0]["params"][name], rtol=0, atol=0)


# -- `metasent train` under torchrun ---------------------------------------------------------------


def _train_args(data: Path, encoder: Path, output: Path, steps: int) -> list[str]:
    args = ["train", "--data", str(data), "--output", str(output), "--encoder", str(encoder)]
    args += ["--exclude-domains", "snacks", "--val-domains", "drinks", "--k-shot", "2", "--q-query", "2"]
    args += ["--meta-batch-size", "4", "--outer-steps", str(steps), "--eval-every", "2", "--val-q-query", "2"]
    args += ["--adapted-layers", "1", "--inner-steps", "2", "--max-length", "16", "--outer-lr", "1e-3"]
    return args + ["--no-progress", "--device", "cpu"]


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "metasent.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def _assert_same_weights(a: Path, b: Path) -> None:
    left, right = _weights(a), _weights(b)
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=0, atol=ATOL, msg=name)


@pytest.mark.slow
def test_torchrun_train_and_resume_equal_one_uninterrupted_process(tmp_path: Path) -> None:
    data, encoder = write_arsc_like(tmp_path / "arsc"), save_tiny_encoder(tmp_path / "encoder")
    runner = CliRunner()
    for steps in (3, 5):  # one process, the same total meta-batch and seeds
        args = _train_args(data, encoder, tmp_path / f"one{steps}", steps) + ["--episode-seeds", "per_episode"]
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, result.output

    first = _torchrun(_train_args(data, encoder, tmp_path / "two", 3), tmp_path)
    assert first.stdout.count('"best_val_accuracy"') == 1  # rank 0 alone reports
    two = CheckpointConfig.model_validate_json((tmp_path / "two" / "last" / "metasent.json").read_text())
    assert two.step == 3 and two.training is not None and two.training.episode_seeds == "per_episode"
    assert [v["step"] for v in two.metrics["validation"]] == [0, 2, 3]
    _assert_same_weights(tmp_path / "two" / "last", tmp_path / "one3" / "last")

    resume = _train_args(data, encoder, tmp_path / "two", 5) + ["--resume", str(tmp_path / "two" / "last")]
    _torchrun(resume, tmp_path)
    resumed = json.loads((tmp_path / "two" / "last" / "metasent.json").read_text())
    assert resumed["step"] == 5 and [row["step"] for row in resumed["metrics"]["curve"]] == [1, 2, 3, 4, 5]
    _assert_same_weights(tmp_path / "two" / "last", tmp_path / "one5" / "last")
