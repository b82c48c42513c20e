"""Submitting a written script with ``sbatch``; SLURM's refusals are passed on verbatim.

Floor: sweep.slurm (standard library and sweep.slurm.request only).
"""

from __future__ import annotations

import os
import shutil
import subprocess

from sweep.slurm.request import SubmitError

SBATCH_TIMEOUT_SECONDS = 120.0  # sbatch answers in a second; a controller that does not is down


def find_sbatch() -> str:
    """The ``sbatch`` on the PATH, or :class:`SubmitError` saying where to run instead."""
    found = shutil.which("sbatch")
    if found is None:
        raise SubmitError("sbatch not found on the PATH: run `sweep submit` on a SLURM login node (or load its "
                          "module), or add --dry-run to write and print the script only")
    return found


def submit(script: str, sbatch: str | None = None) -> str:
    """Submit ``script``; its job id (an array job's id for an array). A partition, account
    or QOS that SLURM rejects, or a request it cannot meet, comes back in sbatch's words."""
    sbatch = sbatch or find_sbatch()
    try:
        done = subprocess.run([sbatch, "--parsable", script], capture_output=True, text=True,
                              timeout=SBATCH_TIMEOUT_SECONDS, cwd=os.path.dirname(script))
    except subprocess.TimeoutExpired:
        raise SubmitError(f"sbatch did not answer within {SBATCH_TIMEOUT_SECONDS:.0f} s: is slurmctld up "
                          "(`sinfo`)? Nothing was submitted") from None
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}")
        raise SubmitError(f"SLURM refused the job, nothing was submitted: {said}")
    # --parsable: "<job id>[;<cluster>]"
    return done.stdout.strip().splitlines()[-1].split(";")[0]
