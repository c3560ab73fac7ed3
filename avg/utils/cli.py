"""Entry-point wrapper: bad input ends the run with a one-line message and exit status 2."""
from __future__ import annotations

import sys
from typing import Callable

from avg.utils.io import InputError


def run_main(main: Callable) -> None:
    """Call ``main()``; an InputError prints ``error: <file: record: problem>`` (no traceback) and
    exits 2; an int result is the exit status, anything else means success."""
    try:
        result = main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)
