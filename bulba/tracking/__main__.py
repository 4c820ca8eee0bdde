"""`python -m bulba.tracking sync|status RUN_DIR` (bulba.tracking.sync)."""

from bulba.errors import run_cli
from bulba.tracking.sync import main

if __name__ == "__main__":
    run_cli(main)
