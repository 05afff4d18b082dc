"""The run folder: one place for its file names, atomic writes, status, reuse rules and lock.

A run folder holds:

``config.yaml``
    the resolved :class:`~flatminima.train.config.TrainConfig`;
``run.json``
    the marker: ``{"format": "flatminima-run", "config_hash": H, "config": {...},
    "data": {...}}`` with ``H = sha256(json(cfg.numerics()))`` and the data files the run was
    trained on (paths, sizes and sha256 checksums, computed once when the run starts);
``metrics.csv``
    one row per evaluation point;
``checkpoint.pt``
    everything needed to resume exactly, rewritten after every evaluation point;
``summary.json``
    the final result; its ``status`` is ``complete`` or ``diverged``;
``run.lock``
    present while a process writes the folder (host, pid and a heartbeat, see :class:`RunLock`);
``distributed.json``, ``tensorboard/``, ``flatness.json``, ``flatness/``
    the process layout of a distributed run, TensorBoard scalars, cached and command-line
    flatness measures.

Status (:meth:`RunFolder.status`): ``empty`` (nothing yet), ``running`` (a live process holds
the lock), ``complete`` (the budget was used up), ``diverged`` (the loss became NaN/inf),
``interrupted`` (stopped, killed or failed before the end: resumable from its checkpoint) and
``started`` (marker and config, no checkpoint yet). A run is *finished* when it is ``complete``
or ``diverged``: training it again with the same config would change nothing (training is
deterministic), so studies skip it.

Reuse rules (:meth:`RunFolder.check_reuse`): a folder is written only when it does not exist,
is empty, or holds a flatminima run of the *same* config (the marker's hash; folders written
before markers existed are recognised by the config recorded in their summary or checkpoint).
Anything else is refused with the reason, and nothing in it is touched.

Every file is written atomically: to ``NAME.tmp`` first, then renamed over ``NAME``; on any
failure the temporary file is removed and :class:`RunFileError` names the file and the cause.

Example:
    >>> import tempfile
    >>> folder = RunFolder(tempfile.mkdtemp())
    >>> folder.status()
    'empty'
    >>> folder.write_json("summary.json", {"status": "complete"})
    >>> folder.status()
    'complete'
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import logging
import math
import os
import pickle
import socket
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
import yaml

from flatminima.train.config import TrainConfig

__all__ = [
    "FINISHED",
    "ResumeMismatchError",
    "RunFileError",
    "RunFolder",
    "RunFolderError",
    "RunFolderLocked",
    "RunLock",
    "RENAMED_KEYS",
    "atomic_writer",
    "config_hash",
    "current_names",
    "data_record",
]

log = logging.getLogger(__name__)

#: Statuses of a finished run: training again with the same config would change nothing.
FINISHED: tuple[str, ...] = ("complete", "diverged")
MARKER_FORMAT = "flatminima-run"

#: Keys of metrics rows and summaries that were renamed so that names say their unit (old ->
#: new): ``grad_evals`` counted samples through backward, ``epoch`` the evaluation point.
RENAMED_KEYS: dict[str, str] = {"grad_evals": "samples", "epoch": "eval_point"}

#: Records inside a summary (or a checkpoint) whose keys are metrics names too.
_NESTED = ("final", "early_stopped")


def current_names(record: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics row, summary or results row with today's key names (see :data:`RENAMED_KEYS`).

    Run folders and CSVs written before the rename said ``grad_evals`` and ``epoch``; their
    values are kept under the new names, in place (a key already present under its new name
    wins). A summary's ``final`` row and ``early_stopped`` record are renamed too; every other
    value (the ``config``, say) is left as it is. This is the one place that knows the old names.

    Example:
        >>> current_names({"epoch": 2, "grad_evals": 640, "data_epochs": 1.0})
        {'eval_point': 2, 'samples': 640, 'data_epochs': 1.0}
        >>> current_names({"samples": 64, "final": {"epoch": 1}})
        {'samples': 64, 'final': {'eval_point': 1}}
    """
    out: dict[str, Any] = {}
    for key, value in record.items():
        new = RENAMED_KEYS.get(key, key)
        if new != key and new in record:
            continue
        if key in _NESTED and isinstance(value, Mapping):
            value = current_names(value)
        out[new] = value
    return out


class RunFolderError(ValueError):
    """A folder that may not be used as this run's folder (the message says why)."""


class ResumeMismatchError(RunFolderError):
    """The folder holds a run with a different configuration (or process layout)."""


class RunFolderLocked(RunFolderError):
    """Another live process is writing the run folder (the message names it)."""


class RunFileError(RuntimeError):
    """A run-folder file could not be written or read (disk full, truncated, unreadable)."""


def config_hash(cfg: TrainConfig) -> str:
    """``sha256`` of the settings that decide the numbers (``cfg.numerics()``), as hex."""
    text = json.dumps(cfg.numerics(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) for this process (a study starts
    many runs on the same data files)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def _data_paths(data: Any) -> list[Path]:
    """The files a loaded data set came from: ``data.files`` when the data layer reports them,
    else the regular files directly inside ``data.source`` when that is a folder."""
    files = getattr(data, "files", None)
    if files:
        return sorted(Path(f) for f in files)
    source = Path(str(getattr(data, "source", "")))
    if not source.is_dir():
        return []
    return sorted(p for p in source.iterdir() if p.is_file())


def data_record(data: Any) -> dict[str, Any]:
    """What a run was trained on: ``{"name", "source", "files": [{"path", "bytes", "sha256"}]}``.

    ``source`` is the folder (or ``"synthetic"``, ``"scikit-learn"``) the data layer reports;
    each file is checksummed once (sha256, about 1 GB/s).
    """
    files = []
    for path in _data_paths(data):
        files.append(
            {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": _sha256(path)}
        )
    return {
        "name": getattr(data, "name", None),
        "source": str(getattr(data, "source", "")),
        "files": files,
    }


def _config_diff(recorded: dict[str, Any], cfg: TrainConfig) -> list[str]:
    mine = cfg.numerics()
    return sorted(k for k in set(mine) | set(recorded) if recorded.get(k) != mine.get(k))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def atomic_writer(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write ``path`` through ``path.tmp`` renamed over it; the temporary file never survives.

    Raises:
        RunFileError: writing or renaming failed (naming ``path``; disk full hinted).
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open(mode, newline=None if "b" in mode else "") as fh:
            yield fh
            fh.flush()
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, RunFileError):
            hint = " (is the disk full?)" if _looks_like_full_disk(exc) else ""
            raise RunFileError(f"could not write {path}: {_first_line(exc)}{hint}") from exc
        raise


def _looks_like_full_disk(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return True
    text = str(exc)
    return "write failed" in text or "unexpected pos" in text or "No space" in text


class RunFolder:
    """One run's folder: file names, atomic writes, status, reuse rules, lock and data record.

    Args:
        path: the folder (created on :meth:`open`).
        heartbeat_s, stale_s: the lock's heartbeat period and staleness limit (see
            :class:`RunLock`).
    """

    CONFIG = "config.yaml"
    MARKER = "run.json"
    METRICS = "metrics.csv"
    CHECKPOINT = "checkpoint.pt"
    SUMMARY = "summary.json"
    LOCK = "run.lock"
    LAYOUT = "distributed.json"
    TENSORBOARD = "tensorboard"
    FLATNESS = "flatness.json"
    FLATNESS_DIR = "flatness"

    def __init__(
        self, path: str | os.PathLike, *, heartbeat_s: float = 5.0, stale_s: float = 30.0
    ) -> None:
        self.path = Path(path)
        self.lock = RunLock(self.path / self.LOCK, heartbeat_s=heartbeat_s, stale_s=stale_s)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def file(self, name: str) -> Path:
        """The path of the run-folder file ``name`` (one of the class's file names)."""
        return self.path / name

    # ------------------------------------------------------------------ reading
    def read_json(self, name: str) -> dict[str, Any] | None:
        """The JSON object in file ``name``, or ``None`` when absent (RunFileError: unreadable)."""
        path = self.file(name)
        if not path.is_file():
            return None
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RunFileError(f"could not read {path}: {_first_line(exc)}") from exc
        return value if isinstance(value, dict) else None

    def summary(self) -> dict[str, Any] | None:
        """``summary.json`` as a dict (today's key names, :func:`current_names`), or ``None``
        when the run has not ended."""
        summary = self.read_json(self.SUMMARY)
        return current_names(summary) if summary is not None else None

    def marker(self) -> dict[str, Any] | None:
        """The marker ``run.json`` if it is a flatminima marker, else ``None``."""
        try:
            marker = self.read_json(self.MARKER)
        except RunFileError:
            return None
        return marker if marker and marker.get("format") == MARKER_FORMAT else None

    def status(self) -> str:
        """``empty``, ``running``, ``complete``, ``diverged``, ``interrupted`` or ``started``."""
        if self.lock.holder_alive():
            return "running"
        summary = self.summary()
        if summary is not None and summary.get("status") in FINISHED:
            return str(summary["status"])
        if self.file(self.CHECKPOINT).is_file():
            return "interrupted"
        if self.file(self.MARKER).is_file() or self.file(self.CONFIG).is_file():
            return "started"
        return "empty"

    def finished_summary(self, cfg: TrainConfig) -> dict[str, Any] | None:
        """The summary of a *finished* run (complete or diverged) of ``cfg``, else ``None``."""
        summary = self.summary()
        if not summary or summary.get("config") != cfg.numerics():
            return None
        return summary if summary.get("status") in FINISHED else None

    def is_finished(self, cfg: TrainConfig) -> bool:
        """Whether the folder holds a finished run (complete or diverged) of exactly ``cfg``."""
        return self.finished_summary(cfg) is not None

    def is_complete(self, cfg: TrainConfig) -> bool:
        """Whether the folder holds a run of exactly ``cfg`` that used up its budget."""
        summary = self.finished_summary(cfg)
        return summary is not None and summary["status"] == "complete"

    def read_config(self) -> TrainConfig:
        """The run's config (``config.yaml``).

        Raises:
            FileNotFoundError: the folder holds no ``config.yaml``.
        """
        path = self.file(self.CONFIG)
        if not path.is_file():
            raise FileNotFoundError(f"{self.path} is not a run folder (no {self.CONFIG})")
        return TrainConfig.from_yaml(path)

    def read_metrics(self) -> list[dict[str, float]]:
        """The rows of ``metrics.csv`` as floats (empty cells -> NaN; today's column names,
        :func:`current_names`); ``[]`` when absent."""
        path = self.file(self.METRICS)
        if not path.is_file():
            return []
        with path.open() as fh:
            return [
                current_names(
                    {k: float(v) if v not in ("", None) else math.nan for k, v in row.items()}
                )
                for row in csv.DictReader(fh)
            ]

    def read_checkpoint(self, map_location: Any = "cpu") -> Any | None:
        """The checkpoint object, or ``None`` when there is none.

        Raises:
            RunFileError: the file is truncated or corrupt (the message names it).
        """
        path = self.file(self.CHECKPOINT)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as exc:
            raise RunFileError(
                f"could not read checkpoint {path} ({path.stat().st_size} bytes): it is "
                f"truncated or corrupt ({_first_line(exc)}); delete it to restart this run "
                "from the beginning"
            ) from exc

    # ------------------------------------------------------------------ writing
    def write_text(self, name: str, text: str) -> None:
        with atomic_writer(self.file(name)) as fh:
            fh.write(text)

    def write_json(self, name: str, obj: Any) -> None:
        """Write ``obj`` as ``name`` atomically (floats such as tensors via ``float``)."""
        self.write_text(name, json.dumps(obj, indent=2, sort_keys=True, default=float))

    def write_config(self, cfg: TrainConfig) -> None:
        self.write_text(self.CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.write_json(self.SUMMARY, summary)

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """``metrics.csv`` with the union of the rows' keys as columns (first-seen order)."""
        keys: list[str] = []
        for row in rows:
            keys += [k for k in row if k not in keys]
        with atomic_writer(self.file(self.METRICS)) as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)

    def save_checkpoint(self, obj: Any) -> None:
        """``torch.save`` to ``checkpoint.pt`` atomically; first checks this process still
        holds the lock when it took it (a suspended process may have lost it)."""
        self.lock.check()
        with atomic_writer(self.file(self.CHECKPOINT), "wb") as fh:
            torch.save(obj, fh)

    # ------------------------------------------------------------------ reuse and lock
    def check_reuse(self, cfg: TrainConfig) -> None:
        """Raise unless this folder may hold the run of ``cfg`` (see the module's reuse rules).

        Raises:
            RunFolderError: a file, or a non-empty folder that holds no flatminima run.
            ResumeMismatchError: a flatminima run of another config (naming the keys).
        """
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{self.path} exists and is not a folder; choose another --out")
        names = self._entries()
        if not names:
            return
        marker = self.marker()
        if marker is not None:
            if marker.get("config_hash") != config_hash(cfg):
                self.check_config(marker.get("config") or {}, cfg)
            return
        recorded = self._legacy_config()
        if recorded is None:
            raise RunFolderError(
                f"{self.path} is not empty ({', '.join(sorted(names)[:6])}) and holds no "
                f"flatminima run (no {self.MARKER}); refusing to write into it: choose another "
                "--out folder or empty this one"
            )
        self.check_config(recorded, cfg)

    def _entries(self) -> list[str]:
        if not self.path.is_dir():
            return []
        skip = {self.LOCK, self.LOCK + ".tmp"}
        return [p.name for p in self.path.iterdir() if p.name not in skip]

    def _legacy_config(self) -> dict[str, Any] | None:
        """The config of a run written before markers existed (summary, else checkpoint)."""
        try:
            summary = self.summary()
        except RunFileError:
            summary = None
        if summary and isinstance(summary.get("config"), dict):
            return summary["config"]
        if not self.file(self.CHECKPOINT).is_file():
            return None
        try:
            ckpt = self.read_checkpoint()
        except RunFileError:
            return None
        config = ckpt.get("config") if isinstance(ckpt, dict) else None
        return config if isinstance(config, dict) else None

    def check_config(self, recorded: dict[str, Any] | None, cfg: TrainConfig) -> None:
        """Raise :class:`ResumeMismatchError` naming the keys where ``recorded`` (a config's
        ``numerics()``, e.g. from a checkpoint) differs from ``cfg``."""
        if recorded == cfg.numerics():
            return
        diff = _config_diff(recorded or {}, cfg) or ["unknown keys"]
        raise ResumeMismatchError(
            f"{self.path} holds a run with a different configuration (differs in: "
            f"{', '.join(diff)}); use another --out folder or delete it"
        )

    def open(self, cfg: TrainConfig, data: Any = None) -> None:
        """Claim the folder for writing the run of ``cfg``: reuse check, create, lock, marker.

        On a folder that already has a marker, its data record is checked against ``data``
        (:meth:`check_data`). Call :meth:`close` when done (also on failure).

        Raises:
            RunFolderError, ResumeMismatchError, RunFolderLocked: see :meth:`check_reuse` and
                :class:`RunLock`.
            RunFileError: the folder cannot be created or written.
        """
        self.check_reuse(cfg)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunFileError(f"cannot create run folder {self.path}: {_first_line(exc)}") from exc
        self.lock.acquire()
        try:
            self.check_reuse(cfg)  # again, under the lock
            marker = self.marker()
            if marker is None:
                self.write_json(
                    self.MARKER,
                    {
                        "format": MARKER_FORMAT,
                        "version": 1,
                        "config_hash": config_hash(cfg),
                        "config": cfg.numerics(),
                        "data": data_record(data) if data is not None else None,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    },
                )
            elif data is not None:
                self.check_data(data)
        except BaseException:
            self.lock.release()
            raise

    def close(self) -> None:
        """Release the lock (if this process holds it)."""
        self.lock.release()

    def check_data(self, data: Any = None) -> None:
        """Raise ``FileNotFoundError`` when data files recorded in the marker are gone, and
        ``ValueError`` when they differ from the ones ``data`` (if given) was loaded from (source
        folder and sizes; no re-hashing). Runs without a record pass."""
        marker = self.marker()
        record = (marker or {}).get("data")
        if not record:
            return
        gone = [f["path"] for f in record.get("files", []) if not Path(f["path"]).is_file()]
        if gone:
            raise FileNotFoundError(
                f"{self.path} was trained on data files that are gone: {', '.join(gone[:4])}"
                f"{' ...' if len(gone) > 4 else ''}; restore them (data_root or "
                "$FLATMINIMA_DATA must find that folder again)"
            )
        if data is None:
            return
        now = data_record_light(data)
        if now["source"] != record.get("source"):
            raise ValueError(
                f"{self.path} was trained on {record.get('name')} from {record.get('source')}, "
                f"but the data now found is from {now['source']}; point data_root or "
                f"$FLATMINIMA_DATA at {record.get('source')}"
            )
        sizes = {f["path"]: f["bytes"] for f in record.get("files", [])}
        changed = [p for p, n in now["sizes"].items() if p in sizes and sizes[p] != n]
        if changed:
            raise ValueError(
                f"{self.path}: data files changed since the run was trained: {', '.join(changed)}"
            )


def data_record_light(data: Any) -> dict[str, Any]:
    """Source and file sizes of ``data`` (what :meth:`RunFolder.check_data` compares)."""
    return {
        "source": str(getattr(data, "source", "")),
        "sizes": {str(p.resolve()): p.stat().st_size for p in _data_paths(data)},
    }


# ---------------------------------------------------------------------------- lock


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` (Linux ``/proc``), to tell a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
        if state[state.rfind(")") + 2 :].startswith("Z"):  # a zombie: dead, not yet reaped
            return False
    except OSError:
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


class RunLock:
    """One writer per run folder: a lock file with host, pid and a heartbeat.

    :meth:`acquire` creates the file exclusively (``O_CREAT | O_EXCL``) with ``{"host", "pid",
    "start", "token"}``, and a background thread refreshes its modification time (the
    heartbeat) every ``heartbeat_s`` seconds until :meth:`release`. A lock is *stale*, and is
    taken over, when its holder is on this host and its pid is no longer running (kill -9,
    crash, reboot), or when its heartbeat is older than ``stale_s`` seconds (a holder on
    another node that died, or a process suspended that long, which then notices at its next
    checkpoint that it lost the lock and stops).

    Raises:
        RunFolderLocked: (acquire) a live holder, named in the message.
    """

    def __init__(self, path: Path, *, heartbeat_s: float = 5.0, stale_s: float = 30.0) -> None:
        if not 0 < heartbeat_s < stale_s:
            raise ValueError(
                f"Invalid lock timing: heartbeat_s={heartbeat_s!r}, stale_s={stale_s!r} "
                "(need 0 < heartbeat_s < stale_s)"
            )
        self.path = path
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_s
        self._info: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    @property
    def held(self) -> bool:
        return self._info is not None

    def _read(self) -> tuple[dict[str, Any] | None, float] | None:
        """``(holder info or None if unreadable, heartbeat age in s)``; ``None``: no lock."""
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(text)
        except ValueError:
            info = None
        return (info if isinstance(info, dict) else None), age

    def _stale_reason(self, info: dict[str, Any] | None, age: float) -> str | None:
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s"
        if info is None:
            return None  # being written right now, or unreadable but fresh
        if info.get("host") == socket.gethostname():
            if not _pid_alive(int(info.get("pid", -1)), info.get("start")):
                return f"process {info.get('pid')} is no longer running"
        return None

    def holder_alive(self) -> bool:
        """Whether a live process (not stale) holds the lock now."""
        found = self._read()
        return found is not None and self._stale_reason(*found) is None

    def describe(self, info: dict[str, Any] | None, age: float) -> str:
        if info is None:
            return f"an unknown process (unreadable lock, heartbeat {age:.0f} s ago)"
        return (
            f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('since')}, "
            f"heartbeat {age:.0f} s ago)"
        )

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunFolderLocked` naming the holder."""
        if self.held:
            raise RunFolderLocked(f"{self.path.parent} is already open in this process")
        for _ in range(5):
            info = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "start": _process_start(os.getpid()),
                "token": uuid.uuid4().hex,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as exc:
                raise RunFileError(f"cannot create lock {self.path}: {_first_line(exc)}") from exc
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(info))
            self._info, self._lost = info, None
            self._start_heartbeat()
            return
        raise RunFolderLocked(
            f"{self.path.parent}: could not take {self.path.name}; other processes keep taking it"
        )

    def _take_over_if_stale(self) -> None:
        found = self._read()
        if found is None:
            return  # released meanwhile: try again
        info, age = found
        reason = self._stale_reason(info, age)
        if reason is None:
            raise RunFolderLocked(
                f"{self.path.parent} is being written by {self.describe(info, age)}; wait for "
                f"it to finish or stop it (a killed process's lock is taken over "
                f"automatically; delete {self.path} only if that process is gone)"
            )
        log.warning(
            "taking over the stale lock %s of %s: %s", self.path, self.describe(info, age), reason
        )
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        if moved != info:  # someone took over first and we moved their fresh lock: put it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
        aside.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        token = self._info["token"] if self._info else None

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    found = self._read()
                    if found is None or (found[0] or {}).get("token") != token:
                        self._lost = self.describe(*found) if found else "nobody (lock removed)"
                        return
                    os.utime(self.path)
                except OSError as exc:  # keep trying: a transient file-system error
                    log.warning("could not refresh %s: %s", self.path, exc)

        self._thread = threading.Thread(target=beat, name=f"heartbeat {self.path}", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise :class:`RunFolderLocked` if this process held the lock and lost it."""
        if self._info is None:
            return
        found = self._read()
        if found is None or (found[0] or {}).get("token") != self._info["token"]:
            holder = self.describe(*found) if found else "nobody (the lock file was removed)"
            raise RunFolderLocked(
                f"lost the lock on {self.path.parent} (now held by {holder}); another process "
                "took over this run folder, so this one stops"
            )

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this process's."""
        if self._info is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        found = self._read()
        if found is not None and (found[0] or {}).get("token") == self._info["token"]:
            self.path.unlink(missing_ok=True)
        self._info = None
