"""The model registry: the promotion rule by hand, then real models - one trained for 2
steps, one for 60, both evaluated on the tiny store - registered in either order."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from pipeline.config import config_from_dict, dump_config
from pipeline.errors import RegistryError
from pipeline.evaluate.evaluate import evaluate
from pipeline.registry import ModelRegistry, compare
from pipeline.registry_listing import summary
from pipeline.train.loop import train_loop
from pipeline.train.runtime import local_runtime
from tests.conftest import run_cli, train_config

pytestmark = pytest.mark.integration

CHANNELS = ("t2m", "msl")


def records(metric: str, values: dict[str, float], lead: int = 1) -> list[dict]:
    rows = [{"channel": c, "lead": lead, metric: v} for c, v in values.items()]
    return rows + [{"channel": c, "lead": lead + 1, metric: 0.0} for c in values]  # other lead


# --------------------------------------------------------------------------- the rule


@pytest.mark.unit
def test_rmse_improvement_is_relative_per_channel_then_averaged() -> None:
    # msl in Pa would drown t2m in K in a plain mean; relative per channel it cannot:
    # t2m 10 % better, msl 2 % worse -> +4 % on average
    new = records("rmse", {"t2m": 0.9, "msl": 102.0})
    old = records("rmse", {"t2m": 1.0, "msl": 100.0})
    result = compare(new, old, "rmse", 1, 0.0)
    assert result.promote and result.improvement == pytest.approx(0.04)
    assert not compare(new, old, "rmse", 1, 0.05).promote  # 4 % < the 5 % asked for
    assert "not better enough" in compare(new, old, "rmse", 1, 0.05).reason
    assert not compare(old, new, "rmse", 1, 0.0).promote  # the other way round is worse
    assert not compare(old, old, "rmse", 1, 0.0).promote  # a tie is not better
    assert compare(new, old, "rmse", 1, 0.0).as_dict()["challenger_value"] == pytest.approx(51.45)


@pytest.mark.unit
def test_acc_is_higher_is_better_and_bad_inputs_are_errors() -> None:
    better, worse = records("acc", {"t2m": 0.9, "msl": 0.8}), records("acc", {"t2m": 0.8, "msl": 0.8})
    assert compare(better, worse, "acc", 1, 0.0).promote
    assert not compare(worse, better, "acc", 1, 0.0).promote
    with pytest.raises(RegistryError, match=r"registry.lead 3 is not among the evaluated leads \[1, 2\]"):
        compare(better, worse, "acc", 3, 0.0)
    with pytest.raises(RegistryError, match="other channels"):
        compare(better, records("acc", {"t2m": 0.9}), "acc", 1, 0.0)


# --------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def two_models(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run 'short' (2 steps) and 'long' (60 steps) on the tiny store, both evaluated."""
    runs = tmp_path_factory.mktemp("runs")
    cfgs = {}
    for name, steps in (("short", 2), ("long", 60)):
        tree = train_config(tiny_store, runs, max_steps=steps, val_every=min(steps, 20),
                            checkpoint_every=min(steps, 20))
        tree["name"] = name
        tree["evaluate"] = {"leads": [1, 2], "max_samples": 12}
        cfg = config_from_dict(tree)
        train_loop(cfg, local_runtime(cfg))
        evaluate(cfg, report=False)
        cfgs[name] = cfg
    return cfgs


def registry_for(cfg, path: Path, **rule) -> tuple[ModelRegistry, object]:
    cfg = cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"path": str(path),
                                                                              **rule})})
    return ModelRegistry.from_config(cfg), cfg


def test_worse_challenger_is_not_promoted(two_models: dict, tmp_path: Path) -> None:
    long, short = two_models["long"], two_models["short"]
    registry, cfg = registry_for(long, tmp_path / "reg")
    champion, created = registry.register(long.run_dir(), long.data.store)
    assert created and champion.name == "v0001"
    first = registry.challenge(champion, cfg)
    assert first["promoted"] and first["reason"].startswith("first version")
    challenger, _ = registry.register(short.run_dir(), short.data.store)
    decision = registry.challenge(challenger, cfg)
    assert not decision["promoted"] and decision["champion"] == "v0001"
    assert decision["challenger_value"] > decision["champion_value"]  # 2 steps: higher rmse
    assert decision["improvement"] < 0 and decision["champion_reevaluated"] is False
    assert registry.champion().name == "v0001"
    assert json.loads((registry.root / "champion.json").read_text())["version"] == "v0001"
    assert [d["challenger"] for d in registry.decisions()] == ["v0001", "v0002"]
    # same data: the champion's own metrics are used, no re-evaluation
    assert not any((registry.root / "v0001" / "evals").iterdir())
    # deciding or registering again changes nothing
    assert registry.challenge(challenger, cfg)["already_decided"]
    assert registry.register(short.run_dir(), short.data.store) == (challenger, False)
    assert len(registry.decisions()) == 2 and len(registry.versions()) == 2


def test_better_challenger_is_promoted_and_versions_hold_everything(
        two_models: dict, tmp_path: Path, tiny_store: Path) -> None:
    long, short = two_models["long"], two_models["short"]
    registry, cfg = registry_for(short, tmp_path / "reg", min_improvement=0.05)
    registry.challenge(registry.register(short.run_dir(), tiny_store)[0], cfg)
    challenger, _ = registry.register(long.run_dir(), tiny_store)
    decision = registry.challenge(challenger, cfg)
    assert decision["promoted"] and decision["improvement"] >= 0.05
    assert decision["challenger_value"] < decision["champion_value"]
    assert registry.champion().name == "v0002"
    assert json.loads((registry.root / "champion.json").read_text())["previous"] == "v0001"
    version = registry.get("v0002")
    assert (version.weights / "state.pt").read_bytes() == \
        (long.run_dir() / "best" / "state.pt").read_bytes()
    assert yaml.safe_load((version.path / "config.yaml").read_text())["name"] == "long"
    metrics = json.loads((version.path / "eval" / "metrics.json").read_text())
    assert metrics == json.loads((long.run_dir() / "eval" / "metrics.json").read_text())
    info = version.info
    assert info["store"]["dataset_version"] == 1 and info["checkpoint_step"] == 60
    assert info["store"]["time_start"].startswith("2000-01-01")
    assert info["store"]["time_end"].startswith("2000-03-31T18")
    listed = summary(registry)
    assert "* v0002" in listed and "  v0001" in listed
    assert listed.splitlines()[-1].startswith("latest decision: v0002 promoted")
    config = tmp_path / "c.yaml"
    dump_config(cfg, config)
    out = run_cli("registry", str(config))
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == listed


def test_crashed_registration_leaves_no_version(two_models: dict, tmp_path: Path) -> None:
    long = two_models["long"]
    registry, _ = registry_for(long, tmp_path / "reg")
    half = registry.root / f".v0001.tmp-{os.getpid() + 1}"  # a writer killed mid-copy
    (half / "best").mkdir(parents=True)
    assert registry.versions() == [] and registry.champion() is None
    version, _ = registry.register(long.run_dir(), long.data.store)
    assert version.name == "v0001" and not half.exists()


def test_unusable_registry_and_runs_are_clear_errors(two_models: dict, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(RegistryError, match="is a file, not a folder"):
        ModelRegistry(tmp_path / "file", "x")
    registry = ModelRegistry(tmp_path / "reg", "x")
    with pytest.raises(RegistryError, match="best/state.pt is missing"):
        registry.register(tmp_path / "no-run", two_models["long"].data.store)
