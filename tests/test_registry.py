"""The stage registry (avg/artifacts/registry.py) is the one place that names stages and output folders:
every stage has its script and entry point, the stage scripts and the Python code spell no folder of
their own, and the shell sees the same folders as Python."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from avg.artifacts import registry

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_has_its_script_and_entry_point():
    assert len(set(registry.names())) == len(registry.STAGES)
    for s in registry.STAGES:
        target = ROOT / s.module if s.module.endswith(".py") else ROOT / (s.module.replace(".", "/") + ".py")
        assert target.is_file(), (s.name, s.module)
        if s.kind != "stage":
            continue
        # one name: scripts/<name>.sh runs python -m avg.stages.<name>, which writes <root>/<name>/stage.json
        # saying "stage": "<name>"
        assert (ROOT / s.script).is_file(), s.script
        assert s.module == f"avg.stages.{s.name}" and s.out == s.name and registry.manifest_name(s.name) == s.name
        assert f"-m {s.module} " in (ROOT / s.script).read_text().replace("\\\n", " "), s.script
        text = target.read_text()
        if s.name in registry.T5_STAGES.values():
            assert "manifest_name(T5_STAGES[args.stage])" in (ROOT / "avg/stages/train_retriever_t5.py").read_text()
        else:
            assert f'manifest_name("{s.name}")' in text, (s.name, s.module)
        assert all(registry.stage(i).kind == "stage" and registry.names().index(i) < registry.names().index(s.name)
                   for i in s.inputs), (s.name, s.inputs)


def test_each_stage_script_reads_its_inputs_folders_and_writes_its_own():
    """The inputs the registry records are the folders each script hands its module, no more, no fewer."""
    var_of = {s.var: s.name for s in registry.STAGES if s.var}
    for s in registry.STAGES:
        if s.kind != "stage":
            continue
        used = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*_DIR)\b", (ROOT / s.script).read_text())) & set(var_of)
        assert {var_of[v] for v in used} == {s.name, *s.inputs}, (s.script, sorted(var_of[v] for v in used))


def test_stage_scripts_and_library_spell_no_output_folder():
    top = {s.out.split("/")[0] for s in registry.STAGES if s.out}
    bad = []
    for script in (ROOT / "scripts").glob("*.sh"):
        for n, line in enumerate(script.read_text().splitlines(), 1):
            for m in re.finditer(r"\$\{?STAGE_ROOT\}?/([a-z_0-9]+)", line):
                if m.group(1) in top:
                    bad.append(f"{script.name}:{n}: {line.strip()}")
    for py in (ROOT / "avg").rglob("*.py"):
        if py.name == "registry.py":
            continue
        for n, line in enumerate(py.read_text().splitlines(), 1):
            for m in re.finditer(r"""/\s*["']([a-z_0-9]+)["']""", line):
                if m.group(1) in top and "help=" not in line:
                    bad.append(f"{py.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "use the registry (avg.artifacts.registry.out / the *_DIR shell variables):\n" + "\n".join(bad)


def test_run_all_reads_its_stages_from_the_registry():
    out = subprocess.run(["bash", "scripts/run_all.sh", "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    listed = [line.strip() for line in out.split("stages, in order")[1].splitlines()[1:] if line.strip()]
    assert listed == registry.names()


def test_shell_lines_and_cli(tmp_path):
    lines = registry.shell_lines("outputs/my data")
    assert "RETRIEVER_T5_DIR='outputs/my data/train_retriever_t5'" in lines
    env = subprocess.run(["bash", "-c", f'eval "$({sys.executable} -m avg.artifacts.registry shell "outputs/my data")"; '
                          'echo "$RERANKER_TEST_DIR|$EMB_DIR"'], cwd=ROOT, capture_output=True, text=True, check=True)
    assert env.stdout.strip() == "outputs/my data/test_reranker_llama|outputs/my data/prepare_emb"
    assert env.stderr == ""
    run = lambda *a: subprocess.run([sys.executable, "-m", "avg.artifacts.registry", *a], cwd=ROOT,  # noqa: E731
                                    capture_output=True, text=True)
    assert run("out", "train_retriever_t5_stage2").stdout.strip() == "train_retriever_t5_stage2"
    bad = run("out", "no_such_stage")
    assert bad.returncode == 2 and "unknown stage 'no_such_stage'" in bad.stderr
    assert run("out", "report").returncode == 2 and run().returncode == 2 and run("show", "x").returncode == 2
    shown = run("show").stdout.splitlines()
    assert len(shown) == len(registry.STAGES) + 1
    assert shown[registry.names().index("generate_codes") + 1].split() == ["generate_codes", "stage", "CODES_DIR",
                                                                            "train_rqvae", "prepare_emb"]
    assert registry.out_dir(tmp_path, "prepare_emb") == tmp_path / "prepare_emb"
    assert registry.manifest_name("finetune_reranker_llama") == "finetune_reranker_llama"
    with pytest.raises(KeyError, match="writes no manifest"):
        registry.manifest_name("demo_t5")


def test_the_registry_names_the_manifest_file_the_stages_write():
    from avg.core.stages import MANIFEST

    assert registry.MANIFEST == MANIFEST


@pytest.mark.parametrize("script,var_folder", [("eval_clip_baseline", "eval_clip_baseline"),
                                               ("test_retriever_llama", "test_retriever_llama"),
                                               ("test_reranker_llama", "test_reranker_llama")])
def test_a_split_stage_writes_one_folder_per_split(tmp_path, script, var_folder):
    """SPLIT=test writes the stage's folder, another split <folder>_<split> (common.sh split_out); LAUNCH=echo
    (or a python that echoes stage modules) prints the command the script would run instead of running it."""
    def out_dir(split):
        env = {k: v for k, v in os.environ.items() if k not in ("SPLIT", "LAUNCH", "OUT_DIR")}
        env.update(SPLIT=split, LAUNCH="echo", OUT_DIR=str(tmp_path))
        if script == "eval_clip_baseline":  # it runs python itself: a stub python on PATH echoes it
            (tmp_path / "bin").mkdir(exist_ok=True)
            (tmp_path / "bin" / "python").write_text(
                f'#!/bin/sh\ncase "$*" in *avg.stages.*) echo python "$@" ;; *) exec {sys.executable} "$@" ;; esac\n')
            (tmp_path / "bin" / "python").chmod(0o755)
            env.update(PATH=f"{tmp_path / 'bin'}:{env['PATH']}", VIRTUAL_ENV="stub")
        r = subprocess.run(["bash", f"scripts/{script}.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        args = r.stdout.split("-m avg.stages.")[1].split()
        return args[args.index("--out-dir") + 1]
    assert out_dir("test") == f"{tmp_path}/demo/{var_folder}"
    assert out_dir("val") == f"{tmp_path}/demo/{var_folder}_val"
