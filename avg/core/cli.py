"""Entry-point wrapper (bad input ends the run with a one-line message and exit status 2) and the
flags every stage spells the same way (``--device``)."""
from __future__ import annotations

import sys
from typing import Callable

from avg.core.io import InputError


def run_main(main: Callable) -> None:
    """Call ``main()``; an InputError prints ``error: <file: record: problem>`` (no traceback) and
    exits 2; an int result is the exit status, anything else means success."""
    try:
        result = main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)


def add_device_arg(parser) -> None:
    """``--device auto|cpu`` for the stages that run under accelerate or torchrun: ``auto`` takes the process's GPU when torch sees one (torchrun's
    LOCAL_RANK / accelerate pick which), else the CPU."""
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                        help="auto: this process's GPU when torch sees one, else the CPU; cpu: the CPU even with a GPU")


__all__ = ["add_device_arg", "run_main"]
