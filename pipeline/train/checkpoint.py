"""Checkpoint files: atomic writes, validation on load, the latest valid one wins.

A checkpoint is a folder ``step-00000123/`` holding ``state.pt`` (tensors and plain
Python values only, loaded with ``weights_only=True``) and ``meta.json``, written last:
a folder without ``meta.json`` is incomplete. Locally the folder is written under a
temporary name and renamed; under Ray Train, Ray copies the folder into the run's
storage under the same name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch

from pipeline.errors import CheckpointError, CheckpointFormatError, disk_full
from pipeline.files import atomic_write
from pipeline.train.meta import META_FILE, CheckpointMeta, parse_meta
from pipeline.train.rundir import RunFiles

if TYPE_CHECKING:
    from pipeline.data.store import StoreInfo

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


class _StateFile:
    """The file ``torch.save`` writes into, keeping the ``OSError`` of a failed write:
    PyTorch's writer reports one only as a ``RuntimeError`` without an errno."""

    def __init__(self, handle: BinaryIO, path: Path) -> None:
        self.handle, self.path = handle, path
        self.failed: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.failed = OSError(err.errno, err.strerror, str(self.path))
            raise

    def flush(self) -> None:
        self.handle.flush()


def _save_state(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to ``path``, fsynced; a failed write raises its own ``OSError``
    (errno ENOSPC for a full disk), not PyTorch's errno-less ``RuntimeError``."""
    with open(path, "wb") as handle:
        target = _StateFile(handle, path)
        try:
            # torch.save writes through write() and flush() only; its type names IO[bytes]
            torch.save(state, target)  # type: ignore[arg-type]
        except RuntimeError as err:
            if target.failed is None:
                raise
            raise target.failed from err
        handle.flush()
        os.fsync(handle.fileno())


def write_into(folder: Path, state: dict[str, Any], meta: CheckpointMeta) -> None:
    """Write state then meta (the completeness marker) into an existing folder; a full
    disk is a user error (:func:`pipeline.errors.disk_full`), not a traceback."""
    try:
        _save_state(state, folder / STATE_FILE)
        atomic_write(folder / META_FILE, meta.to_json())
    except OSError as err:
        full = disk_full(err)
        if full is None:
            raise
        raise full from err


def save(root: Path, step: int, state: dict[str, Any], meta: CheckpointMeta) -> Path:
    """Write ``root/step-N`` atomically (temporary folder, then rename)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".{step_dir_name(step)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_into(tmp, state, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space a full disk needs back
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load(folder: Path) -> tuple[dict[str, Any], CheckpointMeta]:
    """Read a checkpoint folder; raise :class:`CheckpointError` if it is not usable (a
    corrupt file, or a meta.json that is not a :class:`CheckpointMeta`: one line naming
    the field)."""
    meta_path, state_path = folder / META_FILE, folder / STATE_FILE
    if not meta_path.is_file() or not state_path.is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete (no {META_FILE} or {STATE_FILE})",
                              "it was interrupted while being written; an older one is used")
    try:
        data = json.loads(meta_path.read_text())
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any decoding failure means a corrupt file
        raise CheckpointError(f"checkpoint {folder} is corrupt: {type(err).__name__}: "
                              f"{' '.join(str(err).split())[:160]}", "delete it") from None
    return state, parse_meta(data, folder)


def load_init(path: Path) -> tuple[dict[str, Any], CheckpointMeta]:
    """Read the checkpoint ``train.init_from`` names: a checkpoint folder, or a run
    directory (its ``best/``)."""
    path = Path(path)
    best = RunFiles(path).best
    if not (path / META_FILE).exists() and (best / META_FILE).exists():
        path = best
    if not path.is_dir():
        raise CheckpointError(f"train.init_from: no checkpoint folder at {path}",
                              "name a checkpoint folder such as runs/NAME/best")
    return load(path)


def weights_digest(model_state: dict[str, torch.Tensor]) -> str:
    """A short hash of a model's weights (names, shapes, dtypes, values): equal digests
    mean bitwise equal weights."""
    h = hashlib.sha256()
    for name in sorted(model_state):
        tensor = model_state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def list_steps(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, newest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def latest_valid(candidates: list[Path]) -> tuple[Path, dict[str, Any], CheckpointMeta] | None:
    """The first candidate that loads; corrupt ones (a write cut short) are skipped with
    a warning. One whose meta.json is not the contract stops the resume
    (:class:`CheckpointFormatError`): an older version's checkpoints are all alike."""
    seen: set[Path] = set()
    for folder in candidates:
        folder = folder.resolve()
        if folder in seen:
            continue
        seen.add(folder)
        try:
            state, meta = load(folder)
        except CheckpointFormatError:
            raise
        except CheckpointError as err:
            log.warning("skipping checkpoint: %s", err.one_line())
            continue
        return folder, state, meta
    return None


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for old in list_steps(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def export(folder: Path, target: Path) -> None:
    """Copy a checkpoint folder to ``target`` (e.g. ``best/``), replacing it atomically."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder, tmp)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states in types that ``weights_only`` loading accepts."""
    state = np.random.get_state(legacy=True)
    if not isinstance(state, tuple):  # a dict only for a generator other than MT19937
        raise TypeError(f"numpy's global RNG is not MT19937: {state['bit_generator']}")
    name, keys, pos, has_gauss, cached = state
    return {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate((state["python_version"], tuple(state["python"]), None))
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["cached"]))
    torch.set_rng_state(state["torch"])


def check_compatible(meta: CheckpointMeta, info: StoreInfo, where: Path,
                     statistics: bool = True) -> None:
    """Refuse a checkpoint trained on another store or (``statistics``) other statistics."""
    trained = meta.store
    if trained.channels != list(info.layout.channels):
        raise CheckpointError(f"checkpoint {where} was trained on channels "
                              f"{trained.channels}, the store has "
                              f"{list(info.layout.channels)}", "use a new run name")
    if statistics and not (np.allclose(trained.mean, info.stats["mean"], rtol=1e-12)
            and np.allclose(trained.std, info.stats["std"], rtol=1e-12)):
        raise CheckpointError(f"the store's statistics differ from those of checkpoint {where}",
                              "the store was rebuilt or recomputed; use a new run name")
