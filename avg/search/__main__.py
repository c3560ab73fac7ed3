from avg.search.cli import main
from avg.utils.cli import run_main

run_main(main)
