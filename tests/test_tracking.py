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


def test_wandb_mode_follows_the_login_when_unset(tmp_path, monkeypatch):
    """WANDB_MODE unset: online for a logged-in user (a key in the netrc or WANDB_API_KEY), offline otherwise; a set
    WANDB_MODE always wins (dryrun is offline)."""
    from avg.core import tracking

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert tracking._wandb_mode() == "offline"  # no netrc at all
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")  # what `wandb login` writes
    assert tracking._wandb_mode() == "online"
    for mode, expected in (("offline", "offline"), ("disabled", "disabled"), ("dryrun", "offline"), ("online", "online")):
        monkeypatch.setenv("WANDB_MODE", mode)
        assert tracking._wandb_mode() == expected
    monkeypatch.delenv("WANDB_MODE")
    netrc.write_text("machine github.com\n  password x\n")
    assert tracking._wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert tracking._wandb_mode() == "online"


def test_a_run_joins_its_group_with_its_stage_seed_and_recipe(tmp_path, monkeypatch):
    """The stages of one run_all / seed study share AVG_WANDB_GROUP; each run's job type is its stage and its config
    carries the seed and the recipe -- so stage 1, stage 2 and the rerankers sit side by side in wandb."""
    import sys
    import types

    from avg.core.tracking import RunLogger

    seen = {}

    class FakeRun:
        summary: dict = {}

        def log(self, *a, **k):
            pass

        def finish(self):
            pass

    fake = types.SimpleNamespace(init=lambda **kw: seen.update(kw) or FakeRun(), Settings=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("AVG_WANDB_GROUP", "demo-best-20261207-120000")
    monkeypatch.setenv("AVG_RECIPE", "best")
    log = RunLogger(tmp_path, run_name="demo-t5-stage1", config={"seed": 1, "lr": 1e-3}, job_type="train_retriever_t5")
    log.finish()
    assert seen["group"] == "demo-best-20261207-120000" and seen["job_type"] == "train_retriever_t5"
    assert seen["config"] == {"seed": 1, "lr": 1e-3, "recipe": "best"} and seen["mode"] == "offline"
    monkeypatch.delenv("AVG_WANDB_GROUP")
    RunLogger(tmp_path / "b", run_name="x").finish()
    assert seen["group"] is None and seen["job_type"] == "x"
