"""Behavioural scorers fit on interactions: popularity, item-kNN (cosine on the user-item matrix, scikit-learn)
and matrix factorisation (`implicit`'s ALS). Each scores (history, candidate item indices) -> one float per
candidate, so a user seen in training and a cold-start history are scored the same way."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from pagellm.apps.recommend.data import Interaction

RECENT_ITEMS = 5  # the "recent" kNN score looks at a user's last 5 items


def interaction_matrix(interactions: Sequence[Interaction], user_index: dict[str, int], item_index: dict[str, int],
                       num_items: int) -> sparse.csr_matrix:
    """Binary users x items matrix (an interaction is a watch, whatever the rating)."""
    rows = [user_index[e.user_id] for e in interactions]
    cols = [item_index[e.item_id] for e in interactions]
    m = sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(user_index), num_items))
    m.data[:] = 1.0  # NOTE: a repeated (user, item) pair sums to 2 in the constructor; a watch is a watch
    return m


def history_matrix(histories: Sequence[Sequence[int]], num_items: int) -> sparse.csr_matrix:
    rows = [r for r, h in enumerate(histories) for _ in h]
    cols = [i for h in histories for i in h]
    m = sparse.csr_matrix((np.ones(len(cols), dtype=np.float32), (rows, cols)), shape=(len(histories), num_items))
    m.data[:] = 1.0
    return m


@dataclass
class BehaviourModel:
    """Popularity counts, the item-item cosine matrix and the ALS item factors of one interaction set."""

    popularity: np.ndarray  # [num_items] interaction counts
    recent_popularity: np.ndarray  # [num_items] counts in the last 10% of the time span
    item_sim: np.ndarray  # [num_items, num_items] cosine of item columns, diagonal 0
    mf: object  # implicit.cpu.als.AlternatingLeastSquares

    @classmethod
    def fit(cls, interactions: Sequence[Interaction], item_index: dict[str, int], num_items: int,
            factors: int = 16, iterations: int = 15, regularization: float = 0.1, seed: int = 0) -> BehaviourModel:
        from implicit.als import AlternatingLeastSquares
        from sklearn.metrics.pairwise import cosine_similarity

        users = sorted({e.user_id for e in interactions})
        matrix = interaction_matrix(interactions, {u: i for i, u in enumerate(users)}, item_index, num_items)
        popularity = np.asarray(matrix.sum(axis=0)).ravel()
        stamps = np.array([e.timestamp for e in interactions])
        cut = np.quantile(stamps, 0.9)
        recent = np.zeros(num_items)
        for e, t in zip(interactions, stamps):
            if t >= cut:
                recent[item_index[e.item_id]] += 1
        sim = cosine_similarity(matrix.T, dense_output=True).astype(np.float32)
        np.fill_diagonal(sim, 0.0)
        mf = AlternatingLeastSquares(factors=factors, iterations=iterations, regularization=regularization,
                                     random_state=seed, calculate_training_loss=False)
        mf.fit(matrix, show_progress=False)
        return cls(popularity, recent, sim, mf)

    # ---- scores: one row per history, one column per candidate ---------------------------------------
    def popularity_scores(self, candidates: Sequence[Sequence[int]]) -> np.ndarray:
        return self.popularity[np.asarray(candidates)].astype(np.float32)

    def knn_scores(self, histories: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
                   last: int | None = None) -> np.ndarray:
        """Sum of the candidate's cosine to each history item (the last `last` items only, when given)."""
        out = np.zeros((len(histories), len(candidates[0])), dtype=np.float32)
        for r, (hist, cands) in enumerate(zip(histories, candidates)):
            hist = list(hist)[-last:] if last else list(hist)
            if hist:
                out[r] = self.item_sim[np.ix_(hist, list(cands))].sum(axis=0)
        return out

    def mf_scores(self, histories: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]]) -> np.ndarray:
        """ALS user factors solved from the history (implicit's recalculate_user), dot the item factors."""
        rows = history_matrix(histories, self.popularity.shape[0])
        users = np.asarray(self.mf.recalculate_user(np.arange(len(histories)), rows)).reshape(len(histories), -1)
        items = np.asarray(self.mf.item_factors)[np.asarray(candidates)]  # [users, candidates, factors]
        return np.einsum("uf,ucf->uc", users, items).astype(np.float32)

    def knn_contributions(self, history: Sequence[int], item: int) -> np.ndarray:
        return self.item_sim[list(history), item]
