"""Entry-point wrapper (bad input ends the run with a one-line message and exit status 2) and the
flags every stage spells the same way (``--device``; deprecated aliases of renamed flags)."""
from __future__ import annotations

import argparse
import sys
import warnings
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


class DeprecatedAlias(argparse.Action):
    """An old flag kept for one release: sets the new flag's destination (to ``const`` when it takes
    no value) and warns with the new spelling (FutureWarning)."""

    def __init__(self, option_strings, dest, *, new_flag: str, nargs=None, const=None, **kwargs):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, nargs=nargs, const=const, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        value = self.const if self.nargs == 0 else values
        shown = self.new_flag if self.nargs == 0 else f"{self.new_flag} {values}"
        warnings.warn(f"{option_string} is deprecated and will be removed: use {shown}", FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, value)


def add_deprecated_alias(parser, old: str, new: str, dest: str, *, const=None, type=None) -> None:
    """``old`` as a hidden alias of ``new`` (``dest``): a switch setting ``const`` when given, else a
    flag taking a value of ``type``."""
    if const is not None:
        parser.add_argument(old, dest=dest, action=DeprecatedAlias, new_flag=new, nargs=0, const=const,
                            help=argparse.SUPPRESS)
    else:
        parser.add_argument(old, dest=dest, action=DeprecatedAlias, new_flag=new, type=type, help=argparse.SUPPRESS)


def add_device_arg(parser) -> None:
    """``--device auto|cpu`` (and the deprecated ``--cpu`` = ``--device cpu``) for the stages that run
    under accelerate or torchrun: ``auto`` takes the process's GPU when torch sees one (torchrun's
    LOCAL_RANK / accelerate pick which), else the CPU."""
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                        help="auto: this process's GPU when torch sees one, else the CPU; cpu: the CPU even with a GPU")
    add_deprecated_alias(parser, "--cpu", "--device cpu", "device", const="cpu")


__all__ = ["DeprecatedAlias", "add_deprecated_alias", "add_device_arg", "run_main"]
