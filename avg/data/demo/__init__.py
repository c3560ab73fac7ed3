"""Synthetic demo dataset: rendered scenes of simple shapes with varied, partly ambiguous captions.

No real image-caption set can be downloaded where the demo runs, so the demo retrieves rendered
scenes instead: 1-3 coloured shapes on a 3x3 grid over a varied background. Each image gets five
different captions; some name every object with its attributes and place, others only a part
("a red star on a striped background"), so captions usually identify one image but partial ones
match several, as real captions do. Output is a Karpathy json, read like Flickr30K or COCO.

Every image is drawn from its own RNG seeded by (seed, split, index), so the result is
byte-identical whatever the number of worker processes.

scenes.py (vocabulary, sampling, drawing), captions.py, dataset.py (the files on disk), text.py (the
demo LMs' training captions and their BPE).
"""
from avg.data.demo.captions import make_captions
from avg.data.demo.dataset import (DEMO_SPLITS, GENERATOR_VERSION, JSON_NAME, PARAMS_NAME, demo_params,
                                   ensure_demo_dataset, generate_demo_dataset)
from avg.data.demo.scenes import (BG_COLOURS, BG_KINDS, CELLS, COLOURS, SHAPE_WORDS, SHAPES, SIZES, Background, Scene,
                                  SceneObject, render_scene, sample_scene)
from avg.data.demo.text import train_caption_bpe, train_captions

__all__ = ["make_captions", "DEMO_SPLITS", "GENERATOR_VERSION", "JSON_NAME", "PARAMS_NAME", "demo_params",
           "ensure_demo_dataset", "generate_demo_dataset", "BG_COLOURS", "BG_KINDS", "CELLS", "COLOURS", "SHAPE_WORDS",
           "SHAPES", "SIZES", "Background", "Scene", "SceneObject", "render_scene", "sample_scene", "train_caption_bpe",
           "train_captions"]
