"""Faults of runs and the registry: two writers of one run, a resume with another config,
two retrains at once, and a promotion killed at each of its steps. Real processes (the
CLI, a plain-loop training, a registry writer) and real files; kills are SIGKILL."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import config_from_dict, load_config
from pipeline.errors import PREEMPTED_EXIT_CODE, CheckpointError, PipelineError
from pipeline.evaluate.evaluate import evaluate
from pipeline.registry import ModelRegistry
from pipeline.train import checkpoint
from pipeline.train.loop import train_loop
from pipeline.train.meta import CheckpointMeta
from pipeline.train.rundir import run_writer
from pipeline.train.runtime import local_runtime
from pipeline.workflows import retrain
from tests.conftest import run_cli, train_config, write_config

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def plain(cfg):
    """Train in this process (the workflows' default is Ray Train)."""
    return train_loop(cfg, local_runtime(cfg))


def steps_of(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def start(code: str, *args: str) -> subprocess.Popen[str]:
    """``python -c code args`` from the repository, its output piped."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(run: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not checkpoint.list_steps(run / "checkpoints"):
        if proc.poll() is not None:
            pytest.fail(f"the training ended early: {proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.2)


def kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.communicate(timeout=30)


TRAIN_IN_PROCESS = """
import sys
from pipeline.config import load_config
from pipeline.train.loop import train_loop
from pipeline.train.runtime import local_runtime
cfg = load_config(sys.argv[1])
train_loop(cfg, local_runtime(cfg))
"""


# --------------------------------------------------------------------------- one run, one writer


def test_second_train_of_a_ray_run_exits_2_naming_the_driver(tiny_store: Path,
                                                             tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", train_config(
        tiny_store, tmp_path / "runs", max_steps=100000, checkpoint_every=5, val_every=5))
    run = tmp_path / "runs" / "test"
    first = subprocess.Popen([sys.executable, "-m", "pipeline", "train", str(config)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoint(run, first, timeout=180)  # its Ray worker trains meanwhile
        began = time.monotonic()
        second = run_cli("train", str(config), "--set", "train.lr=0.01", timeout=60)
        assert time.monotonic() - began < 60
        assert second.returncode == 2, second.stderr[-3000:]
        errors = error_lines(second.stderr)
        assert len(errors) == 1, second.stderr[-3000:]
        assert str(run) in errors[0] and f" {first.pid})" in errors[0], errors
        assert first.poll() is None, "the first training stopped"
        config_yaml = yaml.safe_load((run / "config.yaml").read_text())
        assert config_yaml["train"]["lr"] == 0.003  # the second did not replace it
        first.send_signal(signal.SIGTERM)  # checkpoint and stop
        first.communicate(timeout=180)
        assert first.returncode == PREEMPTED_EXIT_CODE
    finally:
        if first.poll() is None:
            kill(first)
    steps = steps_of(run)
    assert steps == sorted(set(steps)), steps  # each step written once, by one writer


def test_cli_train_is_refused_while_an_in_process_training_runs_and_free_after_a_kill(
        tiny_store: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", train_config(
        tiny_store, tmp_path / "runs", max_steps=100000, checkpoint_every=5, val_every=5))
    run = tmp_path / "runs" / "test"
    holder = start(TRAIN_IN_PROCESS, str(config))
    try:
        wait_for_checkpoint(run, holder)
        second = run_cli("train", str(config), timeout=60)
        assert second.returncode == 2, second.stderr[-3000:]
        errors = error_lines(second.stderr)
        assert len(errors) == 1 and "is being trained by another process" in errors[0], errors
        assert f" {holder.pid})" in errors[0] and str(run) in errors[0], errors
    finally:
        kill(holder)
    # a killed writer leaves nothing held: the run can be taken at once
    with run_writer(load_config(config)) as taken:
        assert taken == run


# --------------------------------------------------------------------------- resume


def test_resume_with_other_lr_is_refused_and_with_more_steps_continues(
        tiny_store: Path, tmp_path: Path) -> None:
    tree = train_config(tiny_store, tmp_path / "runs", max_steps=10, val_every=5,
                        checkpoint_every=5)
    config = write_config(tmp_path / "c.yaml", tree)
    train_loop(load_config(config), local_runtime(load_config(config)))
    run = tmp_path / "runs" / "test"
    stored = (run / "config.yaml").read_text()
    assert steps_of(run) == [5, 10]

    changed = run_cli("train", str(config), "--set", "train.lr=0.01", "--set", "train.seed=3",
                      timeout=60)
    assert changed.returncode == 2, changed.stderr[-3000:]
    errors = error_lines(changed.stderr)
    assert len(errors) == 1 and "train.lr, train.seed" in errors[0], errors
    assert "new run name" in errors[0] and str(run) in errors[0], errors
    assert (run / "config.yaml").read_text() == stored and steps_of(run) == [5, 10]

    longer = load_config(config, ["train.max_steps=20", "train.val_every=10",
                                  "train.keep_checkpoints=2"])
    final = train_loop(longer, local_runtime(longer))
    assert final["step"] == 20 and steps_of(run) == [5, 10, 15, 20]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["start_step"] == 10
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 20


# --------------------------------------------------------------------------- retrain


RETRAIN_IN_PROCESS = """
import sys
from pipeline.config import load_config
from pipeline.train.loop import train_loop
from pipeline.train.runtime import local_runtime
from pipeline.workflows import retrain
retrain(load_config(sys.argv[1]), train_fn=lambda cfg: train_loop(cfg, local_runtime(cfg)))
"""


def retrain_tree(tiny_raw: Path, tiny_store: Path, tmp_path: Path, **train) -> dict:
    """A retrain config on the tiny store itself (its data config, so that the append
    finds nothing new and changes nothing)."""
    tree = train_config(tiny_store, tmp_path / "runs", raw=tiny_raw, **train)
    tree["evaluate"] = {"leads": [1], "max_samples": 8}
    tree["registry"] = {"path": str(tmp_path / "registry")}
    return tree


def test_second_retrain_is_refused_while_one_runs_and_a_killed_one_is_taken_over(
        tiny_raw: Path, tiny_store: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", retrain_tree(
        tiny_raw, tiny_store, tmp_path, max_steps=100000, val_every=5, checkpoint_every=5))
    run = tmp_path / "runs" / "test-v1"
    first = start(RETRAIN_IN_PROCESS, str(config))
    try:
        wait_for_checkpoint(run, first, timeout=180)
        second = run_cli("retrain", str(config), timeout=60)
        assert second.returncode == 2, second.stderr[-3000:]
        errors = error_lines(second.stderr)
        assert len(errors) == 1 and "another retrain" in errors[0], errors
        assert f" {first.pid})" in errors[0], errors
        assert first.poll() is None, "the first retrain stopped"
    finally:
        kill(first)
    registry = ModelRegistry(tmp_path / "registry", "test")
    assert registry.versions() == [] and registry.champion() is None
    # the killed retrain left no lock: the next one finishes its run and promotes it
    cfg = load_config(config, ["train.max_steps=10"])
    outcome = retrain(cfg, train_fn=plain)
    assert "promoted to champion" in outcome.message, outcome.message
    assert registry.champion().name == "v0001"
    steps = steps_of(run)
    assert steps == sorted(set(steps)), steps


# --------------------------------------------------------------------------- promotion


@pytest.fixture(scope="module")
def two_versions(tiny_raw: Path, tiny_store: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A registry template: v0001 (2 steps) the champion, v0002 (30 steps, better) only
    registered, both on the tiny store's data; and the config that reads it."""
    root = tmp_path_factory.mktemp("promotion")
    tree = retrain_tree(tiny_raw, tiny_store, root)
    template = root / "registry-template"
    registry = ModelRegistry(template, "test")
    for name, steps in (("short", 2), ("long", 30)):
        cfg = config_from_dict({**tree, "name": name, "train": {
            **tree["train"], "max_steps": steps, "val_every": min(steps, 10),
            "checkpoint_every": min(steps, 10)}})
        train_loop(cfg, local_runtime(cfg))
        evaluate(cfg, report=False)
        version, _ = registry.register(cfg.run_dir(), cfg.data.store)
        if name == "short":
            registry.challenge(version, cfg)
    return {"template": template, "tree": tree}


PROMOTE_STEPS = """
import sys, time
from pathlib import Path
from pipeline.registry import ModelRegistry, compare
root, point, marker = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
registry = ModelRegistry(root, "test")
challenger, champion = registry.get("v0002"), registry.champion()
key = challenger.eval_key
result = compare(challenger.metrics_for(key).records, champion.metrics_for(key).records,
                 "rmse", 1, 0.0)
decision = {"challenger": challenger.name, "champion": champion.name, "eval_key": key,
            "time": "now", "metric": "rmse", "lead": 1, "min_improvement": 0.0,
            "promoted": result.promote, "reason": result.reason}
with registry.lock():
    if point >= 1:
        registry._append_decision(decision)  # the journal
    if point >= 2:
        registry._set_champion(challenger, champion.name)  # then champion.json
    marker.write_text(f"{point} {result.promote}")
    time.sleep(600)  # killed here, the lock held
"""


def kill_at(root: Path, point: int, marker: Path) -> None:
    """Run the promotion of v0002 up to ``point`` (0: nothing written, 1: the decision,
    2: the decision and champion.json) under the lock, then SIGKILL it."""
    writer = start(PROMOTE_STEPS, str(root), str(point), str(marker))
    deadline = time.monotonic() + 120
    while not marker.exists():
        if writer.poll() is not None:
            pytest.fail(f"the promotion steps failed: {writer.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "the promotion steps did not finish in time"
        time.sleep(0.1)
    kill(writer)
    assert marker.read_text() == f"{point} True"  # v0002 is better: a promotion


@pytest.mark.parametrize(("point", "next_call"), [
    (0, "registry"), (1, "retrain"), (1, "registry"), (2, "retrain")],
    ids=["before-journal", "after-journal-then-retrain", "after-journal-then-list",
         "after-champion"])
def test_promotion_killed_at_each_step_is_completed_by_the_next_call(
        two_versions: dict, tmp_path: Path, point: int, next_call: str) -> None:
    root = tmp_path / "registry"
    shutil.copytree(two_versions["template"], root)
    kill_at(root, point, tmp_path / "at")
    registry = ModelRegistry(root, "test")
    on_disk = json.loads((registry.root / "champion.json").read_text())["version"]
    assert on_disk == ("v0002" if point == 2 else "v0001")
    tree = {**two_versions["tree"], "registry": {"path": str(root)}}
    config = write_config(tmp_path / "c.yaml", tree)
    expected = "v0001" if point == 0 else "v0002"

    if next_call == "retrain":  # the bug: "nothing to do (champion: v0001)" for ever
        outcome = retrain(config_from_dict(tree), train_fn=plain)
        assert "nothing to do" in outcome.message, outcome.message
        assert f"champion: {expected})" in outcome.message, outcome.message
    listed = run_cli("registry", str(config), timeout=60)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert f"* {expected}" in listed.stdout, listed.stdout
    assert registry.champion().name == expected  # completed on disk, not only listed
    if point == 0:  # nothing was recorded: the next decision takes it, once
        decision = registry.challenge(registry.get("v0002"), config_from_dict(tree))
        assert decision["promoted"] and registry.champion().name == "v0002"
    assert [d["challenger"] for d in registry.decisions()] == ["v0001", "v0002"]
    info = json.loads((registry.root / "champion.json").read_text())
    assert (info["version"], info["previous"]) == ("v0002", "v0001")
    assert not list(registry.root.glob(".*.tmp-*"))


# --------------------------------------------------------------------------- damaged contracts


def damage_meta(folder: Path, change) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    change(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def trained_best(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The best/ checkpoint of a 2-step plain-loop run on the tiny store."""
    cfg = config_from_dict(train_config(tiny_store, tmp_path_factory.mktemp("meta"), max_steps=2,
                                        val_every=2, checkpoint_every=2))
    train_loop(cfg, local_runtime(cfg))
    return cfg.run_dir() / "best"


def test_meta_json_on_disk_is_exactly_the_contract(trained_best: Path) -> None:
    text = (trained_best / "meta.json").read_text()
    assert sorted(json.loads(text)) == ["channels_out", "config", "config_hash", "epoch",
                                        "init_from", "step", "store", "world_size"]
    assert CheckpointMeta.model_validate_json(text).to_json() == text  # read, written: same


@pytest.mark.parametrize(("change", "field"), [
    (lambda m: m.pop("config_hash"), "config_hash: Field required"),  # an older version
    (lambda m: m.update(step="ten"), "step: Input should be a valid integer"),
    (lambda m: m["store"].pop("channels"), "store.channels: Field required"),
    (lambda m: m.update(unknown=1), "unknown: Extra inputs are not permitted"),
], ids=["missing", "wrong-type", "nested-missing", "unknown"])
def test_a_damaged_or_older_meta_json_is_refused_naming_the_field(
        trained_best: Path, tmp_path: Path, change, field: str) -> None:
    folder = tmp_path / "best"
    shutil.copytree(trained_best, folder)
    damage_meta(folder, change)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(folder)
    line = err.value.one_line()
    assert f"checkpoint {folder} has an invalid meta.json ({field}" in line
    assert "older version" in line


def test_a_resume_over_checkpoints_of_another_format_stops_instead_of_starting_over(
        tiny_store: Path, tmp_path: Path) -> None:
    """A corrupt checkpoint (a write cut short) is skipped for an older one; one whose
    meta.json reads but is not the contract (an older version) stops the resume: all of
    the run's checkpoints are alike, and skipping them all would train from step 0."""
    cfg = config_from_dict(train_config(tiny_store, tmp_path / "runs", max_steps=4,
                                        val_every=2, checkpoint_every=2))
    train_loop(cfg, local_runtime(cfg))
    saved = checkpoint.list_steps(cfg.run_dir() / "checkpoints")
    assert [p.name for p in saved] == ["step-00000004", "step-00000002"]
    for folder in saved:
        damage_meta(folder, lambda m: m.pop("config_hash"))
    longer = config_from_dict(train_config(tiny_store, tmp_path / "runs", max_steps=6,
                                           val_every=2, checkpoint_every=2))
    with pytest.raises(CheckpointError, match="invalid meta.json .config_hash: Field required"):
        train_loop(longer, local_runtime(longer))
    assert checkpoint.list_steps(cfg.run_dir() / "checkpoints") == saved  # none trained


def test_predict_from_a_damaged_meta_json_exits_2_in_one_line(trained_best: Path,
                                                              tmp_path: Path) -> None:
    folder = tmp_path / "best"
    shutil.copytree(trained_best, folder)
    damage_meta(folder, lambda m: m.pop("store"))
    result = run_cli("predict", str(folder), "--init", "2000-03-10T06:00", "--steps", "1",
                     "--out", str(tmp_path / "fc.zarr"), timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"checkpoint {folder} has an invalid meta.json (store: Field required" in lines[0]


@pytest.mark.parametrize(("change", "field"), [
    (lambda m: m.pop("records"), "records: Field required"),
    (lambda m: m.update(store_version="one"), "store_version: Input should be a valid integer"),
], ids=["missing", "wrong-type"])
def test_a_damaged_registered_metrics_json_is_refused_in_one_line(
        two_versions: dict, tmp_path: Path, change, field: str) -> None:
    root = tmp_path / "registry"
    shutil.copytree(two_versions["template"], root)
    registry = ModelRegistry(root, "test")
    path = registry.root / "v0001" / "eval" / "metrics.json"
    metrics = json.loads(path.read_text())
    change(metrics)
    path.write_text(json.dumps(metrics))
    with pytest.raises(PipelineError) as err:
        registry.challenge(registry.get("v0002"), config_from_dict(two_versions["tree"]))
    line = err.value.one_line()
    assert f"{path} is not a valid evaluation ({field}" in line
    assert "pipeline evaluate" in line
    assert [d["challenger"] for d in registry.decisions()] == ["v0001"]  # nothing decided
