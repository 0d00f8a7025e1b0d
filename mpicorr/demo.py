"""`python -m mpicorr demo`: the whole pipeline offline on CPU, on a tiny model the project builds itself.

    python -m mpicorr demo --out mpicorr-demo
    mpirun -n 2 python -m mpicorr demo        # the same bytes with two ranks
"""

from __future__ import annotations

import os

from . import outputs, tiny
from .config import Config
from .dist import Comm
from .errors import UserError
from .run import run

DEMO_CTX = 64


def demo(out: str, comm: Comm, command: str, live: bool = False) -> None:
    """Build (once) a tiny Llama-family model in OUT/model and count its neurons on the sample text. It
    replaces an earlier demo's outputs in OUT, and refuses a folder holding another run's."""
    model_dir = os.path.join(out, "model")

    def build() -> None:
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            if outputs.present(out) or outputs.checkpoints(out):  # the demo runs with force: only over a demo
                raise UserError(f"--out {out}: holds a run that is not a demo (no demo model in {model_dir}); "
                                f"choose another folder for the demo")
            if os.path.lexists(model_dir):  # tiny.build would write over the files there
                raise UserError(f"--out {out}: {model_dir} exists and is not the demo's model; choose another "
                                f"folder for the demo")
            print(f"mpicorr demo: building a tiny random-weight model in {model_dir}", flush=True)
            tiny.build("llama", model_dir)

    comm.checked(build, root_only=True)
    cfg = Config(model=model_dir, data=tiny.sample_path(), out=out, ctx=DEMO_CTX, device="cpu",
                 force=True, command=command)
    run(cfg, comm, live)
    if comm.rank == 0:
        print(f"mpicorr demo: matrices in {out}/correlations_block_*.zstd, statistics in {out}/summary.h5")
