"""``python -m avg ...`` is the ``avg`` command (avg.cli): ``python -m avg search --run outputs/demo "a query"``."""
from avg.cli import console_main

console_main()
