"""The training loop: plain PyTorch, one process, no Ray.

``train_loop(cfg, runtime)`` trains from the store with AdamW, warmup plus cosine
decay, gradient clipping, bf16 autocast on GPUs, periodic validation with early
stopping, and checkpoints that resume exactly (model, optimiser, scheduler, step,
epoch, position in the epoch, RNG states). A target that the store marks missing (its
mask at the target time, or for a derived channel a mask of an input) carries no
weight in the loss or the validation scores; mask channels are inputs only (the model
does not predict them, and a rollout carries the last input step's masks forward).
Where it runs is the ``Runtime``'s business (``runtime.py``: this process, or a Ray
Train worker in ``trainer.py``); the model step is ``stepper.py``'s.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config, config_hash, resolved_dict
from pipeline.data.dataset import ForecastDataset
from pipeline.data.loading import BatchSource, open_loaders
from pipeline.data.loading.resident import ResidentSplit
from pipeline.data.sampler import BlockShuffleSampler
from pipeline.data.store import StoreInfo
from pipeline.errors import CheckpointError, PipelineError, RanksStopped, TrainingError
from pipeline.plan import local_plan
from pipeline.train import checkpoint
from pipeline.train.meta import CheckpointMeta, InitFrom
from pipeline.train.models import area_weighted_mse, channel_mse
from pipeline.train.progress import ProgressWriter
from pipeline.train.rundir import RunFiles, run_writer
from pipeline.train.runtime import Runtime, memory_mb, rank_share, use_bf16
from pipeline.train.schedule import Progress, finished, lr_lambda, record_validation
from pipeline.train.sinks import open_sinks
from pipeline.train.stepper import build_stepper, target_validity
from pipeline.train.window import Batch, Window

log = logging.getLogger(__name__)

class Trainer:
    """The pieces of one training run; ``run()`` is the loop."""

    def __init__(self, cfg: Config, rt: Runtime, stop_at: int | None = None):
        self.cfg, self.rt, self.stop_at = cfg, rt, stop_at
        self.plan = rt.plan or local_plan(cfg)
        t = cfg.train
        torch.manual_seed(t.seed)
        np.random.seed(t.seed)
        self.info = StoreInfo(cfg.data.store)
        self.train_set = ForecastDataset(self.info, "train", t.history, t.lead, t.rollout)
        self.val_set = ForecastDataset(self.info, "val", t.history, t.lead, 1)
        self.val_split: ResidentSplit | None = None  # the val split in memory (loader())
        self.stepper = build_stepper(cfg, self.info).to(rt.device)
        self.optimizer = torch.optim.AdamW(self.stepper.parameters(), lr=t.lr,
                                           weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.progress = Progress()
        self.init_from: InitFrom | None = None  # the warm start's source, kept in meta
        self.lat_w = torch.from_numpy(self.info.area_weight.astype(np.float32)).to(rt.device)
        scale = self.stepper.scale.flatten()
        # the loss compares changes in units of the typical one-step change
        self.channel_w = (1.0 / scale**2) if cfg.model.predict_tendency else None
        # normalised mask values above which a target is missing (stores with masks)
        above = torch.from_numpy(self.info.missing_above())
        self.missing_above = above[:, None, None].to(rt.device)
        self.mask_incidence = torch.from_numpy(self.info.layout.mask_incidence()).to(rt.device)
        self.sampler = BlockShuffleSampler(len(self.train_set), t.batch_size, rt.world_size,
                                           rt.rank, t.shuffle_block, t.seed)
        self.resumed_from = self._resume()
        # the step this process started from: 0 in a fresh run, else its checkpoint's (in
        # the metrics, so that a restart shows there even when no step is repeated)
        self.start_step = self.progress.step
        self.model = rt.prepare_model(self.stepper)
        self.metrics_path = RunFiles(rt.run_dir).metrics
        self.sinks = open_sinks(cfg, rt.run_dir) if rt.rank == 0 else []

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        return {"model": self.stepper.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": None,
                "progress": self.progress.as_dict(), "rng": checkpoint.rng_state()}

    def meta(self) -> CheckpointMeta:
        return CheckpointMeta.model_validate({
            "step": self.progress.step, "epoch": self.progress.epoch,
            "config": resolved_dict(self.cfg), "config_hash": config_hash(self.cfg),
            "store": self.info.fingerprint(), "world_size": self.rt.world_size,
            "channels_out": self.info.layout.output_names, "init_from": self.init_from})

    def _resume(self) -> Path | None:
        """Restore the newest checkpoint that loads and fits this model; older ones are
        tried in turn (a corrupt or misfitting one is skipped with a warning)."""
        candidates = self.rt.resume_candidates()
        while True:
            found = checkpoint.latest_valid(candidates)
            if found is None:
                if self.cfg.train.init_from:
                    self._warm_start(Path(self.cfg.train.init_from))
                return None
            folder, state, meta = found
            checkpoint.check_compatible(meta, self.info, folder)
            try:
                self._restore(state)
                break
            except (KeyError, TypeError, ValueError, RuntimeError) as err:
                log.warning("skipping checkpoint %s: its state does not fit this model (%s)",
                            folder, " ".join(str(err).split())[:160])
                candidates = [c for c in candidates if c.resolve() != folder]
        self.init_from = meta.init_from
        if self.rt.rank == 0:
            log.info("resumed from %s (step %d)", folder, self.progress.step)
        return folder

    def _restore(self, state: dict[str, Any]) -> None:
        """Load a checkpoint's state, all of it or none: it is tried on copies first, so
        one that does not fit leaves the fresh model, optimiser and schedule as they are."""
        model = copy.deepcopy(self.stepper)
        model.load_state_dict(state["model"])
        optimizer = type(self.optimizer)(model.parameters())  # the state sets the rest
        optimizer.load_state_dict(state["optimizer"])
        progress = Progress(**state["progress"])
        self.stepper.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress = progress
        checkpoint.set_rng_state(state["rng"])

    def _warm_start(self, folder: Path) -> None:
        """Initialise the model (only) from another run's checkpoint: step 0, a fresh
        optimiser and schedule. The channels must match; the statistics may differ (an
        append with ``recompute_on_append`` shifts them a little): the weights are only a
        starting point, and this run records and uses the store's own statistics."""
        state, meta = checkpoint.load_init(folder)
        checkpoint.check_compatible(meta, self.info, folder, statistics=False)
        try:
            self.stepper.load_state_dict(state["model"])
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"train.init_from {folder}: its model does not fit this "
                                  f"config's ({' '.join(str(err).split())[:200]})",
                                  "use the same model.* and train.history as that run") from None
        self.init_from = InitFrom(
            path=str(folder), step=meta.step, config_hash=meta.config_hash,
            weights_digest=checkpoint.weights_digest(self.stepper.state_dict()))
        if self.rt.rank == 0:
            log.info("warm start: model weights from %s (step %s, digest %s)", folder,
                     meta.step, self.init_from.weights_digest)

    # ------------------------------------------------------------------ steps

    def valid(self, batch: Batch) -> torch.Tensor | None:
        """Where the batch's targets hold data, shaped like ``targets``; None without masks."""
        if batch.target_masks is None:
            return None
        return target_validity(batch.target_masks, self.missing_above, self.mask_incidence)

    def scored(self, batch: Batch) -> torch.Tensor | None:
        """Where validation scores a batch's first target: it holds data, and so does the
        last input, which persistence forecasts (as evaluation scores:
        ``evaluate.scored_points``); shaped like ``targets[:, 0]``. None without masks."""
        valid = self.valid(batch)
        if valid is None:
            return None
        last = batch.inputs[:, -1, list(self.info.layout.masks)]
        return valid[:, 0] & target_validity(last, self.missing_above, self.mask_incidence)

    def loss(self, batch: Batch) -> torch.Tensor:
        with torch.autocast(self.rt.device.type, dtype=torch.bfloat16,
                            enabled=use_bf16(self.plan)):
            preds = self.model(batch.inputs, batch.target_forcings)
        valid = self.valid(batch)  # each rollout step's own target masks
        return area_weighted_mse(preds.float().flatten(0, 1), batch.targets.flatten(0, 1),
                                 self.lat_w, self.channel_w,
                                 None if valid is None else valid.flatten(0, 1))

    def train_step(self, batch: Batch) -> torch.Tensor:
        """One optimiser step; returns the loss as a tensor on the device. Reading it
        (``float``) would wait for the step to finish on a GPU: the loop reads it only
        when it reports, so the host queues the next step while this one runs."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Loss, persistence loss and per-channel RMSE (physical units) on the val split,
        each rank taking a contiguous share of the samples in batches of
        ``train.val_batch_size`` (each run of consecutive samples read once, or gathered
        from the split in memory). Points missing in the target or in the last input
        (persistence's forecast) are left out of all three, so that the model and
        persistence are scored on the same points; a channel's RMSE is over the samples
        that have a point of it to score (NaN if none has)."""
        self.stepper.eval()
        out = self.info.layout.outputs
        _, std = self.info.normalisation()
        n_out = len(out)
        # loss*n, persistence*n, n, per channel: squared error, samples scored
        sums = np.zeros(3 + 2 * n_out)
        lo, hi = rank_share(len(self.val_set), self.rt.rank, self.rt.world_size)
        size = self.cfg.train.val_batch_size or self.cfg.train.batch_size
        error: PipelineError | None = None
        for start in range(lo, hi, size):
            indices = list(range(start, min(hi, start + size)))
            try:
                sample = self.val_set.read_batch(indices) if self.val_split is None else \
                    self.val_split.batch(torch.tensor(indices, device=self.rt.device))
            except PipelineError as err:  # a damaged shard: the other ranks stop with this one
                error = err
                break
            b = Batch.to(sample, self.rt.device)
            with torch.autocast(self.rt.device.type, dtype=torch.bfloat16,
                                enabled=use_bf16(self.plan)):
                pred = self.stepper.step(b.inputs, b.target_forcings[:, 0]).float()
            target, last = b.targets[:, 0], b.inputs[:, -1, self.stepper.outputs]
            valid = self.scored(b)
            n = len(indices)  # the losses are means over the batch's samples
            sums[0] += n * float(area_weighted_mse(pred, target, self.lat_w, self.channel_w, valid))
            sums[1] += n * float(area_weighted_mse(last, target, self.lat_w, self.channel_w, valid))
            sums[2] += n
            squared, scored = channel_mse(pred, target, self.lat_w, valid)
            sums[3:3 + n_out] += squared.double().cpu().numpy()
            sums[3 + n_out:] += scored.double().cpu().numpy()
        sums = np.asarray(self.rt.stop_together(error, sums.tolist()))
        n = max(sums[2], 1.0)
        counts = sums[3 + n_out:]
        mse = np.where(counts > 0, sums[3:3 + n_out] / np.maximum(counts, 1.0), np.nan)
        rmse = np.sqrt(mse) * std[list(out)]
        names = self.info.layout.output_names
        return {"val_loss": float(sums[0] / n), "val_loss_persistence": float(sums[1] / n),
                "val_rmse": {name: float(v) for name, v in zip(names, rmse, strict=True)}}

    # ------------------------------------------------------------------ the loop

    def loader(self) -> BatchSource:
        """The training batches as the plan says (``pipeline.data.loading``); the val
        split too when the splits are kept in memory."""
        t, rt = self.cfg.train, self.rt
        ranks = (rt.rank, rt.world_size) if rt.in_group else (0, 1)
        loaders = open_loaders(self.plan, self.train_set, self.val_set, self.sampler,
                               t.batch_size, t.prefetch_factor, t.assemble_on_device,
                               rt.device, *ranks, on_every_rank=rt.on_every_rank)
        self.val_split = loaders.val_split
        return loaders.train

    def run(self) -> dict[str, Any]:
        """Train until max_steps, early stopping, or a stop request; return final metrics."""
        if self.rt.rank == 0:  # once per attempt: a restart shows in the log
            log.info("training from step %d to step %d", self.progress.step,
                     self.cfg.train.max_steps)
        loader = self.loader()
        try:
            return self._run(loader)
        finally:
            loader.close()  # stops the readers or frees the split, also on an exception
            if self.val_split is not None:
                self.val_split.release()
                self.val_split = None

    def _run(self, loader: BatchSource) -> dict[str, Any]:
        t, p = self.cfg.train, self.progress
        last: dict[str, Any] = {}
        window = Window()
        self.progress_file = ProgressWriter(self.rt.run_dir, t.max_steps) \
            if self.rt.rank == 0 else None
        stop = p.step >= t.max_steps
        while not stop:
            self.sampler.set_epoch(p.epoch, p.batch_in_epoch)
            asked = time.perf_counter()
            # asking for the next batch hands the previous one's buffer back to the
            # batch loader: nothing may hold on to a batch past its step
            for sample in self._batches(loader):
                window.wait += time.perf_counter() - asked  # waiting for data
                loss = self.train_step(Batch.to(sample, self.rt.device))
                p.step += 1
                p.batch_in_epoch += 1
                window.samples += t.batch_size * self.rt.world_size
                window.loss_sum += loss.double()
                window.losses.append(loss)
                window.steps += 1
                stop = self._should_stop()
                if self.progress_file is not None:
                    self.progress_file.update(p.step, loss, window.samples / window.elapsed(),
                                              force=stop)
                if p.step % t.val_every == 0 or p.step % t.checkpoint_every == 0 or stop:
                    last = self._evaluate_and_save(window, stop)
                    window = Window()  # validation and saving are not in it
                    stop = stop or finished(p, self.cfg)
                if stop:
                    break
                asked = time.perf_counter()
            else:
                p.epoch += 1
                p.batch_in_epoch = 0
        return last

    def _batches(self, loader: BatchSource) -> Iterator[Any]:
        """The loader's batches of this epoch; a user error reading one (a damaged shard)
        stops every rank before the step's collectives, where the others would wait for
        this rank (:meth:`Runtime.stop_together`, once per batch with several ranks)."""
        batches = iter(loader)
        while True:
            error: PipelineError | None = None
            try:
                sample = next(batches)
            except StopIteration:  # every rank has as many batches per epoch
                return
            except PipelineError as err:
                error = err
            self.rt.stop_together(error)
            yield sample

    def _should_stop(self) -> bool:
        p = self.progress
        local = (p.step >= self.cfg.train.max_steps or self.rt.stop_requested()
                 or (self.stop_at is not None and p.step >= self.stop_at))
        return bool(self.rt.all_reduce([float(local)], op="max")[0])

    def _evaluate_and_save(self, window: Window, stopping: bool) -> dict[str, Any]:
        t, p = self.cfg.train, self.progress
        loss, seconds = window.close()
        metrics: dict[str, Any] = {
            "step": p.step, "epoch": p.epoch, "start_step": self.start_step,
            "lr": self.scheduler.get_last_lr()[0],
            "train_loss": self.rt.all_reduce([loss])[0] / self.rt.world_size,
            "samples_per_s": window.samples / seconds,
            "data_wait_fraction": window.wait / seconds,
            "memory_mb": memory_mb(self.rt.device),
        }
        if not math.isfinite(metrics["train_loss"]):
            self._diverged(window)
        improved = False
        if p.step % t.val_every == 0 or stopping:
            metrics.update(self.validate())
            improved = record_validation(p, metrics["val_loss"], t.early_stopping_min_delta)
        folder = self.rt.save(p.step, self.state() if self.rt.rank == 0 else None, self.meta(),
                              metrics)
        if self.rt.rank == 0:
            if improved and folder is not None:
                checkpoint.export(folder, RunFiles(self.rt.run_dir).best)
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            for sink in self.sinks:
                sink.write(metrics)
            val = f" val {metrics['val_loss']:.4f} (persistence {metrics['val_loss_persistence']:.4f})" \
                if "val_loss" in metrics else ""
            log.info("step %d loss %.4f%s | %.1f samples/s, data wait %.0f%%, %.0f MB",
                     p.step, metrics["train_loss"], val, metrics["samples_per_s"],
                     100 * metrics["data_wait_fraction"], metrics["memory_mb"])
        return metrics

    def _diverged(self, window: Window) -> None:
        """Stop on a NaN or infinite loss (on any rank), naming the first such step,
        before anything of this window is saved: no checkpoint holds its weights."""
        first = self.progress.step - window.steps + 1
        local = window.first_non_finite()
        own = first + local if local is not None else self.progress.step
        step = -int(self.rt.all_reduce([-float(own)], op="max")[0])  # the earliest rank's
        error = TrainingError(
            f"training stopped: the loss is not finite (NaN or infinite) at step {step}; "
            f"nothing saved after step {first - 1}",
            "lower train.lr or raise train.warmup_steps, and check the store with "
            "`pipeline inspect --verify STORE`")
        if self.rt.in_group:  # every rank is here, with the same reduced loss
            raise RanksStopped(error, list(range(self.rt.world_size)))
        raise error

    def close(self, failed: bool = False) -> None:
        for sink in self.sinks:
            sink.close(failed)


def train_loop(cfg: Config, rt: Runtime, stop_at: int | None = None) -> dict[str, Any]:
    """Train in this process (or this Ray worker) and return the last reported metrics;
    a local runtime holds the run's lock meanwhile (``rundir``)."""
    with run_writer(cfg) if rt.owns_run else contextlib.nullcontext():
        rt.run_dir.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(cfg, rt, stop_at)
        failed = True
        try:
            metrics = trainer.run()
            failed = False
            return metrics
        finally:
            trainer.close(failed)
