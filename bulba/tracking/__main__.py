"""`python -m bulba.tracking sync|status RUN_DIR`."""

from bulba.errors import run_cli
from bulba.tracking.tracker import _main

if __name__ == "__main__":
    run_cli(_main)
