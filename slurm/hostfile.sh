#!/usr/bin/env bash
# Write an Open MPI hostfile for the current SLURM allocation (for mpirun users) and print its name.
#
#   slurm/hostfile.sh [FILE]          # default FILE: hostfile.$SLURM_JOB_ID
#   MPICORR_WEIGHTS="gpu01=2 gpu02=1" slurm/hostfile.sh   # add mpicorr weights for mixed GPUs
#
# One line per node of $SLURM_JOB_NODELIST (expanded with `scontrol show hostnames`), with
# slots = the tasks SLURM gives that node ($SLURM_TASKS_PER_NODE, e.g. "4(x2),2"). A weight is written as
# a '# weight=W' comment, which Open MPI ignores and mpicorr reads.
set -euo pipefail

: "${SLURM_JOB_NODELIST:?not inside a SLURM allocation (run from sbatch or salloc)}"
FILE=${1:-hostfile.${SLURM_JOB_ID:-local}}

# "4(x2),2" -> "4 4 2": tasks per node, in node-list order.
slots=()
IFS=, read -ra groups <<< "${SLURM_TASKS_PER_NODE:-1}"
for g in "${groups[@]}"; do
    n=${g%%(*}
    reps=1
    [[ $g == *"(x"* ]] && reps=${g##*(x} && reps=${reps%)}
    for ((i = 0; i < reps; i++)); do slots+=("$n"); done
done

declare -A weight=()
for kv in ${MPICORR_WEIGHTS:-}; do weight[${kv%%=*}]=${kv#*=}; done

tmp="$FILE.tmp.$$"
i=0
while read -r host; do
    line="$host slots=${slots[$i]:-${slots[-1]}}"
    [[ -n ${weight[$host]:-} ]] && line="$line  # weight=${weight[$host]}"
    echo "$line"
    i=$((i + 1))
done < <(scontrol show hostnames "$SLURM_JOB_NODELIST") > "$tmp"
mv "$tmp" "$FILE"
echo "$FILE"
