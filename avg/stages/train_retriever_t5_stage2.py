"""Stage 2 of the T5 retriever: discriminative fine-tuning, L = L_gen + lambda * L_dis (eqs. 8-10).

The trainer of :mod:`avg.stages.train_retriever_t5` with ``--stage 2``: it takes the same flags,
starts from the stage-1 model (``--init-from <stage-1 out>/best``) and writes the same outputs.

    python -m avg.stages.train_retriever_t5_stage2 --init-from outputs/demo/train_retriever_t5/best \\
        --data-dir outputs/demo/prepare_retriever_dataset --out-dir outputs/demo/train_retriever_t5_stage2
"""
from __future__ import annotations

import sys

from avg.stages import train_retriever_t5
from avg.core.cli import run_main
from avg.core.io import InputError


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--stage" or a.startswith("--stage=") for a in argv):
        raise InputError("avg.stages.train_retriever_t5_stage2 always runs stage 2: drop --stage "
                         "(stage 1 is avg.stages.train_retriever_t5)")
    return train_retriever_t5.main(["--stage", "2", *argv])


if __name__ == "__main__":
    run_main(main)
