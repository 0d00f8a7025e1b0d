"""mpicorr: exact co-activation counts of LLM FFN neurons, computed with MPI.

Run ``python -m mpicorr demo`` for an offline tour, ``python -m mpicorr run --help`` for the options.
"""

__version__ = "0.1.0"

from . import cpus  # noqa: E402,F401 - first, before anything imports torch: records the CPUs the process started with
