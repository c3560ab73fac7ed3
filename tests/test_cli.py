import subprocess
import sys

import pytest

from avg.core.cli import run_main
from avg.core.io import InputError

# Entry points that read user files; each must end bad input with one line and status 2.
MODULES = [
    ("avg.stages.prepare_retriever_dataset", ["--annotations", "{d}/nope.json", "--codes-dir", "{d}/codes", "--out-dir", "{d}/out"]),
    ("avg.stages.train_retriever_t5", ["--data-dir", "{d}/data", "--codes-dir", "{d}/codes", "--model", "{d}/t5", "--out-dir", "{d}/out"]),
    ("avg.stages.train_rqvae", ["--emb-dir", "{d}/emb", "--out-dir", "{d}/out"]),
    ("avg.stages.generate_codes", ["--rqvae-dir", "{d}/rq", "--emb-dir", "{d}/emb", "--out-dir", "{d}/out"]),
]


@pytest.mark.parametrize("module,args", MODULES, ids=[m for m, _ in MODULES])
def test_bad_input_is_one_line_and_status_2(module, args, tmp_path):
    argv = [a.format(d=tmp_path) for a in args]
    res = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "error: " in res.stderr and str(tmp_path) in res.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


def test_run_main_exit_codes():
    def bad():
        raise InputError("x.json: images[0]: broken")

    for fn, code in ((bad, 2), (lambda: 3, 3), (lambda: {"R@1": 1.0}, 0), (lambda: None, 0)):
        with pytest.raises(SystemExit) as e:
            run_main(fn)
        assert e.value.code == code


def test_avg_version_is_the_package_version():
    """avg --version reads the installed distribution (pyproject.toml); avg.__version__ must say the same."""
    import avg

    out = subprocess.run([sys.executable, "-m", "avg", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == avg.__version__, out.stdout
