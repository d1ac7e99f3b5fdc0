"""The linear safety probe: fitting, threshold, figures, feature choice, and writing it into the graph.

The probe is an L2-regularised, class-balanced logistic regression (scikit-learn) on standardised
features. Its regularisation strength C is chosen by stratified, group-aware K-fold cross-validation
on the calibration split (groups keep a prompt and its form twins / typographic renderings in the
same fold, as the calibration/held-out split does). The standardisation is then folded into the
linear weights, so the graph's `ProbeHead` (one Linear + sigmoid) computes sklearn's
`predict_proba[:, 1]` with no extra ops.

Speed without approximation: with many more features than prompts (logits have one per vocabulary
entry), an L2-penalised linear model's weights lie in the span of the (standardised) training rows,
so the fit is done in an orthonormal basis of that span (`RowSpace`): same optimum, n x n instead of
n x V. The basis is folded into the weights with the standardisation.

The decision threshold is not chosen here: calibration sets it on scores the probe never fitted
(`probes.thresholds.unseen_source_threshold`: each prompt scored by a probe fitted without its source, its
out-of-fold score from here where that leaves one class). In-sample scores of a probe with more features
than prompts separate almost perfectly and would put the threshold where new benign prompts are flagged
far more often than the target rate. Held-out data is used for neither the fit, nor C, nor the threshold:
only for the figures.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from sasa_patcher.modeling_sasa import PROBE_FEATURES, default_probe_layers
from sasa_patcher.probes.features import image_sha256

DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-5, 2, 8))
DEFAULT_FOLDS = 5
DEFAULT_SEED = 0
MAX_ITER = 5000


# ----- the estimator --------------------------------------------------------------------------------
class RowSpace(TransformerMixin, BaseEstimator):
    """Coordinates in an orthonormal basis of the training rows' span (identity when d <= n).

    For an L2-penalised linear model with an unpenalised intercept this changes nothing but speed:
    the optimal weights lie in the span of the training rows, and an orthonormal basis keeps both the
    scores and the penalty ||w||^2 as they are. `basis_` is [d, r] (or None for identity).
    """

    def __init__(self, rtol: float = 1e-10):
        self.rtol = rtol

    def fit(self, X, y=None):
        X = np.asarray(X, dtype=np.float64)
        n, d = X.shape
        if d <= n:
            self.basis_ = None
            return self
        gram = X @ X.T
        eigenvalues, eigenvectors = np.linalg.eigh(gram)
        keep = eigenvalues > self.rtol * max(float(eigenvalues.max()), 1e-300)
        self.basis_ = X.T @ (eigenvectors[:, keep] / np.sqrt(eigenvalues[keep]))
        return self

    def transform(self, X):
        X = np.asarray(X, dtype=np.float64)
        return X if self.basis_ is None else X @ self.basis_


def make_estimator(C: float = 1.0, seed: int = DEFAULT_SEED) -> Pipeline:
    """StandardScaler -> RowSpace -> class-balanced L2 logistic regression (lbfgs)."""
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("rowspace", RowSpace()),
            (
                "logistic",
                LogisticRegression(
                    C=C, class_weight="balanced", max_iter=MAX_ITER, tol=1e-6, random_state=seed
                ),
            ),
        ]
    )


def fold_linear(pipeline: Pipeline) -> tuple[np.ndarray, float]:
    """The fitted pipeline as one linear map on raw features: (weight [d], bias), float64.

    z = u . (V^T ((x - mu) / sigma)) + c  =  w . x + b  with  w = (V u) / sigma,  b = c - w . mu.
    """
    scaler: StandardScaler = pipeline.named_steps["scale"]
    rowspace: RowSpace = pipeline.named_steps["rowspace"]
    logistic: LogisticRegression = pipeline.named_steps["logistic"]
    u = logistic.coef_[0].astype(np.float64)
    direction = u if rowspace.basis_ is None else rowspace.basis_ @ u
    weight = direction / scaler.scale_
    bias = float(logistic.intercept_[0] - weight @ scaler.mean_)
    return weight, bias


@contextlib.contextmanager
def quiet_fit() -> Iterator[None]:
    """One BLAS thread and no convergence warnings while fitting.

    lbfgs on these small problems is dominated by BLAS thread start-up: measured here, a 34 x 34 fit
    took 0.10 s with two OpenBLAS threads and 0.007 s with one. Hitting `MAX_ITER` (rare, at the
    weakest penalties of the C grid) only costs those C values their CV score, so it stays quiet.
    """
    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def _as_numpy(X) -> np.ndarray:
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    return np.asarray(X, dtype=np.float64)


# ----- cross-validation and fitting ----------------------------------------------------------------
def cv_splits(
    labels: np.ndarray, groups: Sequence | None, folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified (and, with groups, group-aware) shuffled folds; fewer folds if a class is small."""
    labels = np.asarray(labels)
    if groups is not None:
        _, group_ids = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
        smallest = min(len(np.unique(group_ids[labels == value])) for value in (0, 1))
    else:
        group_ids = None
        smallest = min(int((labels == value).sum()) for value in (0, 1))
    n_splits = min(folds, smallest)
    if n_splits < 2:
        raise ValueError(f"need at least 2 prompts (groups) of each class for cross-validation, got {smallest}")
    dummy = np.zeros(len(labels))
    if group_ids is not None:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return list(splitter.split(dummy, labels, group_ids))
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(splitter.split(dummy, labels))


@dataclass
class CVResult:
    """Cross-validation over the C grid: mean fold AUROC per C and out-of-fold scores per C."""

    Cs: list[float]
    auroc_by_C: list[float]
    oof_scores: np.ndarray  # [len(Cs), N] probabilities
    n_splits: int

    @property
    def best_index(self) -> int:
        """Highest mean AUROC; ties go to the smaller C (stronger regularisation)."""
        return int(np.argmax(np.round(self.auroc_by_C, 12)))


def cross_validate(
    X, labels, groups: Sequence | None = None, *, Cs: Sequence[float] = DEFAULT_CS,
    folds: int = DEFAULT_FOLDS, seed: int = DEFAULT_SEED,
) -> CVResult:
    """Mean fold AUROC and out-of-fold probabilities for every C (scaler and basis fit once per fold)."""
    X, labels = _as_numpy(X), np.asarray(labels, dtype=np.int64)
    Cs = sorted(float(c) for c in Cs)
    splits = cv_splits(labels, groups, folds, seed)
    oof = np.zeros((len(Cs), len(labels)))
    fold_aurocs = np.zeros((len(Cs), len(splits)))
    for fold, (train, test) in enumerate(splits):
        transform = Pipeline([("scale", StandardScaler()), ("rowspace", RowSpace())]).fit(X[train])
        z_train, z_test = transform.transform(X[train]), transform.transform(X[test])
        logistic = clone(make_estimator(seed=seed).named_steps["logistic"]).set_params(warm_start=True)
        for index, C in enumerate(Cs):
            logistic.set_params(C=C)
            with quiet_fit():
                logistic.fit(z_train, labels[train])
                scores = logistic.predict_proba(z_test)[:, 1]
            oof[index, test] = scores
            fold_aurocs[index, fold] = roc_auc_score(labels[test], scores)
    return CVResult(Cs=Cs, auroc_by_C=fold_aurocs.mean(1).tolist(), oof_scores=oof, n_splits=len(splits))


@dataclass
class ProbeFit:
    """A fitted probe: the sklearn pipeline, its folded linear form, and how C was chosen."""

    pipeline: Pipeline
    weight: np.ndarray  # [d] float64, acts on raw features
    bias: float
    C: float
    cv_auroc: float  # mean fold AUROC at the chosen C
    cv: CVResult

    @property
    def oof_scores(self) -> np.ndarray:
        """Out-of-fold calibration probabilities at the chosen C (what the threshold is chosen on)."""
        return self.cv.oof_scores[self.cv.best_index]

    def predict_proba(self, X) -> np.ndarray:
        """P(harmful) from the folded linear form, float64 (equals the pipeline's predict_proba)."""
        return 1.0 / (1.0 + np.exp(-(_as_numpy(X) @ self.weight + self.bias)))


def fit_probe(
    X, labels, groups: Sequence | None = None, *, Cs: Sequence[float] = DEFAULT_CS,
    folds: int = DEFAULT_FOLDS, seed: int = DEFAULT_SEED, cv: CVResult | None = None,
) -> ProbeFit:
    """Choose C by cross-validated AUROC (or take it from `cv`), then refit on all of X."""
    X, labels = _as_numpy(X), np.asarray(labels, dtype=np.int64)
    if set(np.unique(labels)) != {0, 1}:
        raise ValueError("the probe needs both benign (0) and harmful (1) prompts")
    cv = cv or cross_validate(X, labels, groups, Cs=Cs, folds=folds, seed=seed)
    C = cv.Cs[cv.best_index]
    pipeline = make_estimator(C, seed)
    with quiet_fit():
        pipeline.fit(X, labels)
    weight, bias = fold_linear(pipeline)
    return ProbeFit(pipeline=pipeline, weight=weight, bias=bias, C=C, cv_auroc=cv.auroc_by_C[cv.best_index], cv=cv)


# ----- threshold and figures ------------------------------------------------------------------------
def operating_point(scores, labels, threshold: float) -> dict:
    """AUROC, and TPR / FPR of `score > threshold`, with the counts they come from."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    flagged = scores > threshold
    positives, negatives = labels == 1, labels == 0
    both = positives.any() and negatives.any()
    return {
        "auroc": float(roc_auc_score(labels, scores)) if both else None,
        "tpr": float(flagged[positives].mean()) if positives.any() else None,
        "fpr": float(flagged[negatives].mean()) if negatives.any() else None,
        "n_harmful": int(positives.sum()),
        "n_benign": int(negatives.sum()),
    }


# ----- feature choice ---------------------------------------------------------------------------------
@dataclass
class FeatureChoice:
    """The chosen feature, and every candidate's cross-validated figure (and fit)."""

    name: str
    figures: dict[str, dict]  # name -> {"cv_auroc", "C", "dim"}
    cvs: dict[str, CVResult] = field(default_factory=dict)


def select_feature(
    candidates: dict[str, object], labels, groups: Sequence | None = None, *, Cs: Sequence[float] = DEFAULT_CS,
    folds: int = DEFAULT_FOLDS, seed: int = DEFAULT_SEED,
) -> FeatureChoice:
    """Cross-validate a probe on every candidate; pick the highest CV AUROC.

    Ties go to the earlier name in `PROBE_FEATURES` (the paper's `projected-logits` first). The same
    folds are used for every candidate.
    """
    names = sorted(candidates, key=lambda name: PROBE_FEATURES.index(name) if name in PROBE_FEATURES else 99)
    figures, cvs = {}, {}
    for name in names:
        X = _as_numpy(candidates[name])
        cv = cross_validate(X, labels, groups, Cs=Cs, folds=folds, seed=seed)
        cvs[name] = cv
        figures[name] = {"cv_auroc": cv.auroc_by_C[cv.best_index], "C": cv.Cs[cv.best_index], "dim": X.shape[1]}
    best = max(names, key=lambda name: (round(figures[name]["cv_auroc"], 12), -names.index(name)))
    return FeatureChoice(name=best, figures=figures, cvs=cvs)


# ----- digest and writing into the model --------------------------------------------------------------
def data_digest(prompts: Sequence) -> str:
    """sha256 over the sorted (text, label, image sha256) records: order-independent, content-exact."""
    records = sorted(
        json.dumps([p.text, int(p.label), image_sha256(getattr(p, "image", None))], ensure_ascii=False)
        for p in prompts
    )
    digest = hashlib.sha256()
    for record in records:
        digest.update(record.encode("utf-8") + b"\n")
    return digest.hexdigest()


def write_probe(
    model, fit: ProbeFit, *, feature: str, threshold: float, layers: tuple[int, int] | None = None,
    metrics: dict | None = None, probe_layers: Sequence[int] | None = None,
):
    """Put the probe (folded weights, threshold) and settings into the patched model; return the settings.

    A feature of another width than the current probe's re-creates the SASA modules (`init_sasa`),
    keeping the semantic map's weights. The settings' `metrics` are replaced by `metrics`.
    `probe_layers` (the multi-layer feature's layers) defaults to the model's, else `default_probe_layers`.
    """
    s, f = layers if layers is not None else (model.sasa.safety_layer, model.sasa.semantic_layer)
    if probe_layers is None:
        num_layers = model.config.get_text_config().num_hidden_layers
        probe_layers = model.sasa.probe_layers or default_probe_layers(num_layers)
    settings = replace(
        model.sasa, safety_layer=int(s), semantic_layer=int(f), probe_features=feature,
        probe_layers=[int(layer) for layer in probe_layers],
        threshold=float(threshold), metrics=dict(metrics or {}),
    )
    if feature != model.sasa.probe_features or settings.probe_layers != list(model.sasa.probe_layers):
        semantic = model.sasa_semantic_map.weight.detach().clone()
        model.init_sasa(settings)
        with torch.no_grad():
            model.sasa_semantic_map.weight.copy_(semantic)
    else:
        model.set_sasa(settings)
    linear = model.sasa_probe.linear
    if linear.weight.shape[1] != fit.weight.shape[0]:
        raise ValueError(
            f"probe fitted on {fit.weight.shape[0]} features, the {feature!r} head takes {linear.weight.shape[1]}"
        )
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(fit.weight, dtype=linear.weight.dtype).reshape(1, -1))
        linear.bias.fill_(fit.bias)
        model.sasa_probe.threshold.fill_(float(threshold))
    return settings


@torch.no_grad()
def graph_scores(model, X) -> np.ndarray:
    """P(harmful) exactly as the patched graph's probe head computes it (float32)."""
    probe = model.sasa_probe
    device = probe.linear.weight.device
    return probe(torch.as_tensor(_as_numpy(X), dtype=torch.float32, device=device)).double().cpu().numpy()
