"""Stage manifests: which configuration made an output dir, from which inputs, and whether it finished.

Every stage writes ``<out_dir>/stage.json``::

    {"stage": "train_rqvae", "status": "running" | "complete", "config": {...},
     "inputs": {path: fingerprint}, "run_id": "...", "started_at": ..., "finished_at": ...}

It serves two rules:

* **Never silently overwrite another configuration's results.** When ``out_dir`` already holds a
  manifest (finished, or left "running" by a killed run) whose configuration differs from the
  current one, ``begin_stage`` raises :class:`~avg.core.io.InputError` naming the manifest and the
  differing keys, unless ``--force`` was given (or a new ``--out-dir`` chosen).
* **Skip what is complete and up to date.** A stage is up to date when its manifest says
  "complete", the configuration is the same and every input's fingerprint is unchanged. An input
  that is itself a stage output is fingerprinted by its manifest's ``run_id`` (a new one is drawn
  each time a stage completes), so re-running an upstream stage makes everything downstream stale;
  other files by size and modification time; other folders by the names, sizes and modification
  times of their top-level entries; a model named by its hub id (``t5-base``, ``org/name``) by the
  commit its local hub cache resolves ``main`` to (``hub:org/name@<sha>``; re-read when the stage
  completes, since the stage itself may have downloaded it). ``scripts/run_all.sh`` sets ``AVG_SKIP_DONE=1`` so that up-to-date
  stages return at once (:func:`skip_if_done`); run directly, a stage always runs.

Only the main process writes manifests.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from avg.core.io import InputError, write_json
from avg.core.tracking import is_main_process

MANIFEST = "stage.json"
SKIP_ENV = "AVG_SKIP_DONE"

#: flags that change how a stage runs, not what it produces
VOLATILE_KEYS = frozenset({
    "out_dir", "force", "resume", "log_every", "progress", "no_progress",
    "num_workers", "device", "cpu", "run_name", "wandb_project", "eval_batch_size",
    "save_every_steps", "stop_after_steps", "stop_after_epochs", "keep_every_epochs",
})


def add_force_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="overwrite outputs in --out-dir that were made with a different configuration")


RECIPE_ENV = "AVG_RECIPE"


def current_recipe() -> Optional[str]:
    """The named recipe (configs/recipes/<name>.sh) the stage scripts ran under; None when a stage module
    was run directly. Recorded in every manifest: the flags it set are in the manifest's configuration."""
    return os.environ.get(RECIPE_ENV) or None


def skip_if_done() -> bool:
    """True when the caller asked up-to-date stages to return at once (run_all.sh sets AVG_SKIP_DONE=1)."""
    return os.environ.get(SKIP_ENV, "") not in ("", "0", "false", "no")


def _plain(value: Any) -> Any:
    """JSON-comparable form of a config value (paths as strings, tuples as lists)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def normalise_config(config: Mapping[str, Any], ignore: Iterable[str] = ()) -> dict:
    drop = VOLATILE_KEYS | set(ignore)
    return {k: _plain(v) for k, v in sorted(config.items()) if k not in drop}


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as huggingface_hub finds it (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_fingerprint(name: str, revision: str = "main") -> Optional[str]:
    """``hub:<id>@<commit>`` for a hub model id that is not a local path (``@not-cached`` before its
    first download); None for anything that is not a hub id."""
    if Path(name).exists() or not _HUB_ID.fullmatch(name):
        return None
    ref = hub_cache_dir() / f"models--{name.replace('/', '--')}" / "refs" / revision
    try:
        commit = ref.read_text(encoding="utf-8").strip()
    except OSError:
        commit = "not-cached"
    return f"hub:{name}@{commit}"


def fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity of an input: its stage run_id, else size+mtime of the file or folder entries,
    else the hub commit of a model id."""
    hub = hub_fingerprint(os.fspath(path)) if isinstance(path, str) else None
    if hub is not None:
        return hub
    p = Path(path)
    manifest = p / MANIFEST
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
            if m.get("status") == "complete" and m.get("run_id"):
                return f"run:{m['run_id']}"
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            pass
    if p.is_file():
        st = p.stat()
        return f"file:{st.st_size}:{st.st_mtime_ns}"
    if p.is_dir():
        entries = []
        with os.scandir(p) as it:
            for e in it:
                if e.name.startswith(".") or e.name == MANIFEST:
                    continue
                st = e.stat()
                entries.append(f"{e.name}:{st.st_size}:{st.st_mtime_ns}")
        import hashlib
        return "dir:" + hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()[:16]
    return "missing"


def read_manifest(out_dir: str | os.PathLike) -> Optional[dict]:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: unreadable stage manifest ({e}); delete it or pass --force") from e
    if not isinstance(m, dict) or "config" not in m:
        raise InputError(f"{path}: not a stage manifest (no 'config'); delete it or pass --force")
    return m


def config_diff(old: Mapping, new: Mapping) -> list[str]:
    """Human-readable differences, e.g. ``lr: 0.001 -> 0.002``."""
    out = []
    for k in sorted(set(old) | set(new)):
        if old.get(k, "<unset>") != new.get(k, "<unset>"):
            out.append(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}")
    return out


class StageRun:
    """The current run of a stage in ``out_dir`` (see :func:`begin_stage`)."""

    def __init__(self, out_dir: Path, stage: str, config: dict, inputs: dict, previous: Optional[dict], fresh: bool):
        self.out_dir = out_dir
        self.stage = stage
        self.config = config
        self.inputs = inputs
        self.previous = previous
        self.fresh = fresh
        self.started_at = time.time()
        self.up_to_date = bool(
            previous is not None and not fresh and previous.get("status") == "complete"
            and previous.get("config") == config and previous.get("inputs") == inputs
        )

    def _write(self, status: str, summary: Optional[Mapping] = None, run_id: Optional[str] = None) -> None:
        if not is_main_process():
            return
        manifest = {"stage": self.stage, "status": status, "recipe": current_recipe(), "config": self.config,
                    "inputs": self.inputs, "started_at": self.started_at}
        if run_id is not None:
            manifest.update(run_id=run_id, finished_at=time.time())
        if summary is not None:
            manifest["summary"] = _plain(dict(summary))
        if run_id is not None:  # seeds are in "config"; versions, git commit and argv next to them
            from avg.core.tracking import environment_info
            manifest["environment"] = environment_info()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(manifest, self.out_dir / MANIFEST)

    def running(self) -> None:
        """Record that this configuration now owns ``out_dir`` (a killed run leaves this behind)."""
        self._write("running")

    def complete(self, summary: Optional[Mapping] = None) -> None:
        """Mark the outputs complete; a new run_id makes downstream stages stale. Hub models are
        fingerprinted again: the stage may have downloaded them since it began."""
        self.inputs = {k: fingerprint(k) if v.startswith("hub:") else v for k, v in self.inputs.items()}
        self._write("complete", summary, run_id=uuid.uuid4().hex)


def begin_stage(out_dir: str | os.PathLike, stage: str, config: Mapping[str, Any], *,
                inputs: Iterable[str | os.PathLike | None] = (), force: bool = False,
                ignore: Iterable[str] = (), mark_running: bool = True) -> StageRun:
    """Check ``out_dir`` against this configuration and claim it.

    Raises InputError when ``out_dir`` holds outputs (finished or interrupted) of a different
    stage or configuration, unless ``force``. Unless the stage is up to date, writes a "running"
    manifest (``mark_running``) so that an interrupted run is recognised when it is resumed.
    """
    out = Path(out_dir)
    cfg = normalise_config(config, ignore)
    fps = {os.fspath(p): fingerprint(p) for p in inputs if p is not None and os.fspath(p) != ""}
    previous = read_manifest(out)
    if previous is not None and not force:
        where = out / MANIFEST
        if previous.get("stage") != stage:
            raise InputError(f"{where}: {out} holds the outputs of stage {previous.get('stage')!r}, not {stage!r}; "
                             "choose another --out-dir or pass --force to overwrite")
        diff = config_diff(previous.get("config", {}), cfg)
        if diff:
            state = "finished" if previous.get("status") == "complete" else "interrupted"
            raise InputError(f"{where}: {out} holds {state} outputs of a different configuration "
                             f"({'; '.join(diff)}); pass --force to overwrite them or choose a new --out-dir")
    run = StageRun(out, stage, cfg, fps, previous, fresh=previous is None or force)
    if mark_running and not (run.up_to_date and skip_if_done()):
        run.running()
    return run


__all__ = ["MANIFEST", "RECIPE_ENV", "SKIP_ENV", "VOLATILE_KEYS", "StageRun", "add_force_arg",
           "begin_stage", "config_diff", "current_recipe",
           "fingerprint", "hub_cache_dir", "hub_fingerprint", "normalise_config", "read_manifest", "skip_if_done"]
