"""Click options shared by several commands, each declared once."""

from __future__ import annotations

import functools
import os

import click

from compressor.device import DEVICE_CHOICES

from .errors import user_errors
from .tracking import DEFAULT_GATE_SHARE

DEVICE = click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True,
                      help="Where to compute: auto picks CUDA when present, else CPU.")
SEED = click.option("--seed", type=int, default=None, help="Seed for initialisation and sampling "
                    "(overrides train.seed).")
EPOCHS = click.option("--epochs", type=int, default=None, help="Maximum epochs (overrides train.epochs).")
SET = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                   help="Override a config key, e.g. --set train.lr=0.002 (repeatable; value parsed as YAML).")
THREADS = click.option("--threads", type=int, default=None,
                       help="CPU threads for torch and FAISS (overrides train.threads; 0 = every core this process "
                            "may use, shared by the ranks on this machine).")
QUIET = click.option("--quiet", is_flag=True, help="No progress bars; log warnings and the summary only.")
RESUME = click.option("--resume", is_flag=True, help="Continue the run in --out from its last completed epoch.")
GATE_SHARE = click.option("--gate-share", type=float, default=DEFAULT_GATE_SHARE, show_default=True,
                          help="Promotion gate: student test NDCG@20 must reach this share of its teacher's.")

TRACKING_URI_HELP = ("MLflow tracking server or store (default: $MLFLOW_TRACKING_URI, else MLflow's own default, "
                     "sqlite:///mlflow.db in the working directory).")


def _export_tracking_uri(ctx, param, value):
    """Make --tracking-uri visible to everything that resolves models:/ URIs in this process."""
    if value:
        os.environ["MLFLOW_TRACKING_URI"] = value
    return value


def tracking_uri(purpose: str = "", expose: bool = True):
    """--tracking-uri (env MLFLOW_TRACKING_URI); ``purpose`` prefixes the help, e.g. what it resolves."""
    return click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None, metavar="URI",
                        expose_value=expose, callback=_export_tracking_uri,
                        help=(purpose + " " if purpose else "") + TRACKING_URI_HELP)


MLFLOW_OPTIONS = [
    tracking_uri(),
    click.option("--experiment", envvar="MLFLOW_EXPERIMENT_NAME", default="compress", show_default=True,
                 help="MLflow experiment of the run (created when missing)."),
    click.option("--no-mlflow", is_flag=True, envvar="COMPRESS_NO_MLFLOW",
                 help="Do not track this run in MLflow (env COMPRESS_NO_MLFLOW=1)."),
    click.option("--mlflow-optional", is_flag=True,
                 help="If the tracking server is unreachable at start, warn and train untracked instead of failing."),
    click.option("--register", metavar="NAME", default=None,
                 help="Register the final model as a new version of MLflow registered model NAME (pyfunc top-k)."),
    click.option("--alias", default=None, help="With --register: alias (e.g. champion) moved to the new version "
                 "if it passes the promotion gate; otherwise the version is registered without it."),
    GATE_SHARE,
]
MLFLOW_NAMES = ("tracking_uri", "experiment", "no_mlflow", "mlflow_optional", "register", "alias", "gate_share")


def mlflow_options(fn):
    """Add the MLflow options to a command; they arrive as one dict argument ``mlflow_opts``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        kwargs["mlflow_opts"] = {n: kwargs.pop(n) for n in MLFLOW_NAMES}
        return fn(*args, **kwargs)

    for opt in reversed(MLFLOW_OPTIONS):
        wrapper = opt(wrapper)
    return wrapper


NPROC = click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Train on N processes of this machine, users sharded over them: runs this same command "
                          "as `torchrun --nproc-per-node N -m compress_app ...` (gloo on CPU, NCCL on GPUs). "
                          "For several machines call torchrun yourself (see docs/scaling.md).")
MASTER_PORT = click.option("--master-port", type=click.IntRange(min=0, max=65535), default=0,
                           help="With --nproc: the loopback port of the ranks' rendezvous (default: a free one).")
RESHARD = click.option("--reshard", is_flag=True,
                       help="With --resume: continue a run saved with another number of processes (it then "
                            "differs from an uninterrupted run).")


def training_options(fn):
    """The options `train` and `distill` share (epochs, seed, device, threads, --set, --resume, processes, quiet,
    MLflow)."""
    for opt in reversed((EPOCHS, SEED, DEVICE, THREADS, SET, RESUME, NPROC, MASTER_PORT, RESHARD, QUIET,
                         mlflow_options, user_errors)):
        fn = opt(fn)
    return fn
