"""The sbatch script of a :class:`~sweep.slurm.request.SlurmJob`, as text.

Floor: sweep.slurm (standard library and sweep.slurm.request only).

The script is meant to be read: ``#SBATCH`` lines first, then the environment written out
(modules, virtualenv, setup commands, ``SWEEP_*`` variables: the job does not depend on the
shell that submitted it), then the mode's body, then one tail shared by both modes:

* **multi-node**: Ray's documented head/worker pattern (``ray start --head`` on the first
  node, ``ray start --address`` on the others, each through ``srun``, every port derived
  from the job id so that two jobs sharing a node do not collide), then ``sweep run`` on the
  head with ``--address``. Not ``ray symmetric-run``: it would start the sweep under
  ``srun`` and Ray, where the batch shell's time-limit signal is not forwarded as documented;
  here ``sweep run`` is the batch shell's own child.
* **array**: each task runs ``python -m sweep.local`` on the same store; the store's leases
  keep two tasks off the same pack.
* **the tail**: SLURM sends SIGTERM to the batch shell before the time limit (``--signal
  B:TERM@S``); the shell forwards it to the runner, which checkpoints its running pack and
  stops as on Ctrl-C (exit 130); with ``--requeue`` the shell then requeues the job (if SLURM
  still has it RUNNING: not after ``scancel``, which sends SIGTERM too), and the restarted
  script trains only what the store lacks, long packs from their checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import os
import shlex

from sweep.slurm.request import Mode, SlurmJob

INTERRUPTED_EXIT = 130  # both runners' exit status after Ctrl-C or SIGTERM (sweep.local, sweep.cli)
PORT_BASE, PORT_SLOTS, PORTS_PER_JOB = 20000, 400, 100  # Ray's ports: 20000 + (job id % 400) * 100 + k


def grid_copy_path(job: SlurmJob) -> str:
    """The job's own copy of the grid, in the store: editing the grid file after submitting
    changes nothing of a queued or requeued job."""
    return os.path.join(job.store, "_slurm", f"{job.job_name}.yaml")


def script_path(job: SlurmJob) -> str:
    return os.path.join(job.store, "_slurm", f"{job.job_name}.sbatch")


def log_pattern(job: SlurmJob) -> str:
    name = f"{job.job_name}-%A_%a.out" if job.mode == Mode.ARRAY else f"{job.job_name}-%j.out"
    return os.path.join(job.store, "_slurm", name)


def render_script(job: SlurmJob, command_line: str, now: _dt.datetime | None = None) -> str:
    """The whole script; ``command_line`` is the ``sweep submit`` call that wrote it."""
    when = (now or _dt.datetime.now(_dt.timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    head = [
        "#!/bin/bash",
        f"# Written by `sweep submit` on {when}: grid {job.grid_name}, {job.mode} mode, store {job.store}",
        f"#   {command_line}",
        f"# Submit it again with `sbatch {script_path(job)}`; follow it with `squeue --me`,",
        f"# `sweep status {job.store}` and the log {log_pattern(job)}.",
        *sbatch_lines(job),
        "",
        "set -uo pipefail",
        "",
        *environment_lines(job),
        "",
        f"GRID={shlex.quote(grid_copy_path(job))}",
        f"STORE={shlex.quote(job.store)}",
        "",
    ]
    body = multi_node_body(job) if job.mode == Mode.MULTI_NODE else array_body(job)
    return "\n".join(head + body + tail(job)) + "\n"


def sbatch_lines(job: SlurmJob) -> list[str]:
    lines = [f"--job-name={job.job_name}", f"--output={log_pattern(job)}",
             "--open-mode=append",  # a requeued job adds to its log instead of replacing it
             f"--nodes={job.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={job.cpus_per_task}"]
    if job.gpus_per_node:
        lines.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.mode == Mode.ARRAY:
        lines.append(f"--array=0-{job.tasks - 1}")
    for flag, value in (("time", job.time), ("partition", job.partition), ("account", job.account),
                        ("qos", job.qos)):
        if value is not None:
            lines.append(f"--{flag}={value}")
    lines.append(f"--signal={job.signal}")  # before the time limit: checkpoint and stop (see the tail)
    lines.append("--requeue" if job.requeue else "--no-requeue")
    lines.extend(job.sbatch_args)
    return [f"#SBATCH {line}" for line in lines]


def environment_lines(job: SlurmJob) -> list[str]:
    lines = ["# The environment, written out: the job does not depend on the shell that submitted it."]
    lines += [f"module load {shlex.quote(m)}" for m in job.modules]
    if job.venv is not None:
        lines.append(f"source {shlex.quote(os.path.join(job.venv, 'bin', 'activate'))}")
    lines += list(job.setup)
    # The code that wrote this script is the code the job runs.
    lines.append(f"export PYTHONPATH={shlex.quote(job.code_root)}${{PYTHONPATH:+:$PYTHONPATH}}")
    lines.append("export PYTHONUNBUFFERED=1  # log lines reach the log file as they are written")
    lines += [f"export {k}={shlex.quote(v)}" for k, v in job.environment]
    lines.append(f"cd {shlex.quote(job.code_root)}")
    return lines


def _runner_args(job: SlurmJob) -> str:
    return " ".join(shlex.quote(a) for a in job.runner_args)


def array_body(job: SlurmJob) -> list[str]:
    return [
        "# Array mode: every task trains the packs the store lacks, one after another; the store's",
        "# leases keep two tasks off the same pack, and a pack stored by one task is skipped by the others.",
        'echo "sweep: task ${SLURM_ARRAY_TASK_ID:-0} of job ${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID} on $(hostname),'
        ' restart ${SLURM_RESTART_COUNT:-0}"',
        f'{shlex.quote(job.python)} -m sweep.local "$GRID" --store "$STORE" {_runner_args(job)} &',
        "runner=$!",
    ]


def multi_node_body(job: SlurmJob) -> list[str]:
    ray = "ray" if job.venv is not None else shlex.quote(os.path.join(os.path.dirname(job.python), "ray"))
    gpus = job.gpus_per_node
    step_gpus = f" --gpus-per-node={gpus}" if gpus else ""
    return [
        "# Multi-node mode: Ray on every node of the allocation (Ray's head/worker pattern through srun),",
        "# then `sweep run` on the head. Ray's ports come from the job id: two jobs on one node do not collide.",
        'nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))',
        'head_ip=$(hostname --ip-address | awk \'{print $1}\')  # the batch shell runs on the first node',
        "# /etc/hosts may name the node 127.0.1.1, which other nodes cannot reach: then its first other address",
        'case "$head_ip" in 127.*) [ "${#nodes[@]}" -gt 1 ] && head_ip=$(hostname -I | awk \'{print $1}\') ;; esac',
        f"port=$(({PORT_BASE} + (SLURM_JOB_ID % {PORT_SLOTS}) * {PORTS_PER_JOB}))",
        'address="$head_ip:$port"',
        "ray_ports=(--node-manager-port=$((port + 1)) --object-manager-port=$((port + 2))",
        "           --dashboard-agent-listen-port=$((port + 4)) --dashboard-agent-grpc-port=$((port + 5))",
        "           --metrics-export-port=$((port + 6)) --runtime-env-agent-port=$((port + 7))",
        f"           --min-worker-port=$((port + 10)) --max-worker-port=$((port + {PORTS_PER_JOB - 1})))",
        *(["ray_ports+=(--ray-client-server-port=$((port + 3)))"] if job.ray_client else []),
        f'ray_node=(--num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus={gpus} --disable-usage-stats --block)',
        'echo "sweep: job $SLURM_JOB_ID on ${#nodes[@]} node(s), Ray at $address, restart ${SLURM_RESTART_COUNT:-0}"',
        "# Each Ray node is one srun step holding its node's CPUs and GPUs (srun is told: it does not",
        "# take --cpus-per-task from the job in every SLURM release).",
        f'step=(srun --nodes=1 --ntasks=1 --cpus-per-task="$SLURM_CPUS_PER_TASK"{step_gpus})',
        f'"${{step[@]}}" -w "${{nodes[0]}}" {ray} start --head --node-ip-address="$head_ip" --port="$port" \\',
        '    --temp-dir="/tmp/ray-$SLURM_JOB_ID" --include-dashboard=false "${ray_ports[@]}" "${ray_node[@]}" &',
        "ray_steps=($!)",
        'for node in "${nodes[@]:1}"; do',
        f'  "${{step[@]}}" -w "$node" {ray} start --address="$address" "${{ray_ports[@]}}" "${{ray_node[@]}}" &',
        "  ray_steps+=($!)",
        "done",
        "for _ in $(seq 1 90); do  # the head answers within seconds; give a slow node three minutes",
        f'  {ray} status --address="$address" >/dev/null 2>&1 && break',
        '  kill -0 "${ray_steps[0]}" 2>/dev/null || { echo "sweep: Ray\'s head did not start (above)"; exit 1; }',
        "  sleep 2",
        "done",
        f'{shlex.quote(job.python)} -m sweep.cli run "$GRID" --store "$STORE" --address "$address" -q '
        f"{_runner_args(job)} &",
        "runner=$!",
    ]


def tail(job: SlurmJob) -> list[str]:
    lines = [
        "# SIGTERM (the time limit's --signal, a preemption, `scancel --signal=TERM --batch`): the runner",
        "# checkpoints its running pack and stops as on Ctrl-C, exit status 130.",
        "trap 'echo \"sweep: SIGTERM: the runner checkpoints its pack and stops\"; kill -TERM \"$runner\" "
        "2>/dev/null' TERM",
        'wait "$runner"',
        'while kill -0 "$runner" 2>/dev/null; do wait "$runner"; done  # woken by the trap: still stopping',
        'wait "$runner"; status=$?  # the runner\'s own exit status',
    ]
    if job.mode == Mode.MULTI_NODE:
        lines += [
            'kill "${ray_steps[@]}" 2>/dev/null; wait "${ray_steps[@]}" 2>/dev/null  # stops Ray on every node',
            'rm -rf "/tmp/ray-$SLURM_JOB_ID"',
        ]
    if job.requeue:
        # An array task requeues itself alone: one task's SLURM_JOB_ID may be the array's own
        # id, and requeueing that would requeue (and stop) every task of the array. Only a job
        # still RUNNING is requeued: `scancel` sends SIGTERM too, and its job is COMPLETING
        # (cancelled) by then; a preempted one is requeued by SLURM itself.
        me = '"${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' if job.mode == Mode.ARRAY else '"$SLURM_JOB_ID"'
        lines += [
            f'if [ "$status" -eq {INTERRUPTED_EXIT} ]; then',
            f"  state=$(scontrol show job {me} 2>/dev/null | grep -o 'JobState=[A-Z_]*')",
            '  if [ "$state" = JobState=RUNNING ]; then',
            f'    echo "sweep: stopped before the time limit; requeueing job {me[1:-1]}: it resumes the same store"',
            f"    scontrol requeue {me} && exit 0",
            "  else",
            '    echo "sweep: stopped; not requeued (${state:-no job state}: cancelled or preempted)"',
            "  fi",
            "fi",
        ]
    lines.append('exit "$status"')
    return lines
