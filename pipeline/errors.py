"""The error hierarchy.

Every error a user can fix is a :class:`PipelineError`; the CLI prints it as one line
``error: <what> (<fix>)`` and exits with code 2. The classes also subclass builtins so
that callers can catch them the Python way (``except ValueError``).
"""

from __future__ import annotations

import errno
from typing import Any

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "preempted, requeue me"; the Slurm template requeues on it


class PipelineError(Exception):
    """A problem with the user's input that they can fix; ``hint`` says how."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        # Errors raised in Dask or Ray workers travel back pickled: keep the hint.
        # (The class and its constructor's arguments, which differ in subclasses.)
        return (type(self), (self.message, self.hint))

    def one_line(self) -> str:
        """The message as the CLI prints it: one line, hint in parentheses."""
        text = self.message if not self.hint else f"{self.message} ({self.hint})"
        return " ".join(text.split())

    def __str__(self) -> str:
        return self.one_line()


class ConfigError(PipelineError, ValueError):
    """The config has an unknown key, a wrong type or an impossible value."""


class SourceError(PipelineError, ValueError):
    """Raw input files are missing, unreadable or inconsistent."""


class StoreError(PipelineError, ValueError):
    """The training store is missing, incomplete, or not what the caller expects."""


class CheckpointError(PipelineError, ValueError):
    """A checkpoint cannot be used (missing, corrupt, or from another store)."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint's ``meta.json`` reads but is not the contract (an older version, or
    edited): unlike a corrupt one, never skipped for an older checkpoint on resume, where
    every checkpoint of the run would be skipped and training would start again."""


class RegistryError(PipelineError, ValueError):
    """The model registry is unusable (a file where its folder goes, a broken entry), or
    a model cannot be registered or compared (no evaluation, other evaluation data)."""


class RanksStopped(PipelineError):
    """All ranks of a training stop together, at a point every rank reaches, for the user
    error of one or more of them: ``own`` is this rank's error, None on a rank that only
    stops with the others. A Ray Train worker returns from it instead of failing, so
    Ray does not restart the workers for an error that a restart cannot mend."""

    def __init__(self, own: PipelineError | None, failed: list[int],
                 what: str = "met an error") -> None:
        self.own, self.failed, self.what = own, failed, what
        if own is not None:
            super().__init__(own.message, own.hint)
        else:
            ranks = ", ".join(map(str, failed))
            super().__init__(f"stopped with rank {ranks}, which {what}", "see that rank's error")

    def __reduce__(self) -> tuple[type, tuple[PipelineError | None, list[int], str]]:
        return (type(self), (self.own, self.failed, self.what))


class TrainingError(PipelineError, ArithmeticError):
    """Training cannot go on: the loss is not finite (a learning rate too high, bad data)."""


def disk_full(err: BaseException) -> PipelineError | None:
    """A full disk (ENOSPC, also as the cause of another error) as a user error. Every
    writer writes whole files under temporary names and renames them into place, so what
    a command finished before is intact and a rerun resumes from it."""
    found: BaseException | None = err
    while found is not None and getattr(found, "errno", None) != errno.ENOSPC:
        found = found.__cause__ or found.__context__
    if found is None:
        return None
    name = getattr(found, "filename", None)
    return PipelineError(f"no space left on the device{f' writing {name}' if name else ''}; "
                         "what was written before is intact (files are renamed into place "
                         "only once whole)",
                         "free some space, then run the same command again: it resumes")
