"""`compress`: the command line. Each command parses its options, calls the library, and prints the result.

stdout carries one JSON object per command (machine-readable); logs and progress go to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import click

from compressor import __version__, api
from compressor.cold import EVAL_USERS
from compressor.config import check_distill, reference_markdown
from compressor.distributed import launch_rank, launched_world_size
from compressor.evaluation import report as evaluation_report
from compressor.objectives import KD_USERS_MODES, METHOD_NAMES
from compressor.run_dir import CONFIG_FILE, LOG_FILE
from export.bundle import QUANTIZATIONS
from export.from_checkpoint import export_checkpoint
from serving.bundle import BundleError, verify_bundle
from serving.config import FALLBACKS

from . import options
from .errors import one_line, user_errors
from .logs import setup_logging, setup_pipeline_logging
from .pipeline.options import PipelineOptions
from .pipeline.run import run_pipeline
from .follow import serve_following
from .recommend import recommend_command
from .launch import run_under_torchrun, strip_launch_options
from .sources import MODELS_PREFIX, resolve_checkpoint, resolve_registered_bundle
from .tracking import MlflowTracker, TrackingError
from .tracking import promote as promote_version

DEFAULT_PIPELINE_CONFIGS = {"teacher": "configs/citeulike/mf-teacher.yaml",
                            "student": "configs/citeulike/mf-student.yaml",
                            "kd": "configs/citeulike/mf-rcekd.yaml"}


def tracking_callbacks(command: str, opts: dict) -> list:
    """[] with --no-mlflow, else an MlflowTracker (probes the server now: fails fast when it is unreachable)."""
    if opts["no_mlflow"]:
        if opts["register"]:
            raise TrackingError("--register needs MLflow; drop --no-mlflow")
        return []
    return [MlflowTracker(command, tracking_uri=opts["tracking_uri"], experiment=opts["experiment"],
                          register=opts["register"], alias=opts["alias"], gate_share=opts["gate_share"],
                          optional=opts["mlflow_optional"])]


def _training_config(config_path, out: Path, overrides, epochs, seed, threads, resume):
    if resume and config_path is None and (out / CONFIG_FILE).exists():
        config_path = out / CONFIG_FILE  # a resumed run keeps its own resolved config
    pairs = list(overrides)
    pairs += [("train.epochs", epochs)] if epochs is not None else []
    pairs += [("train.seed", seed)] if seed is not None else []
    pairs += [("train.threads", threads)] if threads is not None else []
    return api.make_config(config_path, pairs)


def _launched(nproc: int, master_port: int) -> bool:
    """With --nproc N > 1 outside torchrun: run this command as N ranks (and report for them); True when done."""
    if nproc > 1 and launched_world_size() == 1:
        run_under_torchrun(nproc, strip_launch_options(sys.argv[1:]), master_port)
        return True
    return False


def _setup_rank_logging(quiet: bool, out: Path) -> bool:
    """Logging of a training command; under torchrun only rank 0 logs (and writes train.log). True on rank 0."""
    main_rank = launch_rank() == 0
    setup_logging(quiet or not main_rank, out / LOG_FILE if main_rank else None)
    return main_rank


def _print_result(out: Path, result) -> None:
    click.echo(json.dumps({"out": str(out), "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                           "test": {k: round(v, 6) for k, v in result.test.items() if k != "users"},
                           "wall_time_s": round(result.wall_time_s, 1)}))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="compress")
def main():
    """Compress large recommenders into small, fast ones and ship them to serving.

    \b
    Workflow:
      compress train    --config configs/citeulike/mf-teacher.yaml --out runs/teacher
      compress distill  --teacher runs/teacher --config configs/citeulike/mf-rcekd.yaml --out runs/student
      compress evaluate runs/student --json
      compress export   runs/student --out bundles/student
      compress serve    bundles/student
    """


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), required=False,
              help="YAML recipe (see configs/). Defaults: MF on the bundled CiteULike-t.")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Run directory: checkpoints, metrics.jsonl, train.log, result.json.")
@options.training_options
def train(config_path, out, epochs, seed, device, threads, overrides, resume, nproc, master_port, reshard, quiet,
          mlflow_opts):
    """Train a model (typically the teacher) with BPR, early stopping on validation NDCG@10.

    With --nproc N (or under torchrun) the users are sharded over N processes; rank 0 writes the run directory
    in the one-process format and is the only one that logs and tracks.
    """
    out = Path(out)
    cfg = _training_config(config_path, out, overrides, epochs, seed, threads, resume)
    if _launched(nproc, master_port):
        return
    main_rank = _setup_rank_logging(quiet, out)
    callbacks = tracking_callbacks("train", mlflow_opts) if main_rank else []  # after config: config errors first
    result = api.train(cfg, out, device=device, resume=resume, callbacks=callbacks, progress=not quiet,
                       reshard=reshard)
    if main_rank:
        _print_result(out, result)


@main.command()
@click.option("--teacher", multiple=True,
              help="Frozen teacher: a `compress train` run dir or .safetensors, a models:/ URI, or an .npz with "
                   "user_vectors, item_vectors, user_ids, item_ids. Give it more than once to distil from the "
                   "teachers' ensemble (their scores averaged on one scale, or weighted by distill.teacher_weights). "
                   "Not needed for --method scratch.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), required=False,
              help="Student recipe, e.g. configs/citeulike/mf-rcekd.yaml (model = the student).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run directory of the student.")
@click.option("--method", type=click.Choice(METHOD_NAMES), default=None,
              help="Objective (overrides distill.method): rcekd (default), ce (vanilla CE-KD), rrd, scratch.")
@options.training_options
def distill(teacher, config_path, out, method, epochs, seed, device, threads, overrides, resume, nproc, master_port,
            reshard, quiet, mlflow_opts):
    """Distil a small student from a frozen teacher with RCE-KD (or a baseline, for a fair comparison).

    The teacher's top-K is computed once with FAISS and cached beside the run (reused by later runs with
    the same teacher); the student's top-M is refreshed at the start of every epoch.
    """
    out = Path(out)
    if method:
        overrides = (*overrides, f"distill.method={method}")
    cfg = check_distill(_training_config(config_path, out, overrides, epochs, seed, threads, resume),
                        str(config_path or "config"))
    if _launched(nproc, master_port):
        return
    main_rank = _setup_rank_logging(quiet, out)
    sources = [resolve_checkpoint(t) for t in teacher]
    source = None if not sources else sources[0] if len(sources) == 1 else sources
    callbacks = tracking_callbacks("distill", mlflow_opts) if main_rank else []
    result = api.distill(source, cfg, out, device=device, resume=resume, callbacks=callbacks, progress=not quiet,
                         teacher_label=" + ".join(teacher) or None, reshard=reshard)
    if main_rank:
        _print_result(out, result)


def _interval(e: dict, fmt: str = "{:.5f}") -> str:
    """`value [lo, hi]` of a report number ({"value", "lo", "hi"}); `undefined` without a value."""
    if e["value"] is None:
        return "undefined"
    ci = f" [{fmt.format(e['lo'])}, {fmt.format(e['hi'])}]" if e["lo"] is not None else ""
    return fmt.format(e["value"]) + ci


@main.command()
@click.argument("checkpoint")
@click.option("--split", type=click.Choice(["valid", "test"]), default="test", show_default=True,
              help="Which held-out split to rank.")
@click.option("--data", "data_path", default=None,
              help="Evaluate on this data instead of the data recorded in the checkpoint (ids must match).")
@click.option("--k", "ks", type=click.IntRange(min=1), multiple=True,
              help="Cut-offs K (repeatable; default: the run's eval_ks).")
@click.option("--full", is_flag=True,
              help="Also MRR@K and MAP@K, a bootstrap confidence interval of every metric, the share of held-out "
                   "interactions on cold items (no training interaction) and the metrics on warm items only.")
@click.option("--compare", metavar="OTHER", default=None,
              help="Also OTHER (a checkpoint on the same data ids) and the paired CI of CHECKPOINT minus OTHER on "
                   "the same users. Implies --full.")
@click.option("--gap", nargs=2, metavar="SCRATCH TEACHER", default=None,
              help="Also the share of the SCRATCH -> TEACHER gap that CHECKPOINT recovers, (model - scratch) / "
                   "(teacher - scratch), with its paired CI. Implies --full.")
@click.option("--bootstrap", "n_resamples", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Bootstrap resamples of the users for the 95% CIs (0 = point estimates only). Implies --full.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap resamples.")
@click.option("--users", type=click.Choice(EVAL_USERS), default="warm", show_default=True,
              help="warm: the users the model trained on. cold: the users its data held out of training "
                   "(data.cold_users), each ranked from its history: a history model (model.kind history) encodes "
                   "it, an ID model has no vector for them and is scored by popularity, as serving answers them.")
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON object of the metrics.")
@options.DEVICE
@options.tracking_uri("MLflow server that resolves a models:/ CHECKPOINT.", expose=False)
@user_errors
def evaluate(checkpoint, split, data_path, ks, full, compare, gap, n_resamples, seed, users, as_json, device):
    """Full-ranking Recall@K / NDCG@K of CHECKPOINT (a run directory, a .safetensors file or a models:/ URI).

    All items are ranked except the user's training items; users without held-out items are skipped. With
    --full (or --compare, --gap, --bootstrap) also MRR@K / MAP@K and percentile CIs from a paired bootstrap over
    users; definitions: docs/evaluation.md.
    """
    setup_logging(quiet=as_json)
    path = resolve_checkpoint(checkpoint)
    given = click.get_current_context().get_parameter_source("n_resamples") != click.core.ParameterSource.DEFAULT
    if not (full or compare or gap or given or users != "warm"):
        res = api.evaluate(path, split, data_path, ks or None, device)
        metrics = {k: v for k, v in res.items() if k != "users"}
        if as_json:
            click.echo(json.dumps(metrics))
        else:
            click.echo(f"{path} on {split} ({res['users']:,} users):")
            for k, v in metrics.items():
                click.echo(f"  {k:<10} {v:.5f}")
        return
    others = ([resolve_checkpoint(compare)] if compare else []) + [resolve_checkpoint(g) for g in gap or ()]
    evals = api.evaluate_per_user([path, *others], split, data_path, ks or None, device, users=users)
    main_ev, rest = evals[0], evals[1:]
    other = rest.pop(0) if compare else None
    res = evaluation_report(main_ev, other, *(rest if gap else (None, None)), n_resamples=n_resamples, seed=seed)
    res = {"checkpoint": str(path), "split": split, "users_evaluated": users, **res}
    if compare:
        res["compare"] = {"checkpoint": str(others[0]), **res["compare"]}
    if gap:
        res["gap"] = {"scratch_checkpoint": str(others[-2]), "teacher_checkpoint": str(others[-1]), **res["gap"]}
    if as_json:
        click.echo(json.dumps(res))
        return
    ci = (f"; {res['bootstrap']['level']:.0%} CIs from {n_resamples:,} bootstrap resamples of the users, seed {seed}"
          if n_resamples else "")
    who = "" if users == "warm" else " held-out cold"
    click.echo(f"{path} on {split} ({res['users']:,}{who} users{ci}):")
    for k, e in res["metrics"].items():
        click.echo(f"  {k:<10} {_interval(e)}")
    cold = res["cold_items"]
    click.echo(f"cold items (no training interaction): {cold['share']:.1%} of the {cold['interactions']:,} {split} "
               f"interactions; on warm items only ({res['warm']['users']:,} users):")
    for k, e in res["warm"]["metrics"].items():
        click.echo(f"  {k:<10} {_interval(e)}")
    if compare:
        click.echo(f"{others[0]}, and the paired difference CHECKPOINT - OTHER:")
        for k, e in res["compare"]["metrics"].items():
            click.echo(f"  {k:<10} {_interval(e)}   difference "
                       f"{_interval(res['compare']['difference'][k], '{:+.5f}')}")
    if gap:
        click.echo(f"share of the gap recovered, {others[-2]} -> {others[-1]}:")
        for k, e in res["gap"]["share"].items():
            why = "" if e["value"] is not None else " (teacher and scratch do not differ)"
            why = why or ("" if e["lo"] is not None or not n_resamples else " (CI undefined: the gap's CI holds 0)")
            click.echo(f"  {k:<10} {_interval(e, '{:.1%}')}{why}   scratch {_interval(res['gap']['scratch'][k])}, "
                       f"teacher {_interval(res['gap']['teacher'][k])}")


@main.command()
@click.argument("name")
@click.argument("version")
@click.option("--alias", required=True, help="Alias to move to NAME/VERSION, e.g. champion.")
@click.option("--force", is_flag=True, help="Move the alias even if the promotion gate blocks it.")
@options.GATE_SHARE
@options.tracking_uri()
@user_errors
def promote(name, version, alias, force, gate_share, tracking_uri):
    """Point ALIAS of registered model NAME at VERSION, through the same gate as `--register --alias`.

    Exits 1 without moving the alias when the gate blocks (the reason is tagged on the version).
    """
    setup_logging()
    click.echo(json.dumps(promote_version(name, version, alias, share=gate_share, force=force,
                                          tracking_uri=tracking_uri)))


@main.command("config-reference")
def config_reference():
    """Print every config key with its type, default and meaning (Markdown)."""
    click.echo(reference_markdown(), nl=False)


@main.command("export")
@click.argument("source", required=False)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Bundle directory to write (written to a temp dir beside it, verified, then renamed into place).")
@click.option("--verify", "verify_dir", type=click.Path(file_okay=False), default=None, metavar="BUNDLE_DIR",
              help="Instead of exporting, run every check the server runs at startup on BUNDLE_DIR.")
@click.option("--index", "index_factory", default="auto", show_default=True, metavar="auto|FACTORY",
              help="FAISS factory string (Flat, HNSW32, IVF256,SQ8 ...), or auto: measure the exact scan, IVF and "
                   "HNSW in the bundle's codec and keep the smallest that reaches --recall-floor and is no slower "
                   "than the exact scan (what was tried is in the manifest's index.auto).")
@click.option("--k-max", type=click.IntRange(min=1), default=100, show_default=True,
              help="k at which an approximate index's recall, and the exact index's top-k, are checked.")
@click.option("--recall-floor", type=click.FloatRange(0, 1), default=0.95, show_default=True,
              help="Refuse an approximate index whose recall@k-max is lower.")
@click.option("--quantize", type=click.Choice(QUANTIZATIONS), default="fp32", show_default=True,
              help="Store the user table and the item codes as fp16 or int8 (per-row scale); kept only if the "
                   "bundle's top-k agrees with the fp32 one on the reference users (else refused, see --force).")
@click.option("--force", is_flag=True, help="Write an approximate index that misses --recall-floor, or a quantized "
              "bundle that fails its agreement check (the measured numbers go in the manifest).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out.")
@options.tracking_uri("MLflow server that resolves a models:/ SOURCE.", expose=False)
@user_errors
def export_command(source, out, verify_dir, index_factory, k_max, recall_floor, quantize, force, overwrite):
    """Export SOURCE (a run dir, .safetensors or models:/ URI) as a serving bundle for `compress serve`.

    \b
    The bundle: model.onnx (user tower), items.faiss, id maps, seen items, manifest.json with hashes.
      compress export runs/student --out bundles/student
      compress export --verify bundles/student
    """
    if verify_dir is not None:
        if source is not None or out is not None:
            raise click.UsageError("--verify BUNDLE_DIR takes no SOURCE and no --out")
        try:
            checks = verify_bundle(verify_dir)
        except BundleError as e:
            msg = one_line(e)
            raise click.ClickException(msg if msg.startswith(str(verify_dir)) else f"{verify_dir}: {msg}") from None
        for line in checks:
            click.echo(line)
        click.echo(f"ok: {verify_dir} passed {len(checks)} checks")
        return
    if source is None or out is None:
        raise click.UsageError("give SOURCE and --out BUNDLE_DIR (or --verify BUNDLE_DIR)")
    setup_logging()
    extra = {"registered_model_uri": source} if source.startswith(MODELS_PREFIX) else None
    manifest = export_checkpoint(resolve_checkpoint(source), out, index_factory=index_factory, k_max=k_max,
                                 recall_floor=recall_floor, quantize=quantize, force=force, overwrite=overwrite,
                                 lineage_extra=extra)
    index = manifest["index"]
    click.echo(json.dumps({"out": str(out), "num_users": manifest["num_users"], "num_items": manifest["num_items"],
                           "dim": manifest["dim"], "index": index["factory"], "exact": index["exact"],
                           "recall_at_k": index["recall_at_k"], "k": index["k"], "auto_note": index["auto_note"]}))


@main.command()
@click.argument("source")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; the default answers this machine only. Beyond loopback a token is required "
                   "(see --token-file) unless --insecure-no-token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes, each with one ONNX Runtime and one FAISS thread [default: one per core].")
@click.option("--max-k", type=click.IntRange(min=1), default=1000, show_default=True, help="Largest k a request may ask.")
@click.option("--max-batch", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Most user ids in one /recommend/batch request.")
@click.option("--fallback", type=click.Choice(["none", *(f for f in FALLBACKS if f)]), default="none", show_default=True,
              help="popular: answer unknown users with the most popular items, marked \"fallback\": \"popular\", "
                   "instead of 404.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=1_048_576, show_default=True,
              help="Largest request body; a bigger one is refused with 413 before it is read.")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="File holding the bearer token that every endpoint but /healthz and /readyz requires "
                   "(Authorization: Bearer TOKEN); or set $COMPRESS_SERVE_TOKEN. Also enables POST /admin/swap.")
@click.option("--insecure-no-token", is_flag=True,
              help="Bind beyond loopback without a token: anyone who reaches the port can query the model.")
@click.option("--follow-alias", is_flag=True,
              help="SOURCE models:/NAME@ALIAS: whenever the alias moves, download and verify the new version and "
                   "swap it in without a restart (the old version serves until then, and if it fails to verify).")
@click.option("--poll-s", type=click.FloatRange(min=0.5), default=30.0, show_default=True,
              help="With --follow-alias: seconds between registry polls (backing off while it is unreachable).")
@options.tracking_uri("MLflow server that resolves a models:/ SOURCE.", expose=False)
@user_errors
def serve(source, host, port, workers, max_k, max_batch, fallback, max_body_bytes, token_file, insecure_no_token,
          follow_alias, poll_s):
    """Serve SOURCE (a bundle directory or models:/NAME@ALIAS) over HTTP: POST /recommend, /recommend/batch,
    /admin/swap; GET /healthz, /readyz, /metadata, /metrics, /openapi.json.

    The bundle is verified before the port is bound (a corrupt bundle: exit status 1). The server runs as
    `python -m serving`, a fresh process that never imports torch, MLflow or the training code.
    """
    if follow_alias and not (source.startswith(MODELS_PREFIX) and "@" in source):
        raise click.UsageError("--follow-alias needs SOURCE models:/NAME@ALIAS")
    label = digest = None
    if source.startswith(MODELS_PREFIX):
        label, bundle, digest = resolve_registered_bundle(source)
    else:
        bundle = source
    argv = [sys.executable, "-m", "serving", str(bundle), "--host", host, "--port", str(port), "--max-k", str(max_k),
            "--max-batch", str(max_batch), "--fallback", fallback, "--max-body-bytes", str(max_body_bytes)]
    argv += ["--workers", str(workers)] if workers is not None else []
    argv += ["--token-file", token_file] if token_file else []
    argv += ["--insecure-no-token"] if insecure_no_token else []
    argv += ["--model-version", label] if label else []
    setup_logging()
    if follow_alias:
        control = Path(tempfile.mkdtemp(prefix="compress-follow-")) / "control.json"
        try:
            code = serve_following(source, [*argv, "--control-file", str(control)], control, label, Path(bundle),
                                   digest, poll_s)
        finally:
            shutil.rmtree(control.parent, ignore_errors=True)
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default="runs/pipeline", show_default=True,
              help="Pipeline directory: teacher/, scratch/, rcekd/ runs, bundles/, report/.")
@click.option("--data", default=None, help="Interactions to use instead of the recipes' (any format `compress "
              "train` reads); default: the bundled CiteULike-t.")
@click.option("--teacher", default=None, help="Use this trained teacher (run dir, .safetensors or models:/ URI) "
              "instead of training one.")
@click.option("--teacher-config", default=DEFAULT_PIPELINE_CONFIGS["teacher"], show_default=True,
              help="Teacher recipe.")
@click.option("--student-config", default=DEFAULT_PIPELINE_CONFIGS["student"], show_default=True,
              help="Student recipe, trained from scratch (the baseline).")
@click.option("--kd-config", default=DEFAULT_PIPELINE_CONFIGS["kd"], show_default=True,
              help="Student recipe with RCE-KD settings.")
@options.EPOCHS
@click.option("--patience", type=int, default=None,
              help="Early-stopping patience of the RCE-KD stage (overrides its train.patience; default: the "
                   "recipe's, 30 as in the paper). The teacher and the scratch baseline always train to their "
                   "recipes' patience, so the student is compared with a fully trained teacher.")
@click.option("--kd-users", type=click.Choice(list(KD_USERS_MODES)), default="once_per_epoch",
              show_default=True,
              help="distill.kd_users of the RCE-KD stage. once_per_epoch: each user's KD terms once per epoch, in "
                   "the first batch that holds it; of the forms measured on CiteULike the steadiest over 5 seeds "
                   "(test NDCG@20 0.0173 ± 0.0001; docs/benchmarks.md 2c, 7d), which a promotion gate on one seed "
                   "needs. user_batches is the recipes' form (once per epoch in KD batches of their own, cheaper "
                   "at many users; 4o); every_batch the spec's (KD terms for every distinct user of every batch).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every stage.")
@options.DEVICE
@options.THREADS
@options.SET
@click.option("--index", default="auto", show_default=True, help="FAISS index of the bundles (see compress export).")
@click.option("--fresh", is_flag=True, help="Redo every stage instead of reusing finished ones.")
@click.option("--bootstrap", "n_resamples", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Bootstrap resamples of the test users behind the report's 95% CIs of test NDCG@20 and of the "
                   "gap share (0 = point estimates only).")
@click.option("--parallel/--sequential", default=True, show_default=True,
              help="Train the scratch baseline in a second process beside the teacher (half the cores each), "
                   "or one stage after the other.")
@options.QUIET
@options.mlflow_options
@user_errors
def pipeline(out, data, teacher, teacher_config, student_config, kd_config, epochs, patience, kd_users, seed, device,
             threads, overrides, index, fresh, n_resamples, parallel, quiet, mlflow_opts):
    """The main job: teacher -> scratch and RCE-KD students -> evaluation -> verified bundles -> MLflow
    registration -> report, on the bundled CiteULike-t unless --data is given.

    \b
    Re-running reuses finished stages (a killed stage resumes from its last epoch); --fresh redoes them.
    Ends by printing where everything is and the `compress serve` command for the student's bundle.
    """
    out = Path(out)
    setup_pipeline_logging(quiet, out / "pipeline.log")
    if mlflow_opts["no_mlflow"] and mlflow_opts["register"]:
        raise click.UsageError("--register needs MLflow; drop --no-mlflow")
    tracking = None
    if not mlflow_opts["no_mlflow"]:
        tracking_callbacks("pipeline", {**mlflow_opts, "register": None, "alias": None})  # probe now: fail fast
        tracking = {"tracking_uri": mlflow_opts["tracking_uri"], "experiment": mlflow_opts["experiment"],
                    "optional": mlflow_opts["mlflow_optional"]}
    opts = PipelineOptions(out=out, data=data, teacher=resolve_checkpoint(teacher) if teacher else None,
                           teacher_config=teacher_config, student_config=student_config, kd_config=kd_config,
                           overrides=overrides, epochs=epochs, patience=patience, kd_users=kd_users, seed=seed,
                           device=device,
                           threads=threads, fresh=fresh, quiet=quiet, mlflow=tracking,
                           register=mlflow_opts["register"], alias=mlflow_opts["alias"],
                           gate_share=mlflow_opts["gate_share"], index=index, bootstrap=n_resamples, parallel=parallel,
                           log_file=out / "pipeline.log")
    summary = run_pipeline(opts)
    click.echo("", err=True)
    click.echo(f"teacher:  {summary['teacher']}\nstudents: {summary['scratch']}  {summary['rcekd']}\n"
               f"bundle:   {summary['bundle']}\nreport:   {summary['report']}", err=True)
    reg = summary.get("registered")
    if reg:
        click.echo(f"registry: {reg['model_uri']}" + (f" (alias {reg['alias']})" if reg.get("alias") else
                                                      f" (no alias: {reg.get('gate_reason')})"), err=True)
    click.echo("next:     compress serve " + summary["bundle"], err=True)
    click.echo(json.dumps(summary))


main.add_command(recommend_command, name="recommend")


def entry() -> None:
    """The `compress` console script and `python -m compress_app`: ``main``; under torchrun (WORLD_SIZE > 1)
    followed by a hard exit once the command is done and its output flushed. A rank that let the interpreter
    tear down its gloo threads at exit was sometimes aborted by them (SIGABRT, "terminate called without an
    active exception", about 1 exit in 10 on this box), which torchrun then reports as a failed job."""
    if launched_world_size() <= 1:
        main()
        return
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # a bug: its traceback, then the same hard exit
        traceback.print_exc()
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
