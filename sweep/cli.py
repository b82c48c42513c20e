"""The ``sweep`` command: expand, run, resume, submit, status, query, compact, compare, findings, report.

Floor: sweep.cli, the top (may import everything). Heavy modules (pyarrow, torch, Ray)
are imported inside the commands that need them, so ``sweep --help`` and ``sweep expand``
start fast. It is longer than 400 lines on purpose: one thin function per command, each only
parsing its options and calling the module that does the work, read top to bottom as the
command list.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections import Counter
from typing import Any

import click

from sweep.core.errors import UserError
from sweep.core.grid import Grid, load_grid
from sweep.core.numerics import Kernels, Precision


def main() -> None:
    signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("interrupted: finished packs are stored; `sweep resume` continues", err=True)
        sys.exit(130)


def _sigterm_as_ctrl_c(signum: int, frame: Any) -> None:
    """SIGTERM (a SLURM time limit or preemption, ``kill``) stops a command as Ctrl-C does:
    through whatever handles Ctrl-C now (Ray Tune's, during a sweep: it stops the trials and
    returns; else Python's, which raises KeyboardInterrupt), even where SIGINT is ignored (a
    shell's background job)."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


class _Commands(click.Group):
    """Every command's :class:`UserError` (bad grid, option, store, dataset, query) becomes
    one line on stderr and exit status 1; other exceptions keep their traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Commands)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Grid sweeps of CNNs trained on imbalanced data (Buda et al.; Dablain et al.)."""
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")


def _existing_store(store_dir: str) -> None:
    """Commands that read a store refuse one that is not there: read as an empty store, a
    mistyped path would say "no sweep recorded" (or give empty results) and exit 0."""
    from sweep.store.results import ResultStore

    if not ResultStore(store_dir).exists():
        raise click.ClickException(f"results store {store_dir} not found (no such folder)")


@cli.command()
@click.argument("grid_file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object for scripts.")
@click.option("--max-networks", type=int, default=0, help="Networks per pack (default: grid's, else device's).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Device the packs are sized for (default: cuda if the grid asks for GPUs).")
@click.option("--gpu-memory-gb", type=float, default=None,
              help="GPU memory per GPU for sizing packs (default: this machine's GPU, else 16).")
def expand(grid_file: str, as_json: bool, max_networks: int, device: str | None,
           gpu_memory_gb: float | None) -> None:
    """Count what a grid file trains and evaluates, without training anything."""
    from sweep.core.plan import network_iterations, pack_sizer, plan_packs
    from sweep.core.sizes import estimate_store_bytes
    from sweep.prepare import pack_memory_bytes

    g = load_grid(grid_file)
    device = device or ("cuda" if g.gpu_per_pack > 0 else "cpu")
    if max_networks < 0 or (gpu_memory_gb is not None and gpu_memory_gb <= 0):
        raise click.ClickException("--max-networks must be >= 0 and --gpu-memory-gb > 0")
    gpus = (g.gpu_per_pack or 1.0) if device == "cuda" else 0.0
    sizer = pack_sizer(max_networks or g.max_networks_per_pack, device, pack_memory_bytes(gpus, gpu_memory_gb))
    packs = plan_packs(g.specs, sizer)
    sizes = {f"{s.dataset}/{s.model}": sizer(s) for s in g.specs}
    by_method = Counter(str(s.method) for s in g.specs)
    by_kind = Counter(str(s.imbalance.kind) for s in g.specs)
    evals = Counter(f"{s.method}+{e}" for s in g.specs for e in s.evaluations)
    info = {
        "grid": g.name,
        "trained_networks": g.trained_networks,
        "evaluations": g.evaluations,
        "packs": len(packs),
        "networks_per_pack": sizes,  # "dataset/model" -> networks per pack
        "training_sets": len({s.training_set_key for s in g.specs}),
        "by_method": dict(sorted(by_method.items())),
        "by_imbalance": dict(sorted(by_kind.items())),
        "evaluations_by_method": dict(sorted(evals.items())),
        "estimated_store_bytes": estimate_store_bytes(g.specs),
    }
    halved, full = network_iterations(g.specs)
    searches = sorted({s.lr_search for s in g.specs if s.lr_search is not None}, key=lambda x: str(x.to_dict()))
    info["network_iterations"] = {"with_lr_search": halved, "full_search": full}
    info["lr_search"] = [x.to_dict() for x in searches]
    if as_json:
        click.echo(json.dumps(info))
        return
    click.echo(f"grid {g.name}: {g.trained_networks:,} trained networks, {g.evaluations:,} evaluations, "
               f"{len(packs):,} packs of up to {_sizes_text(sizes)} networks ({device}), "
               f"{info['training_sets']:,} training sets")
    click.echo("by method:     " + ", ".join(f"{k} {v:,}" for k, v in info["by_method"].items()))
    click.echo("by imbalance:  " + ", ".join(f"{k} {v:,}" for k, v in info["by_imbalance"].items()))
    click.echo("evaluations:   " + ", ".join(f"{k} {v:,}" for k, v in info["evaluations_by_method"].items()))
    click.echo(f"store size:    about {_human(info['estimated_store_bytes'])}")
    for search in info["lr_search"]:
        click.echo(f"lr search:     {search['scheduler']} on {search['metric']}, rungs "
                   f"{', '.join(f'{r:,}' for r in search['rungs'])}, the best 1/{search['reduction']} go on")
    if searches:
        click.echo(f"training:      {halved:,} network-iterations with the lr search halved in packs "
                   f"({halved / full:.0%} of the full search's {full:,}; Tune's ASHA, for packs of one "
                   "network, may keep more)")


def _run_options(f: Any) -> Any:
    opts = [
        click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else embedded)."),
        click.option("--cpus-per-pack", type=float, default=None,
                     help="CPUs per pack, and torch threads per pack (default: grid's)."),
        click.option("--gpus-per-pack", type=float, default=None, help="GPUs per pack (default: grid's)."),
        click.option("--max-concurrent", type=int, default=0, help="Packs running at once (0: no limit)."),
        click.option("--max-networks", type=int, default=0, help="Networks per pack (0: grid's or device's)."),
        click.option("--gpu-memory-gb", type=float, default=None,
                     help="GPU memory per GPU for sizing packs (default: this machine's GPU, else 16)."),
        click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Where datasets are."),
        click.option("--device", default=None, help="Worker device: cpu, cuda, cuda:1 (default: by GPUs)."),
        click.option("--precision", type=click.Choice(Precision.values()), default=Precision.FP32.value),
        click.option("--kernels", type=click.Choice(Kernels.values()), default=Kernels.AUTO.value,
                     help="auto: LeNet-5 on CUDA in bf16 trains on the fused Triton kernels; grouped: never."),
        click.option("--retries", type=int, default=2, help="Retries of a failed pack."),
        click.option("--num-cpus", type=int, default=None, help="Embedded Ray: CPUs to use."),
        click.option("--ray-temp-dir", default=None, help="Embedded Ray: its temp folder."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@cli.command()
@click.argument("grid_file", type=click.Path(dir_okay=False))
@click.option("--store", "store_dir", required=True, help="Results store folder or URI.")
@_run_options
def run(grid_file: str, store_dir: str, **kw: Any) -> None:
    """Train and evaluate every network of GRID_FILE not yet in the store."""
    _launch([load_grid(grid_file)], store_dir, **kw)


@cli.command()
@click.argument("store_dir")
@click.option("--repair", is_flag=True, help="Move damaged files aside (to _damaged/) and train their networks again.")
@_run_options
def resume(store_dir: str, repair: bool, **kw: Any) -> None:
    """Continue every sweep recorded in a store: train exactly what is missing."""
    from sweep.store.results import ResultStore

    _existing_store(store_dir)
    store = ResultStore(store_dir)
    if repair:
        _refuse_read_only(store)  # before verify: nothing may move on a store that cannot be written
        damage = store.verify()
        try:
            moved = store.quarantine(damage)
        except OSError as e:  # a folder that became unwritable after the check
            raise click.ClickException(f"repair: cannot move the damaged files of {store_dir}: "
                                       f"{' '.join(str(e).split())}; `sweep verify {store_dir}` lists what is "
                                       "still damaged") from None
        nets = len({n for d in damage for n in d.network_ids})
        click.echo(f"repair: {len(damage)} damaged file(s); {moved} files of their pack writes moved to "
                   f"{store_dir}/_damaged; {nets} networks will be trained again" if damage
                   else "repair: no damaged file")
    grids = store.saved_grids()
    if not grids:
        raise click.ClickException(f"{store_dir}: no sweep recorded in this store (start one with `sweep run`)")
    _launch(grids, store_dir, **kw)


def _refuse_read_only(store: Any) -> None:
    """``--repair`` moves files between the store's folders: refuse, with one line and before
    anything moves, a store where that cannot be done (a read-only mount, no permission)."""
    from sweep.store.schema import StoreError

    try:
        store.check_writable()  # a probe file in the root (any filesystem)
    except StoreError as e:
        raise click.ClickException(f"repair refused, nothing was moved: {e}") from None
    if not store.is_local:
        return
    blocked = []
    for folder, subdirs, _ in os.walk(store.base_path):
        subdirs[:] = [d for d in subdirs if d != "_ray"]  # Ray Tune's own; repair never moves it
        if not _folder_writable(folder):
            blocked.append(folder)
    if blocked:
        more = f" and {len(blocked) - 1} more folder(s)" if len(blocked) > 1 else ""
        raise click.ClickException(f"repair refused, nothing was moved: results store {store.root} is read-only "
                                   f"({blocked[0]}{more} cannot be written)")


def _folder_writable(folder: str) -> bool:
    """Files can be created in and renamed out of ``folder`` (permissions, read-only mounts)."""
    try:
        return os.access(folder, os.W_OK | os.X_OK) and not os.statvfs(folder).f_flag & os.ST_RDONLY
    except OSError:
        return False


def _launch(grids: list[Grid], store_dir: str, quiet: bool, **kw: Any) -> None:
    from sweep.driver import run_sweep
    from sweep.prepare import RunOptions

    options = RunOptions(**kw)
    for g in grids:
        bar = None

        def progress(done: float, total: int, doing: str) -> None:
            nonlocal bar
            if quiet:
                return
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(total=total, initial=done, unit="net", desc=g.name, dynamic_ncols=True)
            bar.n = round(done, 1)  # in-flight packs count pro rata
            # What the running packs do ("2 training, 1 latent statistics"): a bar that stands
            # still while data load or latent statistics run still says why. ``done`` counts
            # running packs by their expected work, every phase weighed (workers.pack_work),
            # so the time left counts evaluation, latent statistics and the write too.
            bar.set_postfix_str(f"packs: {doing}" if doing else "", refresh=False)
            bar.refresh()

        try:
            summary = run_sweep(g, store_dir, options, progress)
        finally:
            if bar is not None:
                bar.close()
        click.echo(f"{g.name}: {summary.trained} networks trained in {summary.packs} packs "
                   f"({summary.already_done} already stored, {summary.failed} failed"
                   + (f", {summary.skipped} being trained by another runner" if summary.skipped else "")
                   + ") in "
                   f"{summary.seconds:.0f} s; results in {store_dir}")
        if summary.not_finished:
            stopped = click.ClickException(f"interrupted: {summary.not_finished} networks of this run are not "
                                           f"stored; `sweep resume {store_dir}` continues")
            stopped.exit_code = 130  # as Ctrl-C elsewhere (main, sweep.local): a job script requeues on it
            raise stopped
        if summary.failed:
            raise click.ClickException(f"{summary.failed} networks failed: see `sweep status {store_dir}`; "
                                       f"`sweep resume {store_dir}` retries them")


@cli.command()
@click.argument("grid_file", type=click.Path(dir_okay=False, exists=True))
@click.option("--store", "store_dir", required=True, help="Results store folder, on a path every node mounts.")
@click.option("--slurm", is_flag=True, help="Submit to SLURM with sbatch (the one scheduler supported).")
@click.option("--nodes", type=int, default=1, show_default=True, help="Multi-node mode: nodes of one Ray cluster.")
@click.option("--gpus-per-node", type=int, default=None, help="Default: 1 if the grid's packs ask for a GPU, else 0.")
@click.option("--cpus-per-task", type=int, default=None, help="Default: what the packs of one node need.")
@click.option("--time", default=None, help="Time limit, SLURM's format (HH:MM:SS, D-HH:MM:SS, ...).")
@click.option("--partition", default=None, help="SLURM partition (sbatch --partition).")
@click.option("--account", default=None, help="SLURM account to charge (sbatch --account).")
@click.option("--qos", default=None, help="SLURM quality of service (sbatch --qos).")
@click.option("--array", type=int, default=0, help="Array mode: K tasks, each `python -m sweep.local` (no Ray).")
@click.option("--sbatch-arg", "sbatch_args", multiple=True, help="Another sbatch option, e.g. --sbatch-arg=--mem=16G.")
@click.option("--signal", default="B:TERM@120", show_default=True,
              help="SIGTERM to the batch shell this many seconds before the time limit: checkpoint and stop.")
@click.option("--requeue", is_flag=True, help="Requeue the job after that signal; it resumes the same store.")
@click.option("--venv", default=None, help="Virtualenv the job activates (default: this one).")
@click.option("--module", "modules", multiple=True, help="`module load NAME` in the job (repeatable).")
@click.option("--setup", multiple=True, help="A shell line the job runs first (repeatable).")
@click.option("--job-name", default=None, help="Default: sweep-GRIDNAME.")
@click.option("--data-dir", default=None, help="Where datasets are, on a path every node mounts.")
@click.option("--precision", type=click.Choice(Precision.values()), default=Precision.FP32.value)
@click.option("--kernels", type=click.Choice(Kernels.values()), default=Kernels.AUTO.value)
@click.option("--max-networks", type=int, default=0, help="Networks per pack (0: grid's or device's).")
@click.option("--gpu-memory-gb", type=float, default=None, help="GPU memory per GPU, for sizing packs.")
@click.option("--force", is_flag=True, help="Accept a store on node-local storage (/tmp) for several nodes or tasks.")
@click.option("--dry-run", is_flag=True, help="Write the script under DIR/_slurm and print it; submit nothing.")
@click.pass_context
def submit(ctx: click.Context, grid_file: str, store_dir: str, slurm: bool, dry_run: bool, **kw: Any) -> None:
    """Submit a sweep to a cluster scheduler: an sbatch script under DIR/_slurm (docs/cluster.md)."""
    from sweep.slurm.request import SubmitOptions, resolve_job
    from sweep.slurm.sbatch import find_sbatch, submit as sbatch_submit
    from sweep.slurm.script import grid_copy_path, render_script, script_path

    if not slurm:
        raise click.ClickException("sweep submit needs a scheduler: --slurm (the one supported; on a plain Ray "
                                   "cluster use `sweep run --address`, see docs/cluster.md)")
    sbatch = None if dry_run else find_sbatch()  # before anything is written
    grid = load_grid(grid_file)
    options = SubmitOptions(**{**kw, "sbatch_args": tuple(kw["sbatch_args"]), "modules": tuple(kw["modules"]),
                               "setup": tuple(kw["setup"])})
    job = resolve_job(grid, store_dir, options)
    if job.packs == 0:
        click.echo(f"every network of grid {grid.name} is in {store_dir}: nothing to submit")
        return
    text = render_script(job, _command_line(ctx, grid_file, store_dir, dry_run))
    os.makedirs(os.path.dirname(script_path(job)), exist_ok=True)
    with open(grid_file, "rb") as src, open(grid_copy_path(job), "wb") as dst:
        dst.write(src.read())
    with open(script_path(job), "w") as fh:
        fh.write(text)
    if dry_run:
        click.echo(text, nl=False)
        click.echo(f"# (dry run: written to {script_path(job)}, not submitted)", err=True)
        return
    job_id = sbatch_submit(script_path(job), sbatch)
    click.echo(f"submitted job {job_id} ({job.mode} mode, {job.packs} packs of grid {grid.name}): "
               f"{script_path(job)}")
    click.echo(f"follow it: squeue -j {job_id}; sweep status {store_dir}; logs in {os.path.dirname(script_path(job))}")


def _command_line(ctx: click.Context, grid_file: str, store_dir: str, dry_run: bool) -> str:
    """The ``sweep submit`` call, from its values (written into the script's header)."""
    import shlex

    parts = ["sweep", "submit", grid_file, "--store", store_dir, "--slurm"]
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if p.name in ("grid_file", "store_dir", "slurm", "dry_run") or value in (None, (), False) \
                or value == p.default:
            continue
        flag = p.opts[0]
        for v in value if isinstance(value, tuple) else (value,):
            parts += [flag] if v is True else [f"{flag}={v}"]
    return " ".join(shlex.quote(x) for x in parts) + (" --dry-run" if dry_run else "")


@cli.command()
@click.argument("store_dir")
@click.option("--json", "as_json", is_flag=True, help="One JSON object for scripts.")
def status(store_dir: str, as_json: bool) -> None:
    """Done / failed / pending networks by grid and method, errors, throughput, time left."""
    from sweep.store.status import format_status, store_status, to_json

    _existing_store(store_dir)
    info = store_status(store_dir)
    click.echo(to_json(info) if as_json else format_status(info))


@cli.command()
@click.argument("store_dir")
@click.option("--json", "as_json", is_flag=True, help="One JSON object for scripts.")
@click.option("--clean", is_flag=True, help="Remove the files no commit names (but what a live writer writes).")
@click.option("--adopt", is_flag=True, help="Record checksums of a store written before manifests, once.")
def verify(store_dir: str, as_json: bool, clean: bool, adopt: bool) -> None:
    """Check every committed file against the checksum recorded when it was written, and
    list the files that no commit names (they are never read)."""
    from sweep.store.integrity import summarize_damage
    from sweep.store.results import ResultStore

    _existing_store(store_dir)
    store = ResultStore(store_dir)
    notes = []
    if adopt:
        adopted, refused = store.adopt()
        notes.append(f"adopted {adopted} pack write(s) stored before manifests"
                     + (f"; {len(refused)} unreadable file(s) not adopted" if refused else ""))
    if clean:
        notes.append(f"removed {store.cleanup_uncommitted()} file(s) that no commit names")
    damage = store.verify()
    leftovers = store.leftovers()
    if as_json:
        click.echo(json.dumps({**summarize_damage(damage),
                               "uncommitted_files": [{"path": f.path, "what": f.what, "writer": f.fate}
                                                     for f in leftovers]}))
    else:
        for note in notes:
            click.echo(note)
        for d in damage:
            click.echo(d.describe())
            if d.network_ids:
                click.echo("  networks: " + ", ".join(d.network_ids))
        for f in leftovers:
            click.echo(f"{f.path}: not committed ({f.what}{'; its writer is alive' if f.fate == 'live' else ''})")
        ok = "every committed file is as written" if not damage else (
            f"`sweep resume {store_dir} --repair` moves their pack writes aside and trains their networks again")
        click.echo(f"{store_dir}: {len(damage)} damaged file(s), {len(leftovers)} file(s) no commit names "
                   f"(never read{'; `sweep verify --clean` removes them' if leftovers else ''}); {ok}")
    if damage or leftovers:
        sys.exit(1)


@cli.command()
@click.argument("store_dir")
@click.argument("out_dir")
@click.option("--tables", default=None, help="Comma-separated tables to keep (default: all; trials always).")
@click.option("--drop-columns", default="", help="Comma-separated columns to leave out, e.g. spec_json.")
def compact(store_dir: str, out_dir: str, tables: str | None, drop_columns: str) -> None:
    """Rewrite a store's committed rows as one file per table and grid in a new store."""
    from sweep.store.compact import compact_store

    _existing_store(store_dir)
    names = [t for t in tables.split(",") if t] if tables else None
    rows = compact_store(store_dir, out_dir, names, [c for c in drop_columns.split(",") if c])
    click.echo(f"compacted {store_dir} into {out_dir}: " + ", ".join(f"{t} {n:,} rows" for t, n in rows.items()))


@cli.command()
@click.argument("store_dir")
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0), default=300.0, show_default=True,
              metavar="SECONDS",
              help="Stop the query after this many seconds (0: no limit). Ctrl-C also stops it.")
@click.option("--limit", type=click.IntRange(min=0), default=None, metavar="N",
              help="Write at most N rows (default: all, streamed in batches).")
def query(store_dir: str, sql: str, fmt: str, timeout_s: float, limit: int | None) -> None:
    """Run SQL over the store's tables (trials, class_metrics, curves, ...).

    The query reads and writes no file: whatever the SQL, the store is unchanged."""
    from sweep.store.query import QueryStopped, write_query

    _existing_store(store_dir)
    try:
        written = write_query(store_dir, sql, sys.stdout, fmt, timeout_s=timeout_s, limit=limit)  # type: ignore[arg-type]
    except QueryStopped as e:
        stopped = click.ClickException(str(e))
        stopped.exit_code = 130 if e.interrupted else 1  # 130: the shell's code for Ctrl-C
        raise stopped from None
    except KeyboardInterrupt:  # before the query started (opening the store): nothing ran
        stopped = click.ClickException(f"query against results store {store_dir} interrupted (Ctrl-C) "
                                       "before it started; the store is unchanged")
        stopped.exit_code = 130
        raise stopped from None
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as other command-line tools do.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout at exit
        return
    if limit is not None and written.limit_reached:
        click.echo(f"(--limit {limit}: rows after the first {limit:,} were not read)", err=True)


@cli.command()
@click.argument("store_dir")
@click.option("--metric", default="roc_auc", show_default=True,
              help="roc_auc, accuracy, balanced_accuracy, macro_f1 or g_mean.")
@click.option("--by", default="rho,mu", show_default=True, help="Comma-separated cell columns to group by.")
@click.option("--reference", default=None, help="The arm others are compared with (default: baseline).")
@click.option("--arms", default=None, help="Comma-separated arms to compare (default: all).")
@click.option("--ranking", is_flag=True, help="Average ranks, Friedman test and Nemenyi CD instead.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
def compare(store_dir: str, metric: str, by: str, reference: str | None, arms: str | None, ranking: bool,
            fmt: str) -> None:
    """Paired tests of every method against a reference, with Holm and BH adjusted p-values.

    For roc_auc thresholded arms are left out: thresholding leaves ROC AUC unchanged."""
    from analysis.compare import RAW_ONLY, REFERENCE, paired_tests, ranking as rank_arms, trials_for
    from sweep.store.query import format_result

    _existing_store(store_dir)
    trials = trials_for(store_dir, metric)
    raw_only = (f"; thresholded arms left out: thresholding leaves {metric} unchanged"
                if metric in RAW_ONLY else "")
    chosen = [a for a in (arms or "").split(",") if a] or None
    if ranking:
        r = rank_arms(trials, metric, chosen)
        click.echo(format_result(r.ranks, fmt))
        if fmt == "table":
            click.echo(f"Friedman chi2 = {r.statistic:.3f}, p = {r.p_value:.3g} over {r.blocks} cells; "
                       f"Nemenyi critical difference {r.critical_difference:.3f} (alpha {r.alpha:g}){raw_only}")
        return
    table = paired_tests(trials, metric, [c for c in by.split(",") if c], reference or REFERENCE, chosen)
    click.echo(format_result(table, fmt))
    if fmt == "table":
        click.echo("pairs: the same training set (cell and repeat); p: Wilcoxon signed-rank (exact for small "
                   "n) and paired t, adjusted over all rows (Holm; Benjamini-Hochberg); median CI: bootstrap 95 %"
                   + raw_only)


@cli.command()
@click.argument("store_dirs", nargs=-1, required=True, metavar="STORE [STORE...]")
@click.option("--paper", default="buda", show_default=True, help="Whose findings: buda.")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "json"]), default="table")
@click.option("--dataset", default=None, help="The dataset to test (default: the store's only one).")
@click.option("--pool-numerics", is_flag=True, help="Pool rows computed in different precisions or kernels.")
@click.option("--into", "into", default=None, type=click.Path(dir_okay=False),
              help="Write the markdown table into this file, between its 'sweep findings' markers.")
def findings(store_dirs: tuple[str, ...], paper: str, fmt: str, dataset: str | None, pool_numerics: bool,
             into: str | None) -> None:
    """Each finding of the paper as a hypothesis: its test on the store and its verdict.

    Several stores are read as one: each network's rows from the first that holds it (a store
    of learning curves for another store's networks, say)."""
    from analysis.findings import evaluate_store, render, write_into

    for store_dir in store_dirs:
        _existing_store(store_dir)
    outcomes = evaluate_store(store_dirs, paper, dataset, pool_numerics)
    if into:
        write_into(into, render(outcomes, "markdown"))
        click.echo(f"wrote the verdicts of {len(outcomes)} findings into {into}")
        return
    click.echo(render(outcomes, fmt))


@cli.command()
@click.argument("store_dir")
@click.option("-o", "--output", "out_path", default="report.html", show_default=True, help="HTML file to write.")
@click.option("--dataset", default=None, help="Only this dataset.")
@click.option("--model", default=None, help="Only this model.")
@click.option("--grid", default=None, help="Only this grid.")
def report(store_dir: str, out_path: str, dataset: str | None, model: str | None, grid: str | None) -> None:
    """Write the papers' figures from the store to one offline HTML file."""
    from analysis.report import write_report

    _existing_store(store_dir)
    summary = write_report(store_dir, out_path, dataset=dataset, model=model, grid=grid)
    click.echo(f"wrote {summary.out_path}: {summary.networks:,} networks, {len(summary.figures)} figures "
               f"({len(summary.skipped)} skipped for lack of data) in {summary.seconds:.1f} s")


def _sizes_text(sizes: dict[str, int]) -> str:
    if len(set(sizes.values())) == 1:
        return str(next(iter(sizes.values())))
    return ", ".join(f"{v} ({k})" for k, v in sizes.items())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.0f} PB"


if __name__ == "__main__":  # pragma: no cover
    main()
