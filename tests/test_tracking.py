import json

from avg.core.tracking import RunLogger


def test_run_logger_writes_log_and_jsonl_without_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    log = RunLogger(tmp_path, run_name="t", config={"lr": 0.1})
    log.log({"train/loss": 1.5, "eval/val/R@1": 20.0}, step=3)
    log.finish()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 3 and lines[0]["train/loss"] == 1.5
    assert "train/loss=1.5" in (tmp_path / "train.log").read_text()
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 0.1}
    assert not (tmp_path / "wandb").exists()
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["versions"]["torch"] and env["python"] and isinstance(env["argv"], list)


def test_offline_wandb_never_prompts_and_writes_a_local_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    log = RunLogger(tmp_path, run_name="offline-test", config={"seed": 1})
    log.log({"train/loss": 0.5}, step=1)
    log.summary({"best/R@1": 12.5})
    log.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, "an offline wandb run directory is written"


def test_non_main_rank_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    log = RunLogger(tmp_path / "out", run_name="r1")
    log.log({"x": 1}, step=0)
    log.finish()
    assert not (tmp_path / "out").exists()
