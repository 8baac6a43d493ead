"""The model registry: versions, the champion, and the promotion rule.

One registry per config ``name``, a plain folder that anything can read::

    <registry.path>/<name>/
        champion.json       {"version": "v0002", "since": ..., "previous": "v0001"}
        decisions.jsonl     one JSON object per decision, oldest first
        v0001/              one folder per registered model; never changed afterwards,
            version.json      except for evals/: source run and checkpoint, weights hash,
            config.yaml       store version and data period, evaluation data, created;
                              the checkpoint's resolved config
            best/             a copy of the run's best checkpoint (state.pt, meta.json)
            eval/metrics.json its evaluation when it was registered
            evals/KEY.json    its re-evaluations on later evaluation data (as champion)

Every write is atomic: a version is assembled in a hidden temporary folder and renamed
into place, ``champion.json`` and ``decisions.jsonl`` are written to a temporary file
and renamed, so a crash never leaves a half-registered version or a torn line. Writers
hold ``<name>/.lock`` (:func:`pipeline.files.file_lock`; concurrent writers queue up,
for seconds: the champion is re-evaluated outside it), and ``pipeline retrain`` holds
``<name>/.retrain.lock`` from start to end, so a second retrain of the same registry
is refused at once instead of training the same version twice.

A promotion is a journal: the decision is appended to ``decisions.jsonl`` first, then
``champion.json`` is rewritten. A crash between the two leaves the last promoted
decision naming a version that is not the champion; whoever takes the lock next (every
writer, ``retrain``, ``pipeline registry``) completes it, so ``decisions.jsonl`` is the
record and ``champion.json`` always ends up agreeing with it.

Promotion: :func:`pipeline.promotion.compare` (the rule, and :func:`eval_data`, what
makes two evaluations comparable); a champion scored on other data is first
re-evaluated on the challenger's with the evaluate API.
This module reads metrics, never reports; torch is only imported to re-evaluate.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline import files
from pipeline.config import Config
from pipeline.data import store
from pipeline.errors import CheckpointError, RegistryError
from pipeline.evaluate import results
from pipeline.evaluate.results import EvalMetrics
from pipeline.promotion import compare, eval_data, eval_key
from pipeline.train.meta import META_FILE, read_meta
from pipeline.train.rundir import RunFiles

log = logging.getLogger(__name__)

VERSION_DIR = re.compile(r"^v(\d{4,})$")
CHAMPION_FILE = "champion.json"
DECISIONS_FILE = "decisions.jsonl"


# --------------------------------------------------------------------------- small pieces


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RegistryError(f"cannot read {path}: {type(err).__name__}: {err}",
                            "restore it from a backup or delete the registry entry") from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def store_facts(path: str | Path) -> dict[str, Any]:
    """The store's identity and period, from its attributes (a complete store only)."""
    attrs = store.store_attrs(store.open_complete(path))
    return {"path": os.path.abspath(path), "data_hash": attrs.data_hash,
            "dataset_version": attrs.dataset_version,
            "time_start": attrs.time_start, "time_end": attrs.time_end,
            "frequency": attrs.frequency}


# --------------------------------------------------------------------------- versions


@dataclass
class Version:
    """A registered model (a ``vNNNN`` folder)."""

    path: Path
    info: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def weights(self) -> Path:
        """The checkpoint folder (state.pt, meta.json): ``train.init_from`` takes it."""
        return RunFiles(self.path).best

    @property
    def eval_key(self) -> str:
        return self.info["evaluation"]["key"]

    @property
    def metrics(self) -> EvalMetrics:
        """Its metrics on its own evaluation data (``eval/``, which registering copied)."""
        return results.read_metrics(RunFiles(self.path).eval_metrics)

    def metrics_for(self, key: str) -> EvalMetrics | None:
        """Its metrics on the evaluation data ``key``, if it was scored on them."""
        if key == self.eval_key:
            return self.metrics
        path = self.path / "evals" / f"{key}.json"
        return results.read_metrics(path) if path.exists() else None


class ModelRegistry:
    """The registry of one config name (see the module docstring)."""

    def __init__(self, root: str | Path, name: str):
        base = Path(root)
        self.root = base / name
        for path in (base, self.root):
            if path.exists() and not path.is_dir():
                raise RegistryError(f"registry path {path} is a file, not a folder",
                                    "set registry.path to a folder (it is created if missing)")

    @classmethod
    def from_config(cls, cfg: Config) -> ModelRegistry:
        return cls(cfg.registry.path, cfg.name)

    # ------------------------------------------------------------------ reading

    def versions(self) -> list[Version]:
        if not self.root.is_dir():
            return []
        found = sorted((p for p in self.root.iterdir() if p.is_dir() and VERSION_DIR.match(p.name)),
                       key=lambda p: int(p.name[1:]))
        return [Version(p, read_json(p / "version.json")) for p in found]

    def get(self, name: str) -> Version:
        path = self.root / name
        if not (path / "version.json").is_file():
            raise RegistryError(f"registry {self.root} has no version {name}",
                                f"{CHAMPION_FILE} or a decision names a missing version")
        return Version(path, read_json(path / "version.json"))

    def champion(self) -> Version | None:
        path = self.root / CHAMPION_FILE
        return self.get(read_json(path)["version"]) if path.exists() else None

    def decisions(self) -> list[dict[str, Any]]:
        path = self.root / DECISIONS_FILE
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def for_store(self, facts: dict[str, Any]) -> list[Version]:
        """Versions trained on this store content and dataset version."""
        return [v for v in self.versions()
                if v.info["store"]["data_hash"] == facts["data_hash"]
                and v.info["store"]["dataset_version"] == facts["dataset_version"]]

    def handled(self, facts: dict[str, Any]) -> Version | None:
        """A version trained on this store version that has been decided on (or is the
        champion): retraining on this data again would change nothing."""
        champion = self.champion()
        decided = {d["challenger"] for d in self.decisions()}
        for version in self.for_store(facts):
            if version.name in decided or (champion and champion.name == version.name):
                return version
        return None

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive access for writers; what a crashed writer left is cleaned up (its
        temporaries) or finished (its promotion)."""
        with files.file_lock(self.root / ".lock"):
            for stale in self.root.glob(".*.tmp-*"):  # versions, champion.json, decisions
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
            self._complete_promotion()
            yield

    def recover(self) -> None:
        """Finish what a crashed writer left (see :meth:`lock`); nothing to do without a
        registry folder."""
        if self.root.is_dir():
            with self.lock():
                pass

    @contextlib.contextmanager
    def retraining(self) -> Iterator[None]:
        """Be the registry's one ``retrain`` for the block, or raise RegistryError at once."""
        try:
            with files.file_lock(self.root / ".retrain.lock", wait=False):
                yield
        except files.Locked as err:
            raise RegistryError(f"another retrain of {self.root} is running "
                                f"({err.holder or 'holder unknown'})",
                                "it registers and decides on this data; run retrain again "
                                "after it has finished") from None

    def _complete_promotion(self) -> None:
        """Apply the last promotion in ``decisions.jsonl`` to ``champion.json`` if a crash
        came between the two writes (under the lock)."""
        promoted = [d for d in self.decisions() if d["promoted"]]
        if not promoted:
            return
        last, path = promoted[-1], self.root / CHAMPION_FILE
        if path.exists() and read_json(path)["version"] == last["challenger"]:
            return
        log.warning("completing the promotion of %s that a crash interrupted", last["challenger"])
        self._set_champion(self.get(last["challenger"]), last["champion"])

    def register(self, run_dir: Path, store_path: str | Path) -> tuple[Version, bool]:
        """Register the run's best checkpoint with its evaluation; returns (version,
        created). A checkpoint already registered (same weights) is not added twice."""
        run_dir = Path(run_dir)
        run = RunFiles(run_dir)
        best, metrics_path = run.best, run.eval_metrics
        for needed in (best / "state.pt", best / META_FILE, metrics_path):
            if not needed.is_file():
                raise RegistryError(f"cannot register {run_dir}: {needed} is missing",
                                    "train and evaluate the run first")
        meta = read_meta(best)
        facts = store_facts(store_path)
        metrics = results.current_metrics(run_dir, facts["dataset_version"])
        if metrics is None:
            raise RegistryError(f"the evaluation of {run_dir} is not a whole one of its best "
                                f"checkpoint on store version {facts['dataset_version']}",
                                "evaluate the run again")
        trained_on = meta.store.dataset_version
        if trained_on != facts["dataset_version"]:
            raise RegistryError(f"{run_dir} was trained on dataset version {trained_on}, the "
                                f"store is at version {facts['dataset_version']}",
                                "register models trained on the current store (pipeline retrain)")
        sha = file_sha256(best / "state.pt")
        with self.lock():
            for version in self.versions():
                if version.info["weights_sha256"] == sha:
                    return version, False
            numbers = [int(v.name[1:]) for v in self.versions()]
            name = f"v{max(numbers, default=0) + 1:04d}"
            data = eval_data(metrics, facts["data_hash"])
            info = {
                "version": name, "created": store.now(),
                "run": run_dir.name, "run_dir": str(run_dir.resolve()),
                "checkpoint": str(best.resolve()), "checkpoint_step": meta.step,
                "config_hash": meta.config_hash, "weights_sha256": sha,
                "init_from": None if meta.init_from is None else meta.init_from.model_dump(),
                "store": facts,
                "evaluation": {"key": eval_key(data), "data": data},
            }
            tmp = self.root / f".{name}.tmp-{os.getpid()}"
            entry = RunFiles(tmp)
            shutil.copytree(best, entry.best)
            entry.eval.mkdir()
            shutil.copy2(metrics_path, entry.eval_metrics)
            entry.config.write_text(yaml.safe_dump(meta.config, sort_keys=False))
            (tmp / "evals").mkdir()
            (tmp / "version.json").write_text(json.dumps(info, indent=1) + "\n")
            os.rename(tmp, self.root / name)  # the version exists from here on, complete
        log.info("registered %s as %s", run_dir, name)
        return Version(self.root / name, info), True

    def _append_decision(self, decision: dict[str, Any]) -> None:
        lines = [json.dumps(d, sort_keys=True) for d in self.decisions()]
        lines.append(json.dumps(decision, sort_keys=True))
        files.atomic_write(self.root / DECISIONS_FILE, "\n".join(lines) + "\n")

    def _set_champion(self, version: Version, previous: str | None) -> None:
        files.atomic_write(self.root / CHAMPION_FILE, json.dumps(
            {"version": version.name, "since": store.now(), "previous": previous},
            indent=1) + "\n")

    def _earlier(self, challenger: Version, champion: Version, key: str) -> dict[str, Any] | None:
        """The decision already taken on this pair and evaluation data, if any."""
        for earlier in self.decisions():
            if (earlier["challenger"], earlier["champion"], earlier["eval_key"]) == (
                    challenger.name, champion.name, key):
                return earlier
        return None

    def _score_champion(self, challenger: Version, cfg: Config) -> str | None:
        """Re-evaluate the champion on the challenger's data before the lock is taken, when
        it will be needed (a whole evaluation must not hold up other writers); returns
        the champion scored. A failure is found again, and recorded, under the lock."""
        champion = self.champion()
        key = challenger.eval_key
        if (champion is None or champion.name == challenger.name
                or champion.metrics_for(key) is not None
                or self._earlier(challenger, champion, key) is not None):
            return None
        with contextlib.suppress(CheckpointError):
            self._reevaluate(champion, challenger, cfg)
        return champion.name

    def challenge(self, challenger: Version, cfg: Config) -> dict[str, Any]:
        """Decide whether ``challenger`` replaces the champion; record the decision.

        ``cfg`` is the config the challenger was evaluated with (its store and evaluate
        section): the champion is re-evaluated with it when needed. Deciding twice on
        the same pair and data records nothing new: the first decision is returned with
        ``"already_decided": True``.
        """
        scored = self._score_champion(challenger, cfg)
        with self.lock():
            champion = self.champion()
            key = challenger.eval_key
            base = {"challenger": challenger.name, "eval_key": key, "time": store.now(),
                    "metric": cfg.registry.metric, "lead": cfg.registry.lead,
                    "min_improvement": cfg.registry.min_improvement}
            if champion is None:
                decision = {**base, "champion": None, "promoted": True,
                            "reason": "first version: champion by default"}
                self._append_decision(decision)  # the journal first (module docstring)
                self._set_champion(challenger, None)
                return decision
            if champion.name == challenger.name:
                return {**base, "champion": champion.name, "promoted": False,
                        "already_decided": True, "reason": "already the champion"}
            earlier = self._earlier(challenger, champion, key)
            if earlier is not None:
                return {**earlier, "already_decided": True}
            champion_metrics = champion.metrics_for(key)
            reevaluated = champion_metrics is None or scored == champion.name
            try:
                if champion_metrics is None:  # it failed, or the champion changed meanwhile
                    champion_metrics = self._reevaluate(champion, challenger, cfg)
            except CheckpointError as err:  # e.g. statistics recomputed on append
                decision = {**base, "champion": champion.name, "promoted": False,
                            "champion_reevaluated": False,
                            "reason": f"not comparable: champion {champion.name} cannot be "
                                      f"scored on this store ({err.message})"}
                self._append_decision(decision)
                log.warning("%s", decision["reason"])
                return decision
            comparison = compare(challenger.metrics.records,
                                 champion_metrics.records, cfg.registry.metric,
                                 cfg.registry.lead, cfg.registry.min_improvement)
            decision = {**base, "champion": champion.name, "promoted": comparison.promote,
                        "reason": comparison.reason, "champion_reevaluated": reevaluated,
                        **comparison.as_dict()}
            self._append_decision(decision)  # the journal first (module docstring)
            if comparison.promote:
                self._set_champion(challenger, champion.name)
        log.info("%s vs champion %s: %s", challenger.name, champion.name, decision["reason"])
        return decision

    def _reevaluate(self, champion: Version, challenger: Version, cfg: Config) -> EvalMetrics:
        """Score the champion's weights on the challenger's evaluation data; keep the
        result in the champion's ``evals/``."""
        from pipeline.evaluate.evaluate import evaluate

        log.info("re-evaluating champion %s on the evaluation data of %s", champion.name,
                 challenger.name)
        scratch = self.root / f".eval-{champion.name}-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        try:
            RunFiles(scratch).best.symlink_to(champion.weights.resolve(), target_is_directory=True)
            raw = evaluate(cfg, scratch, report=False)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        metrics = results.parse_metrics(raw, scratch)
        data = eval_data(metrics, store_facts(cfg.data.store)["data_hash"])
        if eval_key(data) != challenger.eval_key:
            raise RegistryError(f"champion {champion.name} re-evaluated on other data than "
                                f"{challenger.name} ({data} vs "
                                f"{challenger.info['evaluation']['data']})",
                                "the store or evaluate.* changed meanwhile; run retrain again")
        evals = champion.path / "evals"
        evals.mkdir(exist_ok=True)
        files.atomic_write(evals / f"{eval_key(data)}.json", json.dumps(raw, indent=1) + "\n")
        return metrics

