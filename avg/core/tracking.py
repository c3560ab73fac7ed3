"""One logging helper for every stage: console, a plain log file, a metrics jsonl and wandb.

wandb is initialised on the main process only and never prompts. It honours ``WANDB_MODE`` (``online``,
``offline``, ``disabled``); unset, a run goes online when the user is logged in (``wandb login``: a key in
``~/.netrc`` or ``WANDB_API_KEY``) and offline otherwise -- ``wandb sync <out-dir>/wandb/offline-run-*`` uploads
it later. Runs of one ``run_all.sh`` / seed study share a wandb group (``AVG_WANDB_GROUP``, set by those
scripts); each run's job type is its stage, and its config holds the seed and the recipe (``AVG_RECIPE``).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from avg.core.io import write_json


def is_main_process() -> bool:
    """True on rank 0 (torchrun/accelerate set RANK) or in a single-process run."""
    return int(os.environ.get("RANK", "0")) == 0


def get_logger(name: str = "avg") -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


GROUP_ENV = "AVG_WANDB_GROUP"


def _wandb_mode() -> str:
    """``WANDB_MODE`` when set (``dryrun`` is ``offline``); unset, online when logged in, else offline."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in {"disabled", "offline", "online", "dryrun"}:
        return "offline" if mode == "dryrun" else mode
    return "online" if _logged_in() else "offline"


def _logged_in() -> bool:
    return bool(os.environ.get("WANDB_API_KEY")) or _has_netrc_key()


class RunLogger:
    """Write metrics to console, ``<out_dir>/<log_name>``, ``<out_dir>/metrics.jsonl`` and wandb.

    Only the main process writes; on other ranks every method is a no-op, so ranks never race
    on files.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        project: str = "avg",
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        log_name: str = "train.log",
        metrics_name: str = "metrics.jsonl",
        use_wandb: bool = True,
        resume: bool = False,
        job_type: str | None = None,
    ) -> None:
        self.enabled = is_main_process()
        self.out_dir = Path(out_dir)
        self.logger = get_logger(f"avg.{run_name or project}")
        self.wandb_run = None
        self._t0 = time.time()
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file_handler = logging.FileHandler(self.out_dir / log_name, mode="a" if resume else "w", encoding="utf-8")
        self._file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
        self.logger.addHandler(self._file_handler)
        self.metrics_path = self.out_dir / metrics_name
        if not resume and self.metrics_path.exists():
            self.metrics_path.unlink()
        if config is not None:
            write_json(dict(config), self.out_dir / "config.json")
        write_json(environment_info(), self.out_dir / "environment.json")
        if use_wandb and _wandb_mode() != "disabled":
            self._init_wandb(project, run_name, config, job_type)

    def _init_wandb(self, project: str, run_name: str | None, config: Mapping[str, Any] | None,
                    job_type: str | None = None) -> None:
        try:
            import wandb
        except ImportError:  # pragma: no cover - wandb is a dependency, but stay usable without it
            self.logger.warning("wandb not installed; metrics go to %s only", self.metrics_path)
            return
        mode = _wandb_mode()
        if mode == "online" and not _logged_in():
            self.logger.warning("WANDB_MODE=online but no wandb credentials found; logging offline instead")
            mode = "offline"
        recipe = os.environ.get("AVG_RECIPE")  # avg.core.stages.RECIPE_ENV, set by scripts/common.sh
        try:
            self.wandb_run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", project),
                name=run_name,
                group=os.environ.get(GROUP_ENV) or None,
                job_type=job_type or run_name,
                config={**dict(config or {}), **({"recipe": recipe} if recipe else {})},
                dir=str(self.out_dir),
                mode=mode,
                reinit="finish_previous",
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as e:  # wandb must never stop a training run
            self.logger.warning("wandb init failed (%s); continuing without wandb", e)
            self.wandb_run = None

    def info(self, msg: str, *args: Any) -> None:
        if self.enabled:
            self.logger.info(msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        if self.enabled:
            self.logger.warning(msg, *args)

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log a dict of scalars (keys grouped like ``train/loss``, ``eval/val/R@1``)."""
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time() - self._t0, 3), **_plain(metrics)}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        self.logger.info("%s%s", f"step {step}: " if step is not None else "", shown)
        if self.wandb_run is not None:
            self.wandb_run.log(dict(metrics), step=step)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        if self.enabled and self.wandb_run is not None:
            for k, v in metrics.items():
                self.wandb_run.summary[k] = v

    def finish(self) -> None:
        if not self.enabled:
            return
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        self.logger.removeHandler(self._file_handler)
        self._file_handler.close()


def environment_info() -> dict:
    """Versions, command line and git commit, saved next to every stage's outputs."""
    import platform
    import subprocess
    from importlib import metadata

    versions = {}
    for dist in ("avg", "torch", "transformers", "peft", "accelerate", "open_clip_torch", "numpy", "tokenizers", "wandb"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    commit = None
    try:
        repo = Path(__file__).resolve().parents[2]
        res = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if res.returncode == 0:
            commit = res.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "git_commit": commit, "argv": list(sys.argv), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def _has_netrc_key() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def _plain(metrics: Mapping[str, Any]) -> dict:
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
            v = v.item()
        out[k] = v
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
