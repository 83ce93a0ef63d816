import os
import pickle

import numpy as np
import pytest
import torch

from compressor.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from compressor.models import MF, LightGCN


def _save(path, model, **kw):
    ids_u = np.array([f"user {i}" for i in range(model.num_users)])
    ids_i = np.array([f"item-é{i}" for i in range(model.num_items)])
    indptr = np.array([0, 2, 3, 5] + [5] * (model.num_users - 3), dtype=np.int64)
    indices = np.array([0, 1, 2, 3, 4], dtype=np.int64)
    meta = save_checkpoint(path, model=model, meta={"config": {"x": 1}, "metrics": {"test": {"ndcg@20": 0.5}}},
                           user_ids=ids_u, item_ids=ids_i, train_indptr=indptr, train_indices=indices, **kw)
    return meta, ids_u, ids_i


@pytest.mark.parametrize("cls,kw", [(MF, {}), (LightGCN, {"layers": 2})])
def test_round_trip_rebuilds_the_model_from_the_file_alone(tmp_path, cls, kw):
    model = cls(num_users=7, num_items=9, dim=4, **kw)
    if cls is LightGCN:
        model.set_graph(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 2, 3, 4]))
    meta, ids_u, ids_i = _save(tmp_path / "m.safetensors", model)
    ck = load_checkpoint(tmp_path / "m.safetensors")
    assert (ck.user_ids == ids_u).all() and (ck.item_ids == ids_i).all()
    assert ck.meta["metrics"]["test"]["ndcg@20"] == 0.5
    assert ck.meta["model"]["kind"] == cls.kind and ck.fingerprint == meta["fingerprint"]
    rebuilt = ck.build_model()
    with torch.no_grad():
        for a, b in zip(model.vectors(), rebuilt.vectors()):
            assert torch.equal(a, b)


def test_optimizer_state_round_trip(tmp_path):
    from compressor.checkpoint import restore_optimizer
    model = MF(5, 6, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.user_emb.weight.sum().backward()
    opt.step()
    _save(tmp_path / "r.safetensors", model, optimizer=opt, rng_state=torch.get_rng_state())
    ck = load_checkpoint(tmp_path / "r.safetensors", with_training_state=True)
    opt2 = torch.optim.Adam(MF(5, 6, 3).parameters(), lr=0.01)
    restore_optimizer(opt2, ck)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for pid in s1:
        for k in s1[pid]:
            assert torch.equal(torch.as_tensor(s1[pid][k]), torch.as_tensor(s2[pid][k]))


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


def test_pickled_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    for name in ("model.safetensors", "evil.pt"):
        path = tmp_path / name
        with open(path, "wb") as f:
            pickle.dump({"weights": _Evil()}, f)
        torch.save({"w": _Evil()}, tmp_path / "torch.pt")
        for p in (path, tmp_path / "torch.pt"):
            with pytest.raises(CheckpointError, match="refused|not a valid checkpoint"):
                load_checkpoint(p)
    # loading a run directory whose model file is a pickle is refused too
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path)
    assert not marker.exists(), "loading a checkpoint executed code"


def test_atomic_write_keeps_previous_checkpoint_on_failure(tmp_path, monkeypatch):
    model = MF(5, 6, 3)
    path = tmp_path / "m.safetensors"
    first, *_ = _save(path, model)
    with torch.no_grad():
        model.user_emb.weight.add_(1.0)

    def boom(*a, **k):
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        _save(path, model)
    monkeypatch.undo()
    assert load_checkpoint(path).fingerprint == first["fingerprint"]
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    _save(tmp_path / "m.safetensors", MF(5, 6, 3))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="m.safetensors"):
        load_checkpoint(tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
