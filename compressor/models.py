"""Two-tower recommenders: score(u, i) = <user_vector(u), item_vector(i)>, so top-K is an inner-product search.

Models are built from plain numbers (counts, dim, layers, init std) so a checkpoint alone can rebuild them.
LightGCN additionally needs the training graph, which the checkpoint carries as the training CSR.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

class MF(nn.Module):
    """Matrix factorisation: the user and item vectors are free embeddings."""

    kind = "mf"
    # vectors() are the embedding tables themselves (leaf parameters): a batch can gather its rows with sparse
    # gradients, which a row-sparse optimizer (optim.LazyAdam) then updates alone.
    leaf_tables = True

    def __init__(self, num_users: int, num_items: int, dim: int, init_std: float = 0.01):
        super().__init__()
        self.num_users, self.num_items, self.dim, self.init_std = num_users, num_items, dim, init_std
        self.user_emb = nn.Embedding(num_users, dim)
        self.item_emb = nn.Embedding(num_items, dim)
        nn.init.normal_(self.user_emb.weight, std=init_std)
        nn.init.normal_(self.item_emb.weight, std=init_std)

    def constructor_args(self) -> dict:
        return {"num_users": self.num_users, "num_items": self.num_items, "dim": self.dim, "init_std": self.init_std}

    def vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All user vectors [U, d] and item vectors [I, d]."""
        return self.user_emb.weight, self.item_emb.weight

    def batch_vectors(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectors of the given users and items only (cheap for MF; no full propagation)."""
        return self.user_emb(users), self.item_emb(items)


class LightGCN(nn.Module):
    """LightGCN (He et al., 2020): layer-averaged propagation of embeddings over the normalised bipartite graph.

    ``set_graph`` must be called with the training interactions before ``vectors``; the propagated vectors are
    the model's user/item vectors (what export bakes into the ONNX user tower).
    """

    kind = "lightgcn"
    leaf_tables = False  # vectors() are propagated through the graph: their gradients reach every row

    def __init__(self, num_users: int, num_items: int, dim: int, layers: int = 3, init_std: float = 0.1):
        super().__init__()
        self.num_users, self.num_items, self.dim = num_users, num_items, dim
        self.layers, self.init_std = layers, init_std
        self.user_emb = nn.Embedding(num_users, dim)
        self.item_emb = nn.Embedding(num_items, dim)
        nn.init.normal_(self.user_emb.weight, std=init_std)
        nn.init.normal_(self.item_emb.weight, std=init_std)
        self.adj: torch.Tensor | None = None

    def constructor_args(self) -> dict:
        return {"num_users": self.num_users, "num_items": self.num_items, "dim": self.dim,
                "layers": self.layers, "init_std": self.init_std}

    def set_graph(self, train_users: np.ndarray, train_items: np.ndarray) -> None:
        """Build D^-1/2 A D^-1/2 of the user-item bipartite graph as a sparse CSR tensor."""
        n = self.num_users + self.num_items
        u = torch.as_tensor(train_users, dtype=torch.long)
        i = torch.as_tensor(train_items, dtype=torch.long) + self.num_users
        rows = torch.cat([u, i])
        cols = torch.cat([i, u])
        deg = torch.bincount(rows, minlength=n).float()
        dinv = deg.pow(-0.5)
        dinv[torch.isinf(dinv)] = 0.0
        vals = dinv[rows] * dinv[cols]
        adj = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, n), check_invariants=False).coalesce()
        with warnings.catch_warnings():  # CSR is "beta" in torch, but it is the fast layout for spmm on CPU
            warnings.simplefilter("ignore", UserWarning)
            self.adj = adj.to_sparse_csr().to(self.user_emb.weight.device)

    def _apply(self, fn, *args, **kwargs):  # keep the (non-parameter) graph on the model's device
        super()._apply(fn, *args, **kwargs)
        if self.adj is not None:
            self.adj = fn(self.adj)
        return self

    def vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.adj is None:
            raise RuntimeError("LightGCN.set_graph(train_users, train_items) must be called before vectors()")
        x = torch.cat([self.user_emb.weight, self.item_emb.weight])
        total = x
        for _ in range(self.layers):
            x = torch.sparse.mm(self.adj, x)
            total = total + x
        out = total / (self.layers + 1)
        return out[: self.num_users], out[self.num_users:]

    def batch_vectors(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, i = self.vectors()
        return u[users], i[items]


MODELS: dict[str, type[nn.Module]] = {"mf": MF, "lightgcn": LightGCN}
MODEL_KINDS = tuple(MODELS)  # model.kind's choices


def build_model(kind: str, **args) -> nn.Module:
    """A model of ``kind`` from its constructor numbers (``layers`` is LightGCN's and ignored for MF)."""
    if kind not in MODELS:
        raise ValueError(f"model.kind: unknown model {kind!r} (expected one of {', '.join(MODEL_KINDS)})")
    if kind == "mf":
        args.pop("layers", None)
    return MODELS[kind](**args)
