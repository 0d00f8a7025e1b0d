"""Several `python -m mpicorr` command lines in one MPI job (one interpreter and torch start-up per rank).

    mpirun -n 2 python tests/many_runs.py ARGS_JSON      # a JSON list of argument lists
"""

import json
import sys

from mpicorr.__main__ import main

for argv in json.loads(sys.argv[1]):
    if main(argv) != 0:
        sys.exit(1)
