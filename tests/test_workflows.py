"""Workflows: warm start, ``retrain`` (no store, no champion, twice on the same data, a new
month appended), ``run`` through the CLI on Ray (and again, skipping every stage), and bad
input to ``pipeline retrain``. Real stores, real training: the plain loop where the test
is not about Ray, the shared Ray session where it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import zarr

from pipeline.cli import main
from pipeline.config import config_from_dict, load_config
from pipeline.errors import CheckpointError
from pipeline.registry import ModelRegistry
from pipeline.train import checkpoint
from pipeline.train.loop import Trainer, train_loop
from pipeline.train.runtime import local_runtime
from pipeline.train.trainer import TrainResult
from pipeline.workflows import Outcome, demo_months, retrain, train_stage
from tests.conftest import train_config, write_config

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def plain(cfg):
    """Train in this process (the workflows' default is Ray Train)."""
    return train_loop(cfg, local_runtime(cfg))


def metrics_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file under the roots with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
            for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- train stage


@pytest.mark.parametrize("worker_only", [True, False])
def test_only_a_ray_worker_node_task_stops_the_chain(tiny_store: Path, tmp_path: Path,
                                                    worker_only: bool) -> None:
    # the field says so, not the metrics: a task 0 that reported nothing still goes on
    cfg = config_from_dict(train_config(tiny_store, tmp_path))
    result = TrainResult(run_dir=cfg.run_dir(), metrics={}, preempted=False,
                         worker_only=worker_only)
    out = Outcome()
    assert train_stage(cfg, lambda _: result, out) is not worker_only
    assert ("served as a Ray worker node" in out.message) is worker_only, out.message


# --------------------------------------------------------------------------- warm start


def test_warm_start_loads_model_weights_only(tiny_store: Path, tmp_path: Path) -> None:
    source = config_from_dict(train_config(tiny_store, tmp_path / "a", max_steps=20,
                                           val_every=20, checkpoint_every=20))
    train_loop(source, local_runtime(source))
    best = source.run_dir() / "best"
    weights = checkpoint.load(best)[0]["model"]
    warm = config_from_dict(train_config(tiny_store, tmp_path / "b", max_steps=20, val_every=20,
                                         checkpoint_every=20, init_from=str(best)))
    trainer = Trainer(warm, local_runtime(warm))
    assert trainer.resumed_from is None and trainer.progress.step == 0
    state = trainer.stepper.state_dict()
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    assert trainer.optimizer.state_dict()["state"] == {}  # a fresh optimiser
    assert trainer.init_from.weights_digest == checkpoint.weights_digest(weights)
    train_loop(warm, local_runtime(warm))
    # 20 more steps from the 20-step model validate better than the 20-step model did
    assert metrics_of(warm.run_dir())[-1]["val_loss"] < metrics_of(source.run_dir())[-1]["val_loss"]
    meta = checkpoint.load(warm.run_dir() / "best")[1]
    assert meta.init_from is not None
    assert meta.init_from.path == str(best) and meta.init_from.step == 20
    # the run's own checkpoint wins from now on; init_from is ignored
    again = Trainer(warm, local_runtime(warm))
    assert again.resumed_from is not None and again.progress.step == 20
    trained = again.stepper.state_dict()
    assert not all(torch.equal(trained[k], weights[k]) for k in weights)
    assert again.init_from == meta.init_from


def test_warm_start_across_statistics_but_not_across_models(tiny_store: Path,
                                                            tmp_path: Path) -> None:
    source = config_from_dict(train_config(tiny_store, tmp_path / "a", max_steps=10))
    train_loop(source, local_runtime(source))
    best = source.run_dir() / "best"
    # an append with recompute_on_append changes the statistics: warm start still works
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store)
    group = zarr.open_group(str(store), mode="r+")
    group["mean"][0] = group["mean"][0] + 1.0
    shifted = config_from_dict(train_config(store, tmp_path / "b", init_from=str(best)))
    assert Trainer(shifted, local_runtime(shifted)).init_from.path == str(best)
    other = train_config(tiny_store, tmp_path / "c", init_from=str(best))
    other["model"]["width"] = 8
    narrow = config_from_dict(other)
    with pytest.raises(CheckpointError, match="does not fit"):
        Trainer(narrow, local_runtime(narrow))
    missing = config_from_dict(train_config(tiny_store, tmp_path / "d",
                                            init_from=str(tmp_path / "nope")))
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        Trainer(missing, local_runtime(missing))


# --------------------------------------------------------------------------- retrain


@pytest.mark.unit
def test_demo_months_follow_the_config() -> None:
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert demo_months(cfg) == 6  # what `pipeline demo-data --size small` writes
    assert demo_months(load_config(REPO / "configs" / "demo.yaml",
                                   ["data.end=2000-08-31T18:00"])) == 8


def retrain_config(tmp_path: Path, raw: Path) -> dict:
    tree = train_config(tmp_path / "store.zarr", tmp_path / "runs", raw=raw, max_steps=30,
                        val_every=10, checkpoint_every=10)
    # one month less of data still has a test period: it grows when March arrives
    tree["data"]["splits"] = {"train": ["2000-01-01", "2000-01-31T18:00"],
                              "val": ["2000-02-01", "2000-02-10T18:00"],
                              "test": ["2000-02-11", "2000-03-31T18:00"]}
    tree["evaluate"] = {"leads": [1, 2], "max_samples": 16}
    tree["registry"] = {"path": str(tmp_path / "registry")}
    return tree


def test_retrain_first_run_noop_then_append_and_warm_start(tiny_raw: Path,
                                                           tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("demo_2000-01.nc", "demo_2000-02.nc", "static.nc"):
        shutil.copy2(tiny_raw / name, raw / name)
    cfg = config_from_dict(retrain_config(tmp_path, raw))
    registry = ModelRegistry.from_config(cfg)

    # no store, no champion: builds the store and registers the first champion
    first = retrain(cfg, train_fn=plain)
    assert "no champion yet: training" in first.message
    assert registry.champion().name == "v0001"
    v1 = registry.get("v0001")
    assert v1.info["run"] == "test-v1" and v1.info["init_from"] is None
    assert v1.info["store"]["dataset_version"] == 1
    assert v1.info["store"]["time_end"].startswith("2000-02-29T18")
    assert [d["challenger"] for d in registry.decisions()] == ["v0001"]

    # the same data again: nothing changes, not even a file's time
    before = snapshot(tmp_path / "registry", tmp_path / "runs", tmp_path / "store.zarr")
    again = retrain(cfg, train_fn=plain)
    assert "nothing to do: dataset version 1 is already registered as v0001" in again.message
    assert snapshot(tmp_path / "registry", tmp_path / "runs", tmp_path / "store.zarr") == before

    # March arrives: appended, warm-started from the champion, registered, decided
    shutil.copy2(tiny_raw / "demo_2000-03.nc", raw / "demo_2000-03.nc")
    third = retrain(cfg, train_fn=plain)
    assert "warm start of" in third.message and "from champion v0001" in third.message
    assert zarr.open_group(str(tmp_path / "store.zarr")).attrs["dataset_version"] == 2
    run = tmp_path / "runs" / "test-v2"
    init = checkpoint.load(run / "best")[1].init_from
    assert init is not None and init.path == str(v1.weights.resolve())
    assert init.weights_digest == checkpoint.weights_digest(
        checkpoint.load(v1.weights)[0]["model"])
    v2 = registry.get("v0002")
    assert v2.info["run"] == "test-v2" and v2.info["store"]["dataset_version"] == 2
    assert v2.info["store"]["time_end"].startswith("2000-03-31T18")
    decision = registry.decisions()[-1]
    assert (decision["challenger"], decision["champion"]) == ("v0002", "v0001")
    # the champion was scored again, on the challenger's (longer) test period
    assert decision["champion_reevaluated"] is True
    rescored = json.loads((v1.path / "evals" / f"{v2.eval_key}.json").read_text())
    original = json.loads((v1.path / "eval" / "metrics.json").read_text())
    assert rescored["store_version"] == 2 and original["store_version"] == 1
    assert rescored["last_init"] > original["last_init"]
    better = decision["challenger_value"] < decision["champion_value"]
    assert decision["promoted"] == better
    assert registry.champion().name == ("v0002" if better else "v0001")
    assert f"v0002 {'promoted to champion' if better else 'not promoted'}" in third.message

    # and again: no new version, no new decision
    before = snapshot(tmp_path / "registry", tmp_path / "runs")
    fourth = retrain(cfg, train_fn=plain)
    assert "nothing to do: dataset version 2" in fourth.message
    assert snapshot(tmp_path / "registry", tmp_path / "runs") == before
    assert len(registry.versions()) == 2 and len(registry.decisions()) == 2


def test_retrain_bad_input_exits_2_before_any_work(tiny_raw: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "c.yaml", retrain_config(tmp_path, tiny_raw))
    (tmp_path / "registry").write_text("a file where the registry goes")
    cases = [([], "is a file, not a folder"),
             (["--set", f"registry.path={tmp_path / 'ok'}", "--set", "registry.lead=3"],
              "registry.lead 3 is not in evaluate.leads"),
             (["--set", "registry.metric=mae"], "registry.metric")]
    for extra, fragment in cases:
        assert main(["retrain", str(config), *extra]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines()
                  if line.startswith("error: ")]
        assert len(errors) == 1 and fragment in errors[0], errors
    assert not (tmp_path / "store.zarr").exists() and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- run


def test_run_on_ray_then_again_skips_everything_then_retrain_registers_it(
        tiny_raw: Path, tmp_path: Path, ray_session: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    tree = retrain_config(tmp_path, tiny_raw)
    tree["train"]["max_steps"] = 20
    config = write_config(tmp_path / "c.yaml", tree)
    assert main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "test"
    assert f"report: {run / 'eval' / 'report.html'}" in out
    assert (run / "eval" / "report.html").is_file()
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    lead1 = [r for r in metrics["records"] if r["lead"] == 1]
    assert len(lead1) == 7 and all(r["rmse"] < r["rmse_persistence"] for r in lead1)
    assert metrics["store_version"] == 1 and metrics["checkpoint_step"] == 20

    before = snapshot(tmp_path / "runs", tmp_path / "store.zarr")
    assert main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    assert "already complete; nothing to do" in out
    assert "already trained (step 20); skipped" in out and "is current; skipped" in out
    assert snapshot(tmp_path / "runs", tmp_path / "store.zarr") == before

    # the first retrain adopts this run as the first champion without training again
    def no_training(_cfg):
        pytest.fail("retrain trained although `pipeline run` had trained this store version")

    outcome = retrain(load_config(config), train_fn=no_training)
    assert "no champion yet: registering" in outcome.message
    registry = ModelRegistry(tmp_path / "registry", "test")
    assert registry.champion().info["run"] == "test"
