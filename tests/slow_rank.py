"""`python -m mpicorr` with one rank slowed down after every batch, for the scheduling tests.

    mpirun -n 3 python tests/slow_rank.py 1 0.2 run --model M --data D --schedule dynamic
"""

import sys
import time

from mpi4py import MPI

from mpicorr import run
from mpicorr.__main__ import main

RANK, DELAY = int(sys.argv[1]), float(sys.argv[2])
after_batch = run.Saver.after_batch


def slow_after_batch(self, tally, chunks):
    if MPI.COMM_WORLD.Get_rank() == RANK:
        time.sleep(DELAY)
    after_batch(self, tally, chunks)


run.Saver.after_batch = slow_after_batch
sys.exit(main(sys.argv[3:]))
