"""Typed, validated run configuration.

A YAML recipe maps onto nested dataclasses. Unknown or misspelled keys are errors that name the key (with its
dotted path and the file), wrong types and out-of-range values likewise. Every field carries a help string, from
which the README's configuration reference is generated (``compress config-reference``).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data import FORMATS, SPLIT_ORDERS
from .errors import CompressError
from .kd_terms import CE_TARGETS
from .models import MODEL_KINDS
from .objectives import KD_USERS_MODES, METHOD_NAMES, method_needs_teacher
from .optim import OPTIMIZER_NAMES
from .retrieval import EXACT_FACTORIES


class ConfigError(CompressError, ValueError):
    """A mistake in a config file or override; the message names the key."""


def _f(default, help: str, choices=None, min=None, gt=None):  # noqa: A002 - mirrors argparse's names
    """A schema field: ``choices`` the allowed values, ``min`` an inclusive and ``gt`` an exclusive lower bound."""
    kw = {"metadata": {"help": help, "choices": choices, "min": min, "gt": gt}}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), **kw)
    return field(default=default, **kw)


@dataclass
class SplitConfig:
    order: str = _f("file", "How each user's interactions are ordered before the 8:1:1 cut.",
                    choices=SPLIT_ORDERS)
    ratios: list = _f([0.8, 0.1, 0.1], "train/valid/test shares per user (must sum to 1).")
    seed: int = _f(0, "Seed of the shuffle when order is 'random'.")


@dataclass
class DataConfig:
    path: str = _f("builtin:citeulike-t", "A file, a directory with train/valid/test files, or builtin:citeulike-t.")
    format: str = _f("auto", "Input format.", choices=FORMATS)
    min_user_interactions: int = _f(0, "k-core: drop users with fewer interactions (0 = keep all).", min=0)
    min_item_interactions: int = _f(0, "k-core: drop items with fewer interactions (0 = keep all).", min=0)
    split: SplitConfig = field(default_factory=SplitConfig, metadata={"help": "Per-user split of a single file."})
    cold_users: float = _f(0.0, "Share of users held out of training entirely, for the cold-user evaluation: "
                                "their training part becomes a history to serve them from, their test part "
                                "the targets (chosen by a hash of the user id, so every run on the data agrees).",
                           min=0)


@dataclass
class ModelConfig:
    kind: str = _f("mf", "Model family.", choices=MODEL_KINDS)
    dim: int = _f(64, "Embedding dimension.", min=1)
    layers: int = _f(3, "LightGCN propagation layers (ignored by MF).", min=0)
    init_std: float = _f(0.01, "Std of the normal initialisation of the embeddings.", min=0)
    max_len: int = _f(50, "History tower: a user vector is computed from the user's most recent max_len items.",
                      min=1)
    hidden: int = _f(64, "History tower: width of the residual MLP over the pooled history.", min=1)


def model_numbers(m: ModelConfig) -> dict:
    """The constructor numbers of ``models.build_model`` (each kind takes the ones it uses)."""
    return {"dim": m.dim, "layers": m.layers, "init_std": m.init_std, "max_len": m.max_len, "hidden": m.hidden}


@dataclass
class TrainConfig:
    epochs: int = _f(1000, "Maximum number of epochs.", min=1)
    batch_size: int = _f(2048, "Training interactions per BPR batch.", min=1)
    lr: float = _f(1e-3, "Adam learning rate.", min=0)
    weight_decay: float = _f(0.0, "Weight decay: L2 for adam, lazy_adam and sparse_adam (on the rows a batch "
                                  "touches); decoupled (AdamW) for sparse_adamw, where a value tuned as L2 does not "
                                  "carry over.", min=0)
    optimizer: str = _f("adam", "adam: torch Adam over every row each step (the paper's recipe). "
                                "sparse_adam: for MF, torch Adam on the rows a batch touches, and the rows it skips "
                                "keep moving along their momentum, applied in closed form when next touched "
                                "(compressor/optim.py; a fraction of adam's epoch time for wide tables: "
                                "docs/benchmarks.md section 3c). "
                                "lazy_adam: for MF, update only the rows a batch touches; untouched rows stand "
                                "still, which costs some teacher quality (docs/benchmarks.md section 3). "
                                "sparse_adamw: row-sparse AdamW whose untouched rows only decay; at the recipes' "
                                "lr 1e-3 it under-trains (section 3b). Other models than MF get each one's dense "
                                "update.",
                        choices=OPTIMIZER_NAMES)
    lr_decay: float = _f(1.0, "A factor in (0, 1]: lr is multiplied by it after every lr_decay_patience "
                              "validations in a row without a better metric (1 = a constant lr, the paper's "
                              "recipe); train.patience still counts from the last improvement.", gt=0)
    lr_decay_patience: int = _f(10, "Validations without a better metric between two lr decays (lr_decay < 1).",
                                min=1)
    eval_every: int = _f(1, "Validate every N epochs.", min=1)
    patience: int = _f(30, "Stop after this many validations without a better validation metric.", min=1)
    metric: str = _f("ndcg@10", "Validation metric for early stopping and model selection.")
    eval_ks: list = _f([10, 20], "Cut-offs K for Recall@K and NDCG@K.")
    seed: int = _f(0, "Seed of initialisation and sampling.")
    threads: int = _f(0, "torch and FAISS CPU threads (0 = the cores this process may use: affinity and cgroup "
                         "quota, divided among the torchrun ranks on this machine).", min=0)
    eval_block: int = _f(1024, "Users per block in full-ranking evaluation (bounds memory).", min=1)
    checkpoint_every: int = _f(1, "Write the resume checkpoint every N epochs (the best model is always saved "
                                  "when it improves; a resumed run replays the epochs since, identically).", min=1)


@dataclass
class RRDConfig:
    interesting: int = _f(100, "L1: interesting items sampled from the teacher's top-M.", min=1)
    top_m: int = _f(500, "M: depth of the teacher ranking the interesting items come from.", min=1)
    temperature: float = _f(10.0, "T: sampling probability of rank r is proportional to exp(-r/T).", gt=0)
    uninteresting: int = _f(200, "L2: uniformly sampled items pushed below the interesting ones.", min=1)
    distinct_uninteresting: bool = _f(False, "Draw the L2 uninteresting items without replacement, as the "
                                             "authors' public code does (DE-RRD's paper: with replacement). With "
                                             "distill.exclude_seen the top-M also leaves the training positives "
                                             "out, their code's other difference.")


@dataclass
class DistillConfig:
    method: str = _f("rcekd", "Distillation objective.", choices=METHOD_NAMES)
    lambda_kd: float = _f(500.0, "lambda: weight of the KD loss against the BPR loss.", min=0)
    tau: float = _f(1.0, "Softmax temperature of the CE terms.", gt=0)
    tau_anneal_epochs: int = _f(0, "RCE-KD and CE: move the temperature linearly from tau at epoch 1 to 1 over this "
                                   "many epochs, 1 after (0 = tau throughout, the spec's).", min=0)
    K: int = _f(50, "Size of the teacher's and the student's top lists.", min=1)
    M: int = _f(200, "Depth of the student's ranking read each epoch (>= K).", min=1)
    L: int = _f(50, "Items sampled per user from the student's top-M (<= M).", min=1)
    T: float = _f(10.0, "Sampling temperature of the closure weights.", gt=0)
    beta: float = _f(3.0, "Strength of the adaptive weight alpha = exp(-beta * overlap).", min=0)
    use_loss_s: bool = _f(True, "Ablation: keep loss_S (CE over the student's top-K).")
    use_loss_t: bool = _f(True, "Ablation: keep loss_T (CE over sampled + teacher-top items).")
    constant_alpha: typing.Optional[float] = _f(None, "Ablation: a constant alpha instead of the adaptive one.")
    ce_target: str = _f("student", "Vanilla CE baseline: CE over the student's or the teacher's top-K.",
                        choices=CE_TARGETS)
    kd_users: str = _f("every_batch", "Which users get the KD terms: every_batch = every distinct user of every BPR "
                                      "batch (the spec's); once_per_epoch = each user only in the first batch it "
                                      "appears in per epoch (a fraction of the KD work, at the same test quality "
                                      "on CiteULike; docs/benchmarks.md sections 2c, 2d, 4); user_batches = each "
                                      "user once per epoch too, in shuffled KD batches of kd_batch_users users, "
                                      "one per BPR batch from the epoch's first (fewer, larger KD calls, the spec's "
                                      "test quality: the CiteULike and Gowalla recipes' form; sections 4m, 4o).",
                       choices=KD_USERS_MODES)
    kd_batch_users: int = _f(2048, "kd_users user_batches: users per KD batch.", min=1)
    exclude_seen: bool = _f(False, "Remove each user's training items from the teacher's and the student's top "
                                   "lists (the spec keeps them). Required by model.kind history: a user vector "
                                   "computed from the history must not be taught to rank the history itself.")
    teacher_weights: list = _f([], "With several teachers (--teacher given more than once): the weight of each "
                                    "one's scores, in order. Empty: each teacher's scores brought to the first "
                                    "one's spread and averaged.")
    index: str = _f("Flat", "The student's top-M search: Flat = exact (torch's blocked matmul + top-k; FAISS's "
                             "GPU index where installed), a FAISS factory string (e.g. IVF1024,Flat), "
                             "or UserClusters (users grouped by k-means, each ranked over its cluster's candidate "
                             "items: the cheapest at many users).")
    index_params: dict = _f({}, "Search parameters, e.g. {nprobe: 32} or {efSearch: 128}; UserClusters: {clusters: "
                                "256, candidates: 1000}, unset ones sized to the data (2048 / 4000 at 1M users x "
                                "200k items).")
    rrd: RRDConfig = field(default_factory=RRDConfig, metadata={"help": "RRD baseline settings."})


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Input data."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The model trained by this run."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Optimisation and evaluation."})
    distill: DistillConfig = field(default_factory=DistillConfig,
                                   metadata={"help": "Distillation (used by `compress distill`)."})


# ----------------------------------------------------------------------------------------------- parsing

def _type_ok(value, tp) -> tuple[bool, typing.Any]:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return True, None
        return _type_ok(value, next(a for a in args if a is not type(None)))
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if tp is list:
        return isinstance(value, list), value
    if tp is dict:
        return isinstance(value, dict), value
    return True, value


def _build(cls, raw, where: str, source: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where or 'config'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(fields)})"
            raise ConfigError(f"{source}: unknown config key '{path}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path, source)
            continue
        ok, value = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"{source}: '{path}' must be {getattr(tp, '__name__', tp)}, got {value!r}")
        meta = fields[key].metadata
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{source}: '{path}' is {value!r}; expected one of {', '.join(meta['choices'])}")
        if meta.get("min") is not None and value is not None and not value >= meta["min"]:  # NaN fails too
            raise ConfigError(f"{source}: '{path}' must be >= {meta['min']}, got {value!r}")
        if meta.get("gt") is not None and value is not None and not value > meta["gt"]:
            raise ConfigError(f"{source}: '{path}' must be > {meta['gt']}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def _check(cfg: Config, source: str) -> Config:
    r = cfg.data.split.ratios
    if len(r) != 3 or any(not isinstance(x, (int, float)) or x < 0 for x in r) or abs(sum(r) - 1) > 1e-6:
        raise ConfigError(f"{source}: 'data.split.ratios' must be three non-negative numbers summing to 1, got {r}")
    if cfg.train.lr_decay > 1:
        raise ConfigError(f"{source}: 'train.lr_decay' must be in (0, 1] (1 = no decay), got {cfg.train.lr_decay}")
    for k in cfg.train.eval_ks:
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"{source}: 'train.eval_ks' must be positive integers, got {cfg.train.eval_ks}")
    m = cfg.train.metric
    name, _, k = m.partition("@")
    if name not in ("ndcg", "recall") or not k.isdigit() or int(k) not in cfg.train.eval_ks:
        raise ConfigError(f"{source}: 'train.metric' must be ndcg@K or recall@K with K in train.eval_ks, got {m!r}")
    d = cfg.distill
    if d.M < d.K:
        raise ConfigError(f"{source}: 'distill.M' ({d.M}) must be >= 'distill.K' ({d.K})")
    if d.kd_batch_users != DistillConfig.kd_batch_users and d.kd_users != "user_batches":
        raise ConfigError(f"{source}: 'distill.kd_batch_users' is read only with 'distill.kd_users: user_batches', "
                          f"not {d.kd_users!r}")
    if d.L > d.M:
        raise ConfigError(f"{source}: 'distill.L' ({d.L}) must be <= 'distill.M' ({d.M})")
    if d.rrd.interesting > d.rrd.top_m:
        raise ConfigError(f"{source}: 'distill.rrd.interesting' must be <= 'distill.rrd.top_m'")
    if not 0 <= cfg.data.cold_users < 1:
        raise ConfigError(f"{source}: 'data.cold_users' must be in [0, 1), got {cfg.data.cold_users}")
    if d.exclude_seen and d.index not in EXACT_FACTORIES:
        raise ConfigError(f"{source}: 'distill.exclude_seen' ranks exactly with the training items masked; it "
                          f"needs 'distill.index: Flat', got {d.index!r}")
    if d.index == "UserClusters":
        from .cluster_search import check_params  # (lazy: FAISS and torch only for this index)

        try:
            check_params(d.index_params)
        except ValueError as e:
            raise ConfigError(f"{source}: 'distill.index_params': {e}") from None
    if not d.use_loss_s and not d.use_loss_t:
        raise ConfigError(f"{source}: 'distill.use_loss_s' and 'distill.use_loss_t' cannot both be false")
    w = d.teacher_weights
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0 for x in w) or (w and sum(w) <= 0):
        raise ConfigError(f"{source}: 'distill.teacher_weights' must be non-negative numbers, not all 0, got {w}")
    return cfg


def check_distill(cfg: Config, source: str = "<config>") -> Config:
    """What only `distill` asks of a config (`train` ignores the distill section)."""
    if cfg.model.kind == "history" and method_needs_teacher(cfg.distill.method) and not cfg.distill.exclude_seen:
        raise ConfigError(f"{source}: model.kind history needs 'distill.exclude_seen: true' to distill: its user "
                          f"vector is computed from the training items, so it must not be taught to rank them")
    return cfg


def from_dict(raw: dict, source: str = "<config>") -> Config:
    return _check(_build(Config, raw, "", source), source)


def load_config(path: str | Path | None) -> Config:
    if path is None:
        return from_dict({}, "<defaults>")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    return from_dict(raw or {}, str(path))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1} (MLflow params)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


# The fields a recipe may set to distil faster (docs/benchmarks.md 4o); their schema defaults are RCE-KD's form as
# specified, which a benchmark pins to measure the paper's form from any recipe.
SPEC_FORM_FIELDS = ("kd_users", "index", "index_params")


def spec_form() -> dict:
    """{field: schema default} of SPEC_FORM_FIELDS: every_batch, the exact refresh, no index parameters."""
    defaults = DistillConfig()
    return {name: getattr(defaults, name) for name in SPEC_FORM_FIELDS}


def spec_form_sets() -> list[str]:
    """spec_form as `--set distill.KEY=VALUE` arguments."""
    def value(v):
        return yaml.safe_dump(v, default_flow_style=True).strip() if isinstance(v, dict) else v

    return [x for k, v in spec_form().items() for x in ("--set", f"distill.{k}={value(v)}")]


def reference_markdown() -> str:
    """Every config key with its type, default and help, generated from the dataclasses above."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, key + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            tname = getattr(tp, "__name__", str(tp).replace("typing.", ""))
            helptext = f.metadata.get("help", "")
            if f.metadata.get("choices"):
                helptext += f" One of: {', '.join(f.metadata['choices'])}."
            if f.metadata.get("gt") is not None:
                helptext += f" Must be > {f.metadata['gt']}."
            elif f.metadata.get("min") is not None:
                helptext += f" Must be >= {f.metadata['min']}."
            lines.append(f"| `{key}` | {tname} | `{default}` | {helptext} |")

    walk(Config, "")
    return "\n".join(lines) + "\n"
