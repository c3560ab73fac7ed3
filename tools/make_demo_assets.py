"""Build (or reuse) everything the demo needs: the generated dataset and the small demo CLIP.

    python tools/make_demo_assets.py                      # data/demo/{dataset_demo.json,images/,clip/}
    python tools/make_demo_assets.py --n-train 200 --n-val 40 --n-test 40 --epochs 1   # a quick one

Both parts are cached: the dataset is regenerated only when ``demo_params.json`` differs from the
requested parameters, the CLIP only when ``clip/avg_demo_clip.pt`` or ``clip/metrics.json`` is
missing or the dataset was just rebuilt. ``--force`` rebuilds both. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a fresh clone without install
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_demo_clip import add_train_args, config_from_args  # noqa: E402

from avg.core.io import InputError, read_json  # noqa: E402
from avg.core.tracking import get_logger  # noqa: E402
from avg.core.cli import run_main

log = get_logger("avg.demo_assets")


BUILT_FOR = "dataset_params.json"


def clip_is_built(clip_dir: Path, dataset_params: dict, clip_cfg) -> bool:
    """A finished CLIP dir has its checkpoint, metrics.json and a marker (written last) naming the
    dataset parameters it was trained on, and was trained with the requested settings."""
    from dataclasses import asdict

    from avg.models.demo_clip import CHECKPOINT_NAME

    if not all((clip_dir / name).is_file() for name in (CHECKPOINT_NAME, "metrics.json", BUILT_FOR)):
        return False
    try:
        trained = dict(read_json(clip_dir / "metrics.json").get("config", {}))
        wanted = asdict(clip_cfg)
        trained.pop("threads", None), wanted.pop("threads", None)   # speed only, same model
        return read_json(clip_dir / BUILT_FOR) == dataset_params and trained == wanted
    except InputError:
        return False


def make_demo_assets(data_dir: Path, *, n_train: int, n_val: int, n_test: int, image_size: int, seed: int, clip_cfg, force: bool = False, progress: bool = True) -> dict:
    from avg.data.demo import PARAMS_NAME, ensure_demo_dataset
    from avg.models.demo_clip import CHECKPOINT_NAME, train_demo_clip
    from avg.core.io import write_json

    json_path, built = ensure_demo_dataset(data_dir, force=force, progress=progress, n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size, seed=seed)
    log.info("demo dataset %s: %s", json_path, "generated" if built else "cached (same parameters)")
    clip_dir = data_dir / "clip"
    dataset_params = read_json(data_dir / PARAMS_NAME)
    if force or built or not clip_is_built(clip_dir, dataset_params, clip_cfg):
        (clip_dir / BUILT_FOR).unlink(missing_ok=True)
        metrics = train_demo_clip(json_path, data_dir / "images", clip_dir, clip_cfg, progress=progress)
        write_json(dataset_params, clip_dir / BUILT_FOR)
        log.info("demo CLIP trained: %s", clip_dir / CHECKPOINT_NAME)
    else:
        metrics = read_json(clip_dir / "metrics.json")
        log.info("demo CLIP cached: %s (test R@1=%.2f)", clip_dir / CHECKPOINT_NAME, metrics["R@1"])
    return {"annotations": str(json_path), "image_root": str(data_dir / "images"), "clip_checkpoint": str(clip_dir / CHECKPOINT_NAME), "clip_metrics": metrics}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="data/demo", help="where dataset_demo.json, images/ and clip/ go")
    p.add_argument("--n-train", type=int, default=10000, help="train images to generate")
    p.add_argument("--n-val", type=int, default=1000, help="val images to generate")
    p.add_argument("--n-test", type=int, default=1000, help="test images to generate")
    p.add_argument("--image-size", type=int, default=64, help="side of the rendered images (the demo CLIP expects 64)")
    p.add_argument("--force", action="store_true", help="rebuild the dataset and the CLIP even if cached")
    p.add_argument("--no-progress", action="store_true", help="hide tqdm bars")
    add_train_args(p)   # --epochs, --batch-size, --lr, ..., --seed (dataset and CLIP share it)
    args = p.parse_args(argv)
    return make_demo_assets(Path(args.data_dir), n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, image_size=args.image_size, seed=args.seed, clip_cfg=config_from_args(args), force=args.force, progress=not args.no_progress)


if __name__ == "__main__":
    run_main(main)
