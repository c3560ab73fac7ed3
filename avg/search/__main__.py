from avg.cli import main
from avg.core.cli import run_main

run_main(main)
