#!/usr/bin/env bash
# Start `python -m mpicorr run ARGS...` on every task of the current SLURM allocation (used by the
# .sbatch scripts; usable inside salloc too).
#
#   slurm/launch.sh --model M --data D --out runs/x
#
# MPICORR_LAUNCH=srun (default) launches with `srun --mpi=$MPICORR_SRUN_MPI` (default pmix; ask your site
# which plugin its MPI needs); MPICORR_LAUNCH=mpirun writes a hostfile from the allocation
# (slurm/hostfile.sh) and uses mpirun. MPICORR_PYTHON chooses the interpreter (default python3).
# Each rank takes the GPU of its local rank; with srun, --gpus-per-task=1 binds one GPU per task instead.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${MPICORR_PYTHON:-python3}

if [ "${MPICORR_LAUNCH:-srun}" = mpirun ]; then
    HOSTFILE=$("$HERE/hostfile.sh" "hostfile.${SLURM_JOB_ID:-local}${SLURM_ARRAY_TASK_ID:+.$SLURM_ARRAY_TASK_ID}")
    exec mpirun -np "${SLURM_NTASKS:-1}" -hostfile "$HOSTFILE" "$PY" -m mpicorr run --hostfile "$HOSTFILE" "$@"
fi
exec srun --mpi="${MPICORR_SRUN_MPI:-pmix}" "$PY" -m mpicorr run "$@"
