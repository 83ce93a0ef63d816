"""Self-describing checkpoints in one safetensors file.

One file holds everything needed to rebuild, evaluate, export or resume a model:
- tensors ``model.*`` (weights), ``optim.*`` (Adam state, only in resume checkpoints), ``rng.torch``,
  ``state.*`` (what the objective carries between epochs, only in resume checkpoints),
  ``ids.users`` / ``ids.items`` (external ids, UTF-8, newline separated, as uint8), ``train.indptr`` /
  ``train.indices`` (each user's training items: LightGCN's graph and "exclude seen");
- a JSON document under the safetensors metadata key ``compress``: format version, model kind and constructor
  numbers, resolved config, data fingerprint, metrics, epoch, early-stopping state, history, lineage.

safetensors cannot execute code on load; anything that is not a safetensors file (a pickle, say) is refused
before a byte of it is interpreted. Writes are atomic: temp file in the same directory, fsync, rename.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from .errors import CompressError
from .files import atomic_write_bytes
from .models import build_model
from .run_dir import MODEL_FILE, RESUME_FILE

FORMAT_VERSION = 1


class CheckpointError(CompressError, ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def _ids_to_tensor(ids: np.ndarray) -> torch.Tensor:
    blob = "\n".join(ids.tolist()).encode("utf-8")
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)


def _tensor_to_ids(t: torch.Tensor) -> np.ndarray:
    text = bytes(t.numpy()).decode("utf-8")
    return np.array(text.split("\n") if text else [], dtype=str)


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Checkpoint:
    meta: dict
    model_state: dict[str, torch.Tensor]
    user_ids: np.ndarray
    item_ids: np.ndarray
    train_indptr: np.ndarray
    train_indices: np.ndarray
    optim_state: dict | None = None
    rng_state: torch.Tensor | None = None
    path: Path | None = field(default=None)
    run_state: dict[str, torch.Tensor] = field(default_factory=dict)  # ``state.*`` tensors, with training state

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def train_users(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.train_indptr) - 1), np.diff(self.train_indptr))

    def build_model(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """Rebuild the model from the constructor numbers and weights alone (eval mode)."""
        spec = dict(self.meta["model"])
        kind = spec.pop("kind")
        model = build_model(kind, **spec)
        missing, unexpected = model.load_state_dict(self.model_state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{self.path}: weights do not match a {kind} model "
                                  f"(missing {missing}, unexpected {unexpected})")
        if model.needs_graph:
            model.set_graph(self.train_users, self.train_indices)
        model.eval()
        return model.to(device)


def save_checkpoint(path: Path, *, model: torch.nn.Module, meta: dict, user_ids: np.ndarray, item_ids: np.ndarray,
                    train_indptr: np.ndarray, train_indices: np.ndarray, optimizer: torch.optim.Optimizer | dict | None = None,
                    rng_state: torch.Tensor | None = None, run_state: dict[str, torch.Tensor] | None = None) -> dict:
    """Atomically write a checkpoint; returns the metadata written (with its weights fingerprint). ``run_state``:
    tensors the objective carries between epochs (a resume checkpoint's), stored as ``state.<key>``."""
    tensors: dict[str, torch.Tensor] = {}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for k, v in state.items():
        tensors[f"model.{k}"] = v
    meta = dict(meta)
    meta["format_version"] = FORMAT_VERSION
    meta["model"] = {"kind": model.kind, **model.constructor_args()}
    meta["fingerprint"] = weights_fingerprint(state)
    if optimizer is not None:
        osd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()  # a state dict: gathered ranks
        for pid, pstate in osd["state"].items():
            for key, val in pstate.items():
                t = val if torch.is_tensor(val) else torch.tensor(val)
                tensors[f"optim.{pid}.{key}"] = t.detach().cpu().contiguous()
        meta["optim_param_groups"] = osd["param_groups"]
    if rng_state is not None:
        tensors["rng.torch"] = rng_state.cpu()
    for k, v in (run_state or {}).items():
        tensors[f"state.{k}"] = v.detach().cpu().contiguous()
    tensors["ids.users"] = _ids_to_tensor(user_ids)
    tensors["ids.items"] = _ids_to_tensor(item_ids)
    tensors["train.indptr"] = torch.as_tensor(np.asarray(train_indptr, dtype=np.int64))
    tensors["train.indices"] = torch.as_tensor(np.asarray(train_indices, dtype=np.int64))
    data = st_save(tensors, metadata={"compress": json.dumps(meta, default=_json_default)})
    atomic_write_bytes(Path(path), data)
    return meta


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def resolve_checkpoint_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        for name in (MODEL_FILE, RESUME_FILE):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{p}: directory holds no {MODEL_FILE} or {RESUME_FILE}")
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint not found")
    return p


def read_meta(path: str | Path) -> dict:
    """The compress metadata of a checkpoint file (or a run directory's model) without reading its tensors.

    {} when the file is missing or is not a compress checkpoint: callers use it for optional lineage."""
    try:
        p = resolve_checkpoint_path(path)
        with safe_open(str(p), framework="np") as f:
            return json.loads((f.metadata() or {}).get("compress", "{}"))
    except (CheckpointError, SafetensorError, OSError, json.JSONDecodeError):
        return {}


USER_TABLE = "user_emb.weight"  # the model parameter whose rows are users (sharded under torchrun)


def load_checkpoint(path: str | Path, with_training_state: bool = False, user_rows: tuple[int, int] | None = None,
                    user_optim_id: int | None = None) -> Checkpoint:
    """Load a checkpoint file, or a run directory's model. Refuses anything that is not a compress safetensors file.

    ``user_rows`` (lo, hi): read only those rows of the user table, and of its optimizer state ``optim.<user_optim_id>.*``
    (a torchrun rank's block: no rank holds every user's rows in memory, however large the table)."""
    p = resolve_checkpoint_path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
            if "compress" not in header:
                raise CheckpointError(f"{p}: not a compress checkpoint (safetensors file without 'compress' metadata)")
            meta = json.loads(header["compress"])
            keys = list(f.keys())
            row_keys = set()
            if user_rows is not None:
                row_keys = {f"model.{USER_TABLE}"} | ({k for k in keys if k.startswith(f"optim.{user_optim_id}.")
                                                and len(f.get_slice(k).get_shape()) > 0}
                                               if with_training_state and user_optim_id is not None else set())

            def get(k):
                return f.get_slice(k)[user_rows[0]:user_rows[1]] if k in row_keys else f.get_tensor(k)
            model_state = {k[len("model."):]: get(k) for k in keys if k.startswith("model.")}
            user_ids = _tensor_to_ids(get("ids.users"))
            item_ids = _tensor_to_ids(get("ids.items"))
            indptr = get("train.indptr").numpy()
            indices = get("train.indices").numpy()
            optim = rng = None
            run_state = {}
            if with_training_state:
                optim = {k: get(k) for k in keys if k.startswith("optim.")}
                rng = get("rng.torch") if "rng.torch" in keys else None
                run_state = {k[len("state."):]: get(k) for k in keys if k.startswith("state.")}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{p}: not a valid checkpoint (expected a safetensors file; "
                              f"pickled checkpoints are refused because they can run code): {e}") from None
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{p}: checkpoint is incomplete or corrupt ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{p}: checkpoint format {meta.get('format_version')} is not supported "
                              f"(this version reads {FORMAT_VERSION})")
    return Checkpoint(meta, model_state, user_ids, item_ids, indptr, indices, optim, rng, p, run_state)


def restore_optimizer(optimizer: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    """Load the Adam state saved by save_checkpoint into a freshly built optimizer."""
    state: dict[int, dict] = {}
    for key, val in (ckpt.optim_state or {}).items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = val
    optimizer.load_state_dict({"state": state, "param_groups": ckpt.meta["optim_param_groups"]})
