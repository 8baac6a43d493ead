"""Training: the plain loop, Ray Train with real workers (gloo on CPU), exact resume,
fault tolerance, checkpoints, and the command line."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import zarr

from pipeline.config import config_from_dict
from pipeline.data.loading.resident import ResidentSplit
from pipeline.errors import (
    PREEMPTED_EXIT_CODE,
    CheckpointError,
    ConfigError,
    RanksStopped,
    StoreError,
)
from pipeline.train import checkpoint
from pipeline.train.loop import Trainer, train_loop
from pipeline.train.models import area_weighted_mse
from pipeline.train.runtime import Runtime, local_runtime, rank_share
from tests.conftest import run_cli, run_in_two_gloo_ranks, train_config, write_config

pytestmark = pytest.mark.integration


def config(store: Path, runs: Path, **train):
    return config_from_dict(train_config(store, runs, **train))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    latest = checkpoint.list_steps(run / "checkpoints")[0]
    return checkpoint.load(latest)[0]["model"]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --------------------------------------------------------------------------- plain loop


def test_plain_loop_learns_and_beats_persistence(tiny_store: Path, tmp_path: Path) -> None:
    cfg = config(tiny_store, tmp_path, max_steps=40)
    final = train_loop(cfg, local_runtime(cfg))
    history = metrics(cfg.run_dir())
    assert [m["step"] for m in history] == [10, 20, 30, 40]
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert final["val_loss"] < final["val_loss_persistence"]
    assert set(final["val_rmse"]) == {"t2m", "msl", "t850", "t500", "u850", "v850", "ws850"}
    assert 0 <= final["data_wait_fraction"] <= 1 and final["samples_per_s"] > 0
    assert (cfg.run_dir() / "best" / "meta.json").exists()
    progress = json.loads((cfg.run_dir() / "progress.json").read_text())  # the terminal bar's
    assert progress["step"] == 40 and progress["max_steps"] == 40


def test_data_wait_is_the_time_spent_asking_the_loader(tiny_store: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A loader that takes 0.1 s a batch: the reported wait holds those seconds, the
    reported rate counts them, and the loss (read only when reported) is unchanged."""
    delay = 0.1
    plain = config(tiny_store, tmp_path / "plain", max_steps=20, loader="threads")
    train_loop(plain, local_runtime(plain))
    make_loader = Trainer.loader

    def slow_loader(self: Trainer):
        batches = make_loader(self)

        class Slow:
            def __len__(self) -> int:
                return len(batches)

            def __iter__(self):
                for batch in batches:
                    time.sleep(delay)
                    yield batch

            def close(self) -> None:
                batches.close()

        return Slow()

    monkeypatch.setattr(Trainer, "loader", slow_loader)
    slow = config(tiny_store, tmp_path / "slow", max_steps=20, loader="threads")
    train_loop(slow, local_runtime(slow))
    for fast_m, slow_m in zip(metrics(plain.run_dir()), metrics(slow.run_dir()), strict=True):
        assert slow_m["train_loss"] == fast_m["train_loss"]
        steps = 10  # checkpoint_every
        seconds = steps * slow.train.batch_size / slow_m["samples_per_s"]
        assert seconds > steps * delay  # the window's time holds the loader's
        assert steps * delay <= slow_m["data_wait_fraction"] * seconds < seconds
        assert slow_m["data_wait_fraction"] > fast_m["data_wait_fraction"]


def test_plain_loop_resumes_bitwise_mid_epoch(tiny_store: Path, tmp_path: Path) -> None:
    whole = config(tiny_store, tmp_path / "whole", max_steps=30)
    train_loop(whole, local_runtime(whole))
    parts = config(tiny_store, tmp_path / "parts", max_steps=30)
    train_loop(parts, local_runtime(parts), stop_at=13)  # 22 batches per epoch: mid-epoch
    assert checkpoint.list_steps(parts.run_dir() / "checkpoints")[0].name == "step-00000013"
    train_loop(parts, local_runtime(parts))
    assert_bitwise_equal(final_weights(whole.run_dir()), final_weights(parts.run_dir()))
    losses = lambda run: [m["train_loss"] for m in metrics(run) if m["step"] > 20]  # noqa: E731
    assert losses(whole.run_dir()) == losses(parts.run_dir())


def test_rollout_training_with_fno_and_history(tiny_store: Path, tmp_path: Path) -> None:
    cfg = config_from_dict({**train_config(tiny_store, tmp_path, max_steps=30, rollout=2,
                                           history=2),
                            "model": {"arch": "fno", "width": 16, "depth": 2, "modes": 6}})
    final = train_loop(cfg, local_runtime(cfg))
    history = metrics(cfg.run_dir())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert final["val_loss"] < final["val_loss_persistence"]


def read_tensorboard_tags(folder: Path) -> set[str]:
    """Scalar tags in TensorBoard event files (TFRecord framing around Event protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    tags = set()
    for path in folder.glob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            tags.update(v.tag for v in event.summary.value)
            pos += 12 + length + 4
    return tags


def test_tensorboard_scalars(tiny_store: Path, tmp_path: Path) -> None:
    cfg = config(tiny_store, tmp_path, max_steps=20, tensorboard=True)
    train_loop(cfg, local_runtime(cfg))
    tags = read_tensorboard_tags(cfg.run_dir() / "tensorboard")
    assert {"train_loss", "val_loss", "val_rmse/t2m", "samples_per_s"} <= tags


def test_mlflow_run_holds_config_and_metrics_and_resumes(tiny_store: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped at step 10 and resumed logs into one MLflow run (a real file
    store): the config as parameters, every logged step's metrics, status FINISHED."""
    import mlflow

    # MLflow 3 keeps its file store for existing users only; a server or a database
    # backend goes through the same client calls
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    uri = (tmp_path / "mlruns").as_uri()
    cfg = config(tiny_store, tmp_path, max_steps=20, mlflow_uri=uri, mlflow_experiment="tests")
    train_loop(cfg, local_runtime(cfg), stop_at=10)
    first_id = (cfg.run_dir() / "mlflow_run_id").read_text().strip()
    train_loop(cfg, local_runtime(cfg))
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [r.info.run_id for r in runs] == [first_id]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == cfg.run_dir().name
    assert run.data.params["train.batch_size"] == "8"
    assert run.data.params["model.arch"] == "unet"
    logged = {m["step"]: m for m in metrics(cfg.run_dir())}
    history = {m.step: m.value for m in client.get_metric_history(first_id, "train_loss")}
    assert set(history) == set(logged) and max(history) == 20
    for step, value in history.items():
        assert value == pytest.approx(logged[step]["train_loss"], rel=1e-12)
    rmse = client.get_metric_history(first_id, "val_rmse/t2m")
    assert rmse and rmse[-1].value == pytest.approx(logged[20]["val_rmse"]["t2m"], rel=1e-12)


def test_mlflow_asked_for_but_missing_is_exit_2(tiny_store: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from pipeline.train.sinks import check_mlflow

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    cfg = config(tiny_store, tmp_path, mlflow_uri="file:///tmp/x")
    with pytest.raises(ConfigError, match="MLflow is not installed") as err:
        check_mlflow(cfg)
    assert err.value.exit_code == 2


def test_early_stopping_ends_the_run(tiny_store: Path, tmp_path: Path) -> None:
    # a tiny lr cannot improve validation by 1 %: patience 1 stops at the 2nd evaluation
    cfg = config(tiny_store, tmp_path, max_steps=200, val_every=10, lr=1e-9,
                 early_stopping_patience=1, early_stopping_min_delta=0.01)
    final = train_loop(cfg, local_runtime(cfg))
    assert final["step"] == 20


def test_early_stopping_is_on_by_default_and_best_is_the_lowest_val_loss(
        tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scripted validation losses, real training otherwise: the default patience (5)
    stops the run at the 5th validation after the best one; best/ holds that best
    checkpoint, not the last one; `pipeline run` sees the run as finished."""
    from pipeline.workflows import training_done

    script = iter([1.0, 0.5, 0.7, 0.6, 0.55, 0.9, 0.51, 0.4])  # best at the 2nd (step 4)

    def validate(self: Trainer) -> dict:
        return {"val_loss": next(script), "val_loss_persistence": 1.0, "val_rmse": {}}

    monkeypatch.setattr(Trainer, "validate", validate)
    cfg = config(tiny_store, tmp_path, max_steps=30, val_every=2, checkpoint_every=2,
                 batch_size=2, warmup_steps=0)
    assert cfg.train.early_stopping_patience == 5
    final = train_loop(cfg, local_runtime(cfg))
    assert final["step"] == 14  # validations at 6, 8, 10, 12, 14 did not improve on step 4
    assert [m["step"] for m in metrics(cfg.run_dir())] == list(range(2, 16, 2))
    best_state, best_meta = checkpoint.load(cfg.run_dir() / "best")
    assert best_meta.step == 4 and best_state["progress"]["best_val"] == 0.5
    step_4 = checkpoint.load(cfg.run_dir() / "checkpoints" / checkpoint.step_dir_name(4))[0]
    assert_bitwise_equal(best_state["model"], step_4["model"])
    assert not all(torch.equal(best_state["model"][k], v) for k, v in final_weights(
        cfg.run_dir()).items())
    assert training_done(cfg) == 14


def test_the_demo_is_not_cut_short_by_the_default_early_stopping() -> None:
    """configs/demo.yaml validates fewer times than the default patience needs."""
    from pipeline.config import load_config

    train = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").train
    assert train.early_stopping_patience is not None
    assert train.max_steps // train.val_every <= train.early_stopping_patience


def test_batched_validation_equals_the_per_sample_means(tiny_store: Path, tmp_path: Path) -> None:
    """Validation in batches of train.val_batch_size (7: the last batch is short) gives the
    means of the per-sample losses and errors, computed here one sample at a time."""
    cfg = config(tiny_store, tmp_path, max_steps=10, val_batch_size=7)
    train_loop(cfg, local_runtime(cfg))
    trainer = Trainer(cfg, local_runtime(cfg))  # resumes the trained weights
    got = trainer.validate()
    model, val = trainer.stepper.eval(), trainer.val_set
    assert len(val) % 7 != 0
    loss, persistence, squared = [], [], []
    with torch.no_grad():
        for i in range(len(val)):
            s = val[i]
            pred = model.step(s["inputs"][None], s["target_forcings"][None, 0])
            target, last = s["targets"][None, 0], s["inputs"][None, -1, model.outputs]
            loss.append(float(area_weighted_mse(pred, target, trainer.lat_w, trainer.channel_w)))
            persistence.append(float(area_weighted_mse(last, target, trainer.lat_w,
                                                       trainer.channel_w)))
            squared.append(((pred - target) ** 2 * trainer.lat_w[:, None]).mean(dim=(0, 2, 3)))
    _, std = trainer.info.normalisation()
    rmse = torch.stack(squared).mean(0).sqrt().numpy() * std[list(trainer.info.layout.outputs)]
    assert got["val_loss"] == pytest.approx(np.mean(loss), rel=1e-5)
    assert got["val_loss_persistence"] == pytest.approx(np.mean(persistence), rel=1e-5)
    np.testing.assert_allclose(list(got["val_rmse"].values()), rmse, rtol=1e-5)
    assert got["val_loss"] < got["val_loss_persistence"]
    # the val split kept in memory (train.resident): the same batches, the same metrics
    trainer.val_split = ResidentSplit(val, torch.device("cpu"))
    assert trainer.validate() == got


def _rank_collectives(rank: int, out: str) -> None:
    """One of two gloo ranks: the Runtime's host collectives."""
    rt = Runtime(run_dir=Path(out).parent, rank=rank, world_size=2)
    answers = {"sum": rt.all_reduce([1.0 + rank, 10.0 * rank]),
               "max": rt.all_reduce([float(rank)], op="max"),
               "both": rt.on_every_rank(True), "one": rt.on_every_rank(rank == 0)}
    Path(f"{out}-{rank}.json").write_text(json.dumps(answers))


def test_runtime_collectives_between_two_ranks(tmp_path: Path) -> None:
    """Sums, maxima and the all-ranks check (train.resident: auto keeps the splits in
    memory on all ranks or on none) through the Runtime's gloo group, two real ranks."""
    run_in_two_gloo_ranks(_rank_collectives, tmp_path / "rendezvous", str(tmp_path / "rank"))
    for r in range(2):
        answers = json.loads((tmp_path / f"rank-{r}.json").read_text())
        assert answers == {"sum": [3.0, 10.0], "max": [1.0], "both": True, "one": False}


def _rank_stops(rank: int, out: str) -> None:
    """One of two gloo ranks: user errors met on the way to a stop_together."""
    rt = Runtime(run_dir=Path(out).parent, rank=rank, world_size=2)
    answers: dict[str, object] = {}
    for failing in ((1,), (0, 1)):
        own = StoreError(f"shard of rank {rank} damaged", "rebuild") if rank in failing else None
        try:
            rt.stop_together(own, [1.0])
            answers[str(failing)] = "went on"
        except RanksStopped as err:
            answers[str(failing)] = [err.own is own, err.failed, str(err)]
    answers["none"] = rt.stop_together(None, [1.0, float(rank)])
    Path(f"{out}-{rank}.json").write_text(json.dumps(answers))


def test_a_user_error_on_one_rank_stops_every_rank_at_the_next_collective(tmp_path: Path) -> None:
    """Runtime.stop_together, two real ranks: the rank with the error raises it, the other
    raises RanksStopped naming that rank, none waits; without errors, a sum."""
    run_in_two_gloo_ranks(_rank_stops, tmp_path / "rendezvous", str(tmp_path / "rank"))
    zero, one = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2))
    assert zero["(1,)"] == [True, [1], "stopped with rank 1, which met an error "
                                       "(see that rank's error)"]
    assert one["(1,)"] == [True, [1], "shard of rank 1 damaged (rebuild)"]
    assert zero["(0, 1)"] == [True, [0, 1], "shard of rank 0 damaged (rebuild)"]
    assert zero["none"] == one["none"] == [2.0, 1.0]


def _validate_rank(rank: int, store: str, runs: str, out: str) -> None:
    """One of two gloo ranks: validation of a store whose first val shard is damaged."""
    cfg = config(Path(store), Path(runs))
    trainer = Trainer(cfg, Runtime(run_dir=cfg.run_dir(), rank=rank, world_size=2))
    try:
        trainer.validate()
        Path(f"{out}-{rank}.txt").write_text("validated")
    except RanksStopped as err:
        Path(f"{out}-{rank}.txt").write_text(f"{err.failed} {err.own is not None}: {err}")


def test_a_damaged_val_shard_read_by_one_rank_stops_both(tiny_store: Path, tmp_path: Path) -> None:
    """The first val samples are rank 0's: it names the damaged shard, rank 1 stops with
    it at the validation sums instead of waiting there for ever."""
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store)
    from pipeline.data.dataset import ForecastDataset
    from pipeline.data.store import StoreInfo

    val = ForecastDataset(StoreInfo(store), "val", 1, 1)
    shard_index = int(val.times[0]) // val.steps_per_shard
    shard = store / "data" / "c" / str(shard_index) / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-4] + bytes(4))  # the CRC32C ends the index
    run_in_two_gloo_ranks(_validate_rank, tmp_path / "rendezvous", str(store),
                          str(tmp_path / "runs"), str(tmp_path / "rank"))
    zero, one = ((tmp_path / f"rank-{r}.txt").read_text() for r in range(2))
    assert zero.startswith("[0] True: shard ") and f"data/c/{shard_index}/0/0/0" in zero, zero
    assert one.startswith("[0] False: stopped with rank 0, which met an error"), one


@pytest.mark.parametrize(("n", "world_size"), [(10, 1), (10, 3), (2, 4), (0, 2)])
def test_rank_shares_tile_the_samples(n: int, world_size: int) -> None:
    shares = [rank_share(n, r, world_size) for r in range(world_size)]
    assert [i for lo, hi in shares for i in range(lo, hi)] == list(range(n))
    sizes = [hi - lo for lo, hi in shares]
    assert max(sizes) - min(sizes) <= 1


def test_corrupt_latest_checkpoint_is_skipped(tiny_store: Path, tmp_path: Path, caplog) -> None:
    cfg = config(tiny_store, tmp_path, max_steps=20)
    train_loop(cfg, local_runtime(cfg))
    latest = cfg.run_dir() / "checkpoints" / "step-00000020"
    (latest / "state.pt").write_bytes(b"not a checkpoint")
    longer = config(tiny_store, tmp_path, max_steps=30)
    trainer = Trainer(longer, local_runtime(longer))
    assert trainer.resumed_from is not None and trainer.resumed_from.name == "step-00000010"
    assert "skipping checkpoint" in caplog.text and "corrupt" in caplog.text


def test_store_with_other_statistics_is_refused(tiny_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store)
    cfg = config(store, tmp_path, max_steps=10)
    train_loop(cfg, local_runtime(cfg))
    group = zarr.open_group(str(store), mode="r+")
    group["mean"][0] = group["mean"][0] + 1.0
    with pytest.raises(CheckpointError, match="statistics differ"):
        Trainer(config(store, tmp_path, max_steps=20), local_runtime(cfg))


# --------------------------------------------------------------------------- Ray Train


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_learns_and_resumes_bitwise(workers: int, tiny_store: Path, tmp_path: Path,
                                        ray_session: None) -> None:
    from pipeline.train.trainer import train

    whole = config(tiny_store, tmp_path / "whole", max_steps=30, workers=workers, batch_size=4)
    result = train(whole)
    history = metrics(whole.run_dir())
    assert history[-1]["step"] == 30 and not result.preempted
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert history[-1]["val_loss"] < history[-1]["val_loss_persistence"]
    # the stopped and resumed run keeps its split in memory: the same weights again
    parts = config(tiny_store, tmp_path / "parts", max_steps=30, workers=workers, batch_size=4,
                   resident=True)
    train(parts, stop_at=13)
    assert checkpoint.list_steps(parts.run_dir() / "checkpoints")[0].name == "step-00000013"
    train(parts)
    assert_bitwise_equal(final_weights(whole.run_dir()), final_weights(parts.run_dir()))
    if workers == 1:  # the same loss curve as the loop without Ray
        plain = config(tiny_store, tmp_path / "plain", max_steps=30, batch_size=4)
        train_loop(plain, local_runtime(plain))
        np.testing.assert_allclose([m["train_loss"] for m in metrics(plain.run_dir())],
                                   [m["train_loss"] for m in history], rtol=1e-6)


def test_ray_workers_read_with_reader_processes(tiny_store: Path, tmp_path: Path,
                                                ray_session: None) -> None:
    """A Ray Train worker spawns its reader processes (the default loader on a cluster
    with train.loader_workers > 0) and trains the loss curve of the plain loop."""
    from pipeline.train.trainer import train

    ray_run = config(tiny_store, tmp_path / "ray", max_steps=10, val_every=5,
                     checkpoint_every=5, batch_size=4, loader="processes", loader_workers=2)
    train(ray_run)
    plain = config(tiny_store, tmp_path / "plain", max_steps=10, val_every=5,
                   checkpoint_every=5, batch_size=4)
    train_loop(plain, local_runtime(plain))
    np.testing.assert_allclose([m["train_loss"] for m in metrics(plain.run_dir())],
                               [m["train_loss"] for m in metrics(ray_run.run_dir())], rtol=1e-6)


def _kill_a_worker_when(run: Path, step: int, killed: list[tuple[int, int]]) -> None:
    """Kill a Ray Train worker once the metrics reach ``step``; note its pid and the
    last step in the metrics then."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        path = run / "metrics.jsonl"
        steps = [json.loads(line)["step"] for line in path.read_text().splitlines()] \
            if path.exists() else []
        if steps and max(steps) >= step:
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                    os.kill(proc.info["pid"], signal.SIGKILL)
                    killed.append((proc.info["pid"], max(steps)))
                    return
        time.sleep(0.2)


def test_ray_restarts_a_killed_worker_from_the_latest_checkpoint(
        tiny_store: Path, tmp_path: Path, ray_session: None) -> None:
    """A worker killed after step 20: Ray restarts the workers from the latest
    checkpoint Ray has (the one of the last metrics line, or the one before if the
    kill came before Ray took it in), and the run ends at its planned step."""
    from pipeline.train.trainer import train

    cfg = config(tiny_store, tmp_path, max_steps=150, workers=2, batch_size=4, max_failures=2)
    killed: list[tuple[int, int]] = []
    killer = threading.Thread(target=_kill_a_worker_when, args=(cfg.run_dir(), 20, killed))
    killer.start()
    result = train(cfg)
    killer.join()
    assert killed, "no Ray Train worker was found to kill"
    seen = killed[0][1]  # the last step in the metrics when the worker was killed
    lines = metrics(cfg.run_dir())
    assert result.metrics["step"] == 150 and lines[-1]["step"] == 150
    restarts = sorted({m["start_step"] for m in lines} - {0})
    assert restarts, f"no restart in the metrics: {lines}"
    every = cfg.train.checkpoint_every
    assert restarts[0] % every == 0 and seen - every <= restarts[0] <= seen + every, (restarts, seen)
    after = [m["step"] for m in lines if m["start_step"] == restarts[0]]
    assert after[0] == restarts[0] + every  # it went on from its checkpoint


# --------------------------------------------------------------------------- command line


def test_cli_preemption_checkpoints_exits_75_and_the_rerun_finishes(
        tiny_store: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", train_config(tiny_store, tmp_path / "runs",
                                                         max_steps=2000, checkpoint_every=10))
    run = tmp_path / "runs" / "test"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not checkpoint.list_steps(run / "checkpoints") and time.monotonic() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert "preempted at step" in out
    stopped = int(checkpoint.list_steps(run / "checkpoints")[0].name.split("-")[1])
    assert 10 <= stopped < 2000
    result = run_cli("train", str(cfg), "--set", f"train.max_steps={stopped + 10}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"to step {stopped + 10}" in result.stdout
    # a successful run: quiet and useful (no error-level line, not Ray Train's per-rank
    # report dumps, the plan once), short enough for one screen, its plan stored
    lines = (result.stdout + result.stderr).splitlines()
    assert not [line for line in lines if re.search(r"\bERROR\b| E \d+ |^error: ", line)], lines
    assert not [line for line in lines if "Reporting training result" in line], lines
    assert sum("plan: 1 Ray Train workers" in line for line in lines) == 1, lines
    assert len(lines) <= 30, "\n".join(lines)
    plan = json.loads((run / "plan.json").read_text())
    assert plan["workers"] == 1 and plan["where"] == "local" and plan["precision"] == "fp32"


@pytest.mark.parametrize("override, fragment", [
    ("train.batch_size=0", "train.batch_size"),
    ("train.lead=0", "train.lead"),
    ("model.arch=transformer", "model.arch"),
    ("train.resident=maybe", "'train.resident': Input should be 'auto', True or False"),
    ("train.loader_workers=-1", "'train.loader_workers': Input should be greater than or equal "
     "to 0; or Input should be 'auto'"),
])
def test_cli_bad_train_values_exit_2(override: str, fragment: str, tiny_store: Path,
                                     tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", train_config(tiny_store, tmp_path))
    result = run_cli("train", str(cfg), "--set", override)
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_incomplete_store_exit_2(tiny_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store)
    zarr.open_group(str(store), mode="r+").attrs["complete"] = False
    cfg = write_config(tmp_path / "c.yaml", train_config(store, tmp_path))
    result = run_cli("train", str(cfg))
    assert result.returncode == 2 and "incomplete" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a CUDA device")
def test_a_gpu_plan_without_cuda_is_an_error_not_a_cpu_run(tiny_store: Path,
                                                           tmp_path: Path) -> None:
    """train.use_gpu on a machine whose torch finds no CUDA device (a CPU wheel on a GPU
    node, say) was trained on the CPU without a word, a hundred times slower."""
    raw = train_config(tiny_store, tmp_path / "runs", use_gpu=True)
    with pytest.raises(ConfigError, match="finds no CUDA device.*train.use_gpu: false"):
        local_runtime(config_from_dict(raw))
    assert not (tmp_path / "runs").exists()
    result = run_cli("train", str(write_config(tmp_path / "cfg.yaml", raw)), timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]  # before Ray waits for a GPU
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "finds no CUDA device" in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
