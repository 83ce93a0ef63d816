"""Two-tower recommenders: score(u, i) = <user_vector(u), item_vector(i)>, so top-K is an inner-product search.

Models are built from plain numbers (counts, dim, layers, init std) so a checkpoint alone can rebuild them.
LightGCN and the history tower additionally need the training interactions (``needs_graph``: ``set_graph``),
which the checkpoint carries as the training CSR.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

class MF(nn.Module):
    """Matrix factorisation: the user and item vectors are free embeddings."""

    kind = "mf"
    needs_graph = False
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
    needs_graph = True
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


class HistoryPool(nn.Module):
    """A user tower computed from the user's items: the mean of the embeddings of its most recent ``max_len``
    items (``history_emb``), plus a residual two-layer MLP of that mean. Item vectors are a table of their own
    (``item_emb``), so an item's role as evidence and as a candidate are learnt separately.

    No user has parameters: a user never seen in training is served from the history a request brings
    (``encode``, the computation the exported ONNX graph performs). Training users' histories are their
    training items in split order (``set_graph``); ``bpr_user_vectors`` leaves the predicted item out of its
    own history, so the model is never taught to copy its input.
    """

    kind = "history"
    needs_graph = True
    leaf_tables = False  # user vectors pool item rows through an MLP: every step reaches the MLP and many rows

    def __init__(self, num_users: int, num_items: int, dim: int, max_len: int = 50, hidden: int = 64,
                 init_std: float = 0.01):
        super().__init__()
        self.num_users, self.num_items, self.dim = num_users, num_items, dim
        self.max_len, self.hidden, self.init_std = max_len, hidden, init_std
        self.history_emb = nn.Embedding(num_items, dim)
        self.item_emb = nn.Embedding(num_items, dim)
        nn.init.normal_(self.history_emb.weight, std=init_std)
        nn.init.normal_(self.item_emb.weight, std=init_std)
        self.mlp_in = nn.Linear(dim, hidden)
        self.mlp_out = nn.Linear(hidden, dim)
        for layer in (self.mlp_in, self.mlp_out):  # zero biases: an empty history starts at the zero vector
            nn.init.zeros_(layer.bias)
        # the training histories (set_graph): every user's window as flat (indptr [U + 1], items) in split order,
        # and the sorted keys user * I + item of its entries (to find a BPR positive in its own window)
        self.window_indptr: torch.Tensor | None = None
        self.window_items: torch.Tensor | None = None
        self.window_keys: torch.Tensor | None = None

    def constructor_args(self) -> dict:
        return {"num_users": self.num_users, "num_items": self.num_items, "dim": self.dim,
                "max_len": self.max_len, "hidden": self.hidden, "init_std": self.init_std}

    def set_graph(self, train_users: np.ndarray, train_items: np.ndarray) -> None:
        """Every user's history: its training items in the order given (split order, oldest first), the most
        recent ``max_len`` kept. ``train_users`` must be sorted (a ``Split``'s pairs are)."""
        users, items = window_pairs(np.asarray(train_users), np.asarray(train_items), self.num_users, self.max_len)
        device = self.item_emb.weight.device
        u, i = torch.as_tensor(users, dtype=torch.long), torch.as_tensor(items, dtype=torch.long)
        counts = torch.bincount(u, minlength=self.num_users)
        self.window_indptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)]).to(device)
        self.window_items = i.to(device)
        self.window_keys = torch.sort(u * self.num_items + i).values.to(device)

    def _apply(self, fn, *args, **kwargs):  # keep the (non-parameter) histories on the model's device
        super()._apply(fn, *args, **kwargs)
        for name in ("window_indptr", "window_items", "window_keys"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))
        return self

    def user_from_pooled(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """User vectors [n, d] from the sums [n, d] of their history embeddings and the history lengths [n]
        (an empty history pools to zeros)."""
        mean = sums / counts.clamp(min=1).to(sums.dtype).unsqueeze(1)
        return mean + self.mlp_out(torch.relu(self.mlp_in(mean)))

    def encode(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """User vectors [b, d] of padded histories: ``history`` [b, L] item indices (L <= max_len; entries at
        and beyond a row's length are padding, any valid index), ``lengths`` [b]. What the ONNX graph computes."""
        mask = torch.arange(history.shape[1], device=history.device).unsqueeze(0) < lengths.unsqueeze(1)
        sums = (self.history_emb(history) * mask.unsqueeze(2).to(self.history_emb.weight.dtype)).sum(1)
        return self.user_from_pooled(sums, lengths)

    def _window_sums(self, users: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums [n, d] of the history embeddings of each user's window, window lengths [n]) for ``users``
        (None: every user), one bag per user."""
        if self.window_indptr is None:
            raise RuntimeError("HistoryPool.set_graph(train_users, train_items) must be called before vectors()")
        indptr, items = self.window_indptr, self.window_items
        if users is None:
            starts, counts = indptr[:-1], indptr[1:] - indptr[:-1]
            return F.embedding_bag(items, self.history_emb.weight, starts, mode="sum"), counts
        starts, counts = indptr[users], indptr[users + 1] - indptr[users]
        offsets = torch.cumsum(counts, 0) - counts
        flat = torch.repeat_interleave(starts - offsets, counts) + torch.arange(int(counts.sum()), device=counts.device)
        return F.embedding_bag(items[flat], self.history_emb.weight, offsets, mode="sum"), counts

    def vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every training user's vector from its whole (windowed) history [U, d], and the item vectors [I, d]."""
        return self.user_from_pooled(*self._window_sums(None)), self.item_emb.weight

    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        """The vectors [b, d] of ``users`` from their whole windows (only those users are computed)."""
        return self.user_from_pooled(*self._window_sums(users))

    def bpr_user_vectors(self, users: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The vectors [b] of ``users`` computed from their histories with the positive ``pos`` [b] left out
        (when it is in the window): the item a pair predicts is never part of its own input."""
        sums, counts = self._window_sums(users)
        keys = users * self.num_items + pos
        where = torch.searchsorted(self.window_keys, keys).clamp(max=max(len(self.window_keys) - 1, 0))
        inside = self.window_keys[where] == keys
        sums = sums - inside.to(sums.dtype).unsqueeze(1) * self.history_emb(pos)
        return self.user_from_pooled(sums, counts - inside.long())

    def batch_vectors(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, i = self.vectors()
        return u[users], i[items]


def window_pairs(users: np.ndarray, items: np.ndarray, num_users: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The (user, item) pairs of each user's last ``max_len`` items, order kept; ``users`` sorted."""
    counts = np.bincount(users, minlength=num_users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(len(users)) - starts[users]
    keep = position >= counts[users] - max_len
    return users[keep], items[keep]


def padded_histories(indptr: np.ndarray, items: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR histories (oldest first) -> (history [n, L] int64 right-padded with 0, lengths [n] int64), the last
    ``max_len`` items of each row kept; L = the longest kept row (at least 1)."""
    n = len(indptr) - 1
    lengths = np.minimum(np.diff(indptr), max_len).astype(np.int64)
    out = np.zeros((n, max(int(lengths.max(initial=0)), 1)), dtype=np.int64)
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    src = np.repeat(indptr[1:] - lengths, lengths) + cols
    out[rows, cols] = items[src]
    return out, lengths


MODELS: dict[str, type[nn.Module]] = {"mf": MF, "lightgcn": LightGCN, "history": HistoryPool}
MODEL_KINDS = tuple(MODELS)  # model.kind's choices
# every constructor number of every kind: build_model takes any of them (each kind its own) and refuses others
MODEL_NUMBERS = {name for cls in MODELS.values() for name in inspect.signature(cls).parameters}


def build_model(kind: str, **args) -> nn.Module:
    """A model of ``kind`` from its constructor numbers; numbers another kind takes (``layers`` is LightGCN's,
    ``max_len`` the history tower's ...) are ignored."""
    if kind not in MODELS:
        raise ValueError(f"model.kind: unknown model {kind!r} (expected one of {', '.join(MODEL_KINDS)})")
    unknown = set(args) - MODEL_NUMBERS
    if unknown:
        raise TypeError(f"build_model: unknown model number(s) {sorted(unknown)} (known: {sorted(MODEL_NUMBERS)})")
    accepted = inspect.signature(MODELS[kind]).parameters
    return MODELS[kind](**{k: v for k, v in args.items() if k in accepted})
