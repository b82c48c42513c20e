"""Launching a sweep on a SLURM cluster: ``sweep submit GRID --store DIR --slurm``.

Floor: sweep.slurm, a launcher beside the runners (imports sweep.prepare and the floors
below; never sweep.driver or sweep.local, whose commands it writes into a script, and
never Ray). ``request`` turns the command's options into a checked :class:`SlurmJob`
(every option applied or refused by name), ``script`` writes the job's sbatch script,
``sbatch`` submits it and reports SLURM's own refusals verbatim. docs/cluster.md says how
the two modes (one multi-node Ray cluster, or a job array of local runners) behave.
"""
