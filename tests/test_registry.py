"""The stage registry (avg/artifacts/registry.py) is the one place that names stages and output folders:
every stage has its script and entry point, the stage scripts and the Python code spell no folder of
their own, and the shell sees the same folders as Python."""
from __future__ import annotations

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
        if s.kind == "stage":
            assert (ROOT / s.script).is_file(), s.script
            assert s.manifest and s.var, s.name
        target = ROOT / s.module if s.module.endswith(".py") else ROOT / (s.module.replace(".", "/") + ".py")
        assert target.is_file(), (s.name, s.module)
        if s.kind == "stage":
            # one name: scripts/<name>.sh runs python -m avg.stages.<name>
            assert s.module == f"avg.stages.{s.name}", s.name
            assert f"-m {s.module} " in (ROOT / s.script).read_text().replace("\\\n", " "), s.script
            # the module (or the stage module it runs) writes the manifest name the registry records
            text = target.read_text()
            text += "".join((ROOT / f"avg/stages/{m}.py").read_text() for m in re.findall(r"from avg\.stages import (\w+)", text))
            assert any(f'manifest_name("{o.name}")' in text for o in registry.STAGES
                       if o.manifest == s.manifest), (s.name, s.module)
    folders = [s.out for s in registry.STAGES if s.out]
    assert len(set(folders)) == len(folders)


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
    assert "RETRIEVER_T5_DIR='outputs/my data/retriever_t5'" in lines
    env = subprocess.run(["bash", "-c", f'eval "$({sys.executable} -m avg.artifacts.registry shell "outputs/my data")"; '
                          'echo "$RERANKER_TEST_DIR|$EMB_DIR"'], cwd=ROOT, capture_output=True, text=True, check=True)
    assert env.stdout.strip() == "outputs/my data/reranker/test|outputs/my data/emb"
    run = lambda *a: subprocess.run([sys.executable, "-m", "avg.artifacts.registry", *a], cwd=ROOT,  # noqa: E731
                                    capture_output=True, text=True)
    assert run("out", "train_retriever_t5_stage2").stdout.strip() == "retriever_t5_stage2"
    bad = run("out", "no_such_stage")
    assert bad.returncode == 2 and "unknown stage 'no_such_stage'" in bad.stderr
    assert run("out", "report").returncode == 2 and run().returncode == 2
    assert registry.out_dir(tmp_path, "prepare_emb") == tmp_path / "emb"
    assert registry.manifest_name("finetune_reranker_llama") == "finetune_reranker"
    with pytest.raises(KeyError, match="writes no manifest"):
        registry.manifest_name("demo_t5")
