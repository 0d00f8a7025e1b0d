"""mpicorr: exact co-activation counts of LLM FFN neurons, computed with MPI.

Run ``python -m mpicorr demo`` for an offline tour, ``python -m mpicorr run --help`` for the options.
"""

__version__ = "0.1.0"
