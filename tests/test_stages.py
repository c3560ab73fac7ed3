"""Stage manifests: refuse another configuration's outputs, detect up-to-date stages."""
import json

import pytest

from avg.core.io import InputError
from avg.core.stages import MANIFEST, begin_stage, fingerprint, read_manifest


def test_first_run_writes_running_then_complete(tmp_path):
    out = tmp_path / "out"
    run = begin_stage(out, "s", {"lr": 1e-3, "out_dir": str(out)})
    assert run.fresh and not run.up_to_date
    assert read_manifest(out)["status"] == "running"
    run.complete({"R@1": 1.5})
    m = read_manifest(out)
    assert m["status"] == "complete" and m["summary"] == {"R@1": 1.5} and m["run_id"]
    assert "out_dir" not in m["config"]  # volatile keys are not configuration


def test_same_config_is_up_to_date_until_an_input_changes(tmp_path, monkeypatch):
    inp = tmp_path / "in.txt"
    inp.write_text("a")
    out = tmp_path / "out"
    begin_stage(out, "s", {"lr": 1}, inputs=[inp]).complete()
    again = begin_stage(out, "s", {"lr": 1, "resume": True}, inputs=[inp])
    assert again.up_to_date and not again.fresh
    again.complete()
    inp.write_text("bb")
    assert not begin_stage(out, "s", {"lr": 1}, inputs=[inp]).up_to_date


def test_upstream_rerun_makes_downstream_stale(tmp_path):
    up, down = tmp_path / "up", tmp_path / "down"
    begin_stage(up, "a", {"x": 1}).complete()
    begin_stage(down, "b", {"y": 1}, inputs=[up]).complete()
    assert begin_stage(down, "b", {"y": 1}, inputs=[up]).up_to_date
    begin_stage(up, "a", {"x": 1}).complete()  # a new run_id
    assert not begin_stage(down, "b", {"y": 1}, inputs=[up]).up_to_date


@pytest.mark.parametrize("status", ["complete", "running"])
def test_different_config_is_refused_unless_forced(tmp_path, status):
    out = tmp_path / "out"
    run = begin_stage(out, "s", {"lr": 1e-3, "epochs": 2})
    if status == "complete":
        run.complete()
    with pytest.raises(InputError) as e:
        begin_stage(out, "s", {"lr": 2e-3, "epochs": 2})
    msg = str(e.value)
    assert MANIFEST in msg and "lr: 0.001 -> 0.002" in msg and "--force" in msg
    assert ("finished" if status == "complete" else "interrupted") in msg
    forced = begin_stage(out, "s", {"lr": 2e-3, "epochs": 2}, force=True)
    assert forced.fresh and not forced.up_to_date
    assert read_manifest(out)["config"]["lr"] == 2e-3


def test_other_stage_refused(tmp_path):
    begin_stage(tmp_path, "train_rqvae", {}).complete()
    with pytest.raises(InputError, match="train_rqvae"):
        begin_stage(tmp_path, "generate_codes", {})


def test_skip_env_leaves_complete_manifest_untouched(tmp_path, monkeypatch):
    begin_stage(tmp_path, "s", {"a": 1}).complete()
    before = (tmp_path / MANIFEST).read_text()
    monkeypatch.setenv("AVG_SKIP_DONE", "1")
    run = begin_stage(tmp_path, "s", {"a": 1})
    assert run.up_to_date and (tmp_path / MANIFEST).read_text() == before


def test_broken_manifest_names_file(tmp_path):
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(InputError, match=MANIFEST):
        begin_stage(tmp_path, "s", {})


def test_fingerprint_dir_ignores_hidden_and_manifest(tmp_path):
    (tmp_path / "a.npy").write_bytes(b"1")
    fp = fingerprint(tmp_path)
    (tmp_path / ".tmp").write_text("x")
    (tmp_path / MANIFEST).write_text(json.dumps({"status": "running", "config": {}}))
    assert fingerprint(tmp_path) == fp
    assert fingerprint(tmp_path / "nope") == "missing"


def test_hub_models_are_fingerprinted_by_their_cached_commit(tmp_path, monkeypatch):
    """A hub id is identified by the commit its cache resolves main to; downloading it during the
    stage is recorded at completion, so the next run with the same commit is up to date."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    assert fingerprint("org/tiny-model") == "hub:org/tiny-model@not-cached"
    assert fingerprint("t5-small") == "hub:t5-small@not-cached"
    assert fingerprint("outputs/demo/missing") == "missing"  # a path, not an id
    (tmp_path / "local").mkdir()
    assert fingerprint("local").startswith("dir:")  # a local folder wins over the id reading
    run = begin_stage(tmp_path / "out", "s", {"a": 1}, inputs=["org/tiny-model"])
    ref = tmp_path / "hub" / "models--org--tiny-model" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("abc123\n")  # the stage downloaded it
    run.complete()
    assert read_manifest(tmp_path / "out")["inputs"] == {"org/tiny-model": "hub:org/tiny-model@abc123"}
    assert begin_stage(tmp_path / "out", "s", {"a": 1}, inputs=["org/tiny-model"]).up_to_date
    ref.write_text("def456\n")  # a new commit upstream, pulled into the cache
    assert not begin_stage(tmp_path / "out", "s", {"a": 1}, inputs=["org/tiny-model"]).up_to_date


def test_an_unknown_recorded_flag_is_another_configuration_and_device_is_not_configuration(tmp_path):
    """0.2 reads manifests as they are (no renamed or added flags are migrated): outputs written with flags the
    stage no longer has are another configuration, named in the error; where a run computes is not configuration."""
    out = tmp_path / "out"
    begin_stage(out, "train_llama", {"device": "cpu", "max_train_samples": 5, "lr": 1}).complete()
    assert "device" not in read_manifest(out)["config"]
    with pytest.raises(InputError, match="max_train_samples: 5 -> '<unset>'"):
        begin_stage(out, "train_llama", {"device": "auto", "max_train_queries": 5, "lr": 1})
    assert begin_stage(out, "train_llama", {"device": "auto", "max_train_samples": 5, "lr": 1}).up_to_date


def test_device_flag():
    import argparse

    from avg.core.cli import add_device_arg

    p = argparse.ArgumentParser()
    add_device_arg(p)
    assert p.parse_args([]).device == "auto" and p.parse_args(["--device", "cpu"]).device == "cpu"
    for gone in (["--cpu"], ["--device", "cuda:3"]):  # --cpu was the 0.1 spelling
        with pytest.raises(SystemExit):
            p.parse_args(gone)

