"""Command line of mpicorr.

    python -m mpicorr demo                                  # offline tour on a tiny model, CPU, seconds
    python -m mpicorr run --model DIR --data FILE --out DIR # one run (add mpirun for several ranks)
    mpirun -hostfile hostfile python -m mpicorr             # no arguments: options from ./mpicorr.toml

Every failure is one line on stderr; user errors exit with status 2 and end all ranks.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import threading
import traceback

from . import __version__
from .config import KERNELS, SITES, add_run_arguments, build_config, check_site
from .console import protect_stdout
from .errors import SharedError, Terminated, UserError

FILE_COMMANDS = ("info", "verify", "sum")  # read files only: no MPI, no torch (each takes a second or more to start)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line from rank 0 (every rank sees the same argv)."""

    def error(self, message: str):
        raise SharedError(f"{message} (see '{self.prog} --help')")


def parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommands."""
    p = Parser(prog="python -m mpicorr", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"mpicorr {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    add_run_arguments(sub.add_parser("run", help="count co-firing neurons (the default command)"))
    dry = sub.add_parser("plan", help="print the chunk count and the work split without loading a model")
    add_run_arguments(dry)
    dry.add_argument("-n", "--ranks", type=int, default=1, help="number of ranks to plan for (default: 1)")
    demo = sub.add_parser("demo", help="build a tiny model offline and run on it")
    demo.add_argument("--out", default="mpicorr-demo", help="folder for the demo model and outputs (default: mpicorr-demo)")
    demo.add_argument("--debug", action="store_true", help="print full tracebacks of unexpected errors")
    bench = sub.add_parser("bench", help="time a pair-count kernel on synthetic firing (checked exactly), print JSON")
    bench.add_argument("--neurons", type=int, default=14336, help="layer width N (default: 14336, Mistral-7B)")
    bench.add_argument("--tokens", type=int, default=512, help="tokens per layer (default: 512, one chunk)")
    bench.add_argument("--density", type=float, default=0.03, help="mean firing probability P (default: 0.03)")
    bench.add_argument("--profile", choices=("uniform", "powerlaw"), default="uniform",
                       help="uniform: every neuron fires with probability P; powerlaw: Zipf-like frequencies, mean P")
    bench.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    bench.add_argument("--layers", type=int, default=1, help="layers counted, each with the same firing (default: 1)")
    bench.add_argument("--kernel", choices=KERNELS, default="auto", help="kernel to time (default: auto)")
    bench.add_argument("--debug", action="store_true", help="print full tracebacks of unexpected errors")
    inspect = sub.add_parser("inspect", help="list the modules a run would record, and the model's linear layers")
    inspect.add_argument("--model", required=True, help="local model folder or Hugging Face hub id")
    inspect.add_argument("--site", default="ffn", choices=SITES, help="what a neuron is (as for run; default: ffn)")
    inspect.add_argument("--site-module", default=None, help="the regular expression a run would be given")
    inspect.add_argument("--debug", action="store_true", help="print full tracebacks of unexpected errors")
    info = sub.add_parser("info", help="print the header of matrix files, or of every matrix file of run folders")
    info.add_argument("files", nargs="+", metavar="FILE",
                      help="correlations_block_<L>.zstd files, or run folders (every matrix file in them)")
    verify = sub.add_parser("verify", help="check matrix files or run folders fully (sizes, checksums, counts)")
    verify.add_argument("files", nargs="+", metavar="FILE",
                        help="correlations_block_<L>.zstd files, or run folders (also checks summary.h5's SHA-256s)")
    total = sub.add_parser("sum", help="add matrix files of one block, or merge run folders or --dump folders")
    total.add_argument("out", metavar="OUT", help="the summed matrix file, or the merged run or dump folder, to write")
    total.add_argument("files", nargs="+", metavar="IN",
                       help="matrix files of one block and width, or run folders (or --dump folders) of disjoint "
                            "chunk ranges")
    total.add_argument("--force", action="store_true",
                       help="overwrite OUT if it exists (in a folder, only the outputs a run or a merge wrote)")
    return p


def file_command(args: argparse.Namespace, command: str) -> None:
    """info / verify / sum: no MPI, no model."""
    from . import filetools

    if args.cmd == "sum":
        filetools.check_sum_paths(args.out, args.files)  # also for --dump folders
        folders = [os.path.isdir(path) for path in args.files]
        if any(folders) and not all(folders):
            raise UserError("sum: give either matrix files or run folders, not both")
        dumps = [filetools.is_dump(path) for path in args.files]
        if any(dumps) and not all(dumps):
            raise UserError(f"sum: {args.files[dumps.index(True)]} is a --dump folder and "
                            f"{args.files[dumps.index(False)]} is not; merge run folders and dump folders apart")
        if all(folders) and any(dumps):
            from . import dump  # imports torch: only for dumps
            print(dump.sum_dumps(args.out, args.files, args.force, command))
            return
        print(filetools.sum_runs(args.out, args.files, args.force, command) if all(folders)
              else filetools.sum_files(args.out, args.files, args.force))
        return
    failed = []
    for path in args.files:
        try:
            if args.cmd == "info":
                print(filetools.info_run(path) if os.path.isdir(path) else filetools.info(path))
            else:
                print(filetools.verify_run(path) if os.path.isdir(path) else filetools.verify(path) or f"{path}: ok")
        except UserError as exc:
            failed.append(str(exc))
    if failed:
        raise UserError("; ".join(failed) if len(failed) == 1 else f"{len(failed)} files failed: " + "; ".join(failed))


def with_command(argv: list[str]) -> list[str]:
    """argv with the command named: `run` when none is given."""
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        return ["run", *argv]
    return argv


def precheck(argv: list[str]) -> None:
    """The checks a lone process makes before MPI and torch start: the arguments, and that --data and
    --model exist (a typo then costs a fraction of a second; rank 0 checks them again before loading)."""
    from . import inputs

    args = parser().parse_args(with_command(argv))
    if args.cmd in ("run", "plan"):
        inputs.check(build_config(args, "python -m mpicorr " + shlex.join(argv)))
    elif args.cmd == "inspect":
        check_site(args.site, args.site_module)
        inputs.model_folder(args.model)


def dispatch(argv: list[str], comm) -> None:
    """Parse argv and run the chosen command on this rank."""
    argv = with_command(argv)
    args = parser().parse_args(argv)
    command = "python -m mpicorr " + shlex.join(argv)
    if args.cmd in FILE_COMMANDS:
        file_command(args, command)
    elif args.cmd == "plan":
        from .preview import dry_plan
        cfg = shared_config(args, command, comm)
        from .plan import MAX_RANKS
        if not 1 <= args.ranks <= MAX_RANKS:
            raise SharedError(f"--ranks {args.ranks}: must be a whole number from 1 to {MAX_RANKS}")
        text = comm.checked(lambda: dry_plan(cfg, args.ranks), root_only=True)
        if comm.rank == 0:  # under mpirun: said once, not once per rank
            print(text)
    elif args.cmd == "inspect":
        text = comm.checked(lambda: inspect_text(args), root_only=True)
        if comm.rank == 0:
            print(text)
    elif args.cmd == "bench":
        from .bench import main as bench_main
        bench_main(args)
    elif args.cmd == "demo":
        from .demo import demo
        demo(args.out, comm, command, live_progress())
    else:
        from .run import run
        run(shared_config(args, command, comm), comm, live_progress())


def inspect_text(args: argparse.Namespace) -> str:
    """What inspect prints, after the checks a run makes of --site and --site-module (a bad expression is
    one line, exit 2, as for run)."""
    from .models import describe

    check_site(args.site, args.site_module)
    return describe(args.model, args.site_module, args.site)


def shared_config(args: argparse.Namespace, command: str, comm):
    """Rank 0's Config on every rank: only rank 0 reads the options, ./mpicorr.toml and the hostfile, so
    ranks started in other folders (mpirun --wdir, MPMD) or with other files cannot count with another
    configuration."""
    return comm.checked(lambda: build_config(args, command), root_only=True)


# Set by mpirun/srun (Open MPI, PMIx, MPICH/Intel MPI's hydra, MVAPICH, SLURM). Their launchers give ranks a
# pty, so isatty() alone would draw a live bar into log files.
LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK", "MPI_LOCALNRANKS",
                      "MV2_COMM_WORLD_SIZE", "SLURM_PROCID")


def launched() -> bool:
    """Whether an MPI launcher (mpirun, srun) started this process."""
    return any(v in os.environ for v in LAUNCHER_VARIABLES)


def launched_rank() -> int:
    """This process's rank as its launcher (mpirun, srun) numbered it, without starting MPI; 0 when none did."""
    for name in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def live_progress() -> bool:
    """A live progress bar only on a terminal of a process started directly (not by mpirun or srun)."""
    return sys.stdout.isatty() and not launched()


class Alone:
    """This process by itself, before or without MPI: what main's error handling asks of a Comm."""

    rank, size = 0, 1

    def abort(self, status: int) -> None:
        raise SystemExit(status)


def abort_on_thread_error(comm, debug: bool):
    """Make an exception in any other thread (rank 0's service thread under --schedule dynamic) end the job as
    one in the main thread does: one line, then MPI_Abort. Otherwise the thread dies alone and the other ranks
    wait for its answers forever. Returns the previous hook."""
    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        if debug:
            traceback.print_exception(args.exc_type, args.exc_value, args.exc_traceback)
        user = isinstance(args.exc_value, UserError)
        what = "" if user else f"{args.exc_type.__name__} in thread {args.thread.name if args.thread else '?'}: "
        print(f"mpicorr: error: {_tag(comm)}{what}{args.exc_value}" + ("" if user or debug else
              " (rerun with --debug for the traceback)"), file=sys.stderr, flush=True)
        try:
            comm.abort(2 if user else 1)  # MPI_Abort with several ranks; SystemExit (ignored in a thread) alone
        finally:
            os._exit(2 if user else 1)
    previous, threading.excepthook = threading.excepthook, hook
    return previous


def main(argv: list[str] | None = None) -> int:
    """Run the command line; errors become one line on stderr and end every rank."""
    argv = sys.argv[1:] if argv is None else argv
    protect_stdout()  # `mpicorr info RUN | head`: a reader that stops early ends nothing
    # Hub models come from the local cache only (`hf download` first): no rank waits on the network.
    os.environ["HF_HUB_OFFLINE"] = "1"
    comm, previous = Alone(), threading.excepthook
    try:
        if argv[:1] and argv[0] in FILE_COMMANDS and launched_rank() > 0:
            return 0  # `mpirun -n N ... sum`: the file commands, which never start MPI, run once (on rank 0)
        if not (argv[:1] and argv[0] in FILE_COMMANDS):  # the file commands never start MPI
            if not launched():
                precheck(argv)
            from .dist import world

            comm = world()
            previous = abort_on_thread_error(comm, "--debug" in argv)
        dispatch(argv, comm)
    except SharedError as exc:  # raised on every rank: rank 0 speaks, all exit cleanly
        if comm.rank == 0:
            print(f"mpicorr: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except UserError as exc:  # raised on this rank only: say so and end the others
        print(f"mpicorr: error: {_tag(comm)}{exc}", file=sys.stderr, flush=True)
        comm.abort(2)
    except Terminated as exc:  # SIGTERM while counting: this rank saved its checkpoint
        print(f"mpicorr: {_tag(comm)}{exc}", file=sys.stderr, flush=True)
        comm.abort(Terminated.exit_status)
    except KeyboardInterrupt:
        print(f"mpicorr: {_tag(comm)}interrupted; to go on, rerun the same command with --resume (it continues from "
              f"the checkpoints there are, or starts afresh)", file=sys.stderr, flush=True)
        comm.abort(130)
    except Exception as exc:  # a bug or an environment problem: one line, traceback on --debug
        if "--debug" in argv:
            traceback.print_exc()
        print(f"mpicorr: error: {_tag(comm)}{type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr, flush=True)
        comm.abort(1)
    finally:
        threading.excepthook = previous
    return 0


def _tag(comm) -> str:
    return f"rank {comm.rank} ({comm.host}): " if comm.size > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
