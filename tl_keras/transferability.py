"""How well a frozen feature set predicts the labels, without training: LogME,
H-score and leave-one-out k-NN. Pure numpy; the regime advisor's scores (advise.py).

LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for
Transfer Learning", ICML 2021) is the evidence (marginal likelihood per example)
of a Bayesian linear model from the features to the 0/1 targets: one
eigendecomposition per feature set. H-score (Bao et al., ICIP 2019) is the cheap
cross-check; k-NN a plain, strong score of frozen features.

Labels are class indices [N] (one per image) or 0/1 vectors [N, classes] (several per
image, task=multi_label). The targets are the same kind of thing either way: one 0/1
column per class (`targets`), so LogME -- the mean of each column's evidence -- reads
the same on both (LogME's paper scores multi-target data this way). H-score is the
mean of each label's own (present / absent) H-score, k-NN is scored by mAP
(`mean_average_precision`, scikit-learn's average precision, with sample weights for
a bootstrap) where an image has several labels.

Example:
    logme(features, labels), h_score(features, labels), knn_score(features, labels)
"""

import math

import numpy as np


def _vectors(labels):
    """Whether `labels` are 0/1 vectors [N, classes] (several per image), not indices."""
    return np.ndim(labels) == 2 and np.shape(labels)[1] > 1


def targets(labels):
    """The 0/1 columns the scores fit, [N, K]: of class indices, one per class present
    (1 where the label is that class); of label vectors [N, classes], the vectors."""
    if _vectors(labels):
        return (np.asarray(labels) > 0.5).astype("float64")
    labels = np.asarray(labels).reshape(-1)
    return (labels[:, None] == np.unique(labels)[None, :]).astype("float64")


def logme(features, labels):
    """LogME of `features` [N, D] for `labels` (class indices [N] or 0/1 vectors
    [N, classes]): the log evidence per example.

    For each column y of `targets(labels)`, the evidence of y under
    y = F w + noise, w ~ N(0, 1/alpha), noise ~ N(0, 1/beta), with alpha and
    beta set to their maximum-evidence values by MacKay's fixed-point updates;
    the mean over columns, divided by N. Higher is better; comparable across
    feature sets of different dimension.
    """
    f = np.asarray(features, "float64")
    n, d = f.shape
    sigma, project = _spectrum(f)
    evidences = []
    for y in targets(labels).T:
        x2 = project(y) ** 2                         # y in the basis of F's left vectors
        outside = max(float(y @ y - x2.sum()), 0.0)  # the part of y no weights reach
        evidences.append(_evidence(sigma, x2, outside, n, d))
    return float(np.mean(evidences)) / n


def _spectrum(f):
    """(sigma, project): the nonzero eigenvalues of F^T F (squared singular values of F)
    and y -> U^T y for F's left singular vectors U, from the smaller of the two Gram
    matrices (an eigendecomposition of min(N, D) x min(N, D): faster than an SVD)."""
    n, d = f.shape
    gram = f @ f.T if n <= d else f.T @ f
    sigma, vectors = np.linalg.eigh(gram)
    keep = sigma > max(sigma.max(), 0) * 1e-10 * max(n, d)
    sigma, vectors = sigma[keep], vectors[:, keep]
    if n <= d:  # the eigenvectors of F F^T are U
        return sigma, lambda y: vectors.T @ y
    scale = 1 / np.sqrt(sigma)  # U = F V / s
    return sigma, lambda y: (vectors.T @ (f.T @ y)) * scale


def _fit(sigma, x2, outside, n, iterations=100):
    """(alpha, beta) of maximum evidence: MacKay's fixed point, from 1, 1."""
    alpha, beta = 1.0, 1.0
    for _ in range(iterations):
        t = alpha / beta
        gamma = float((sigma / (sigma + t)).sum())
        m2 = float((sigma * x2 / (sigma + t) ** 2).sum())           # |m|^2
        res2 = float((x2 * (t / (sigma + t)) ** 2).sum()) + outside  # |F m - y|^2
        alpha = gamma / (m2 + 1e-12)
        beta = (n - gamma) / (res2 + 1e-12)
        if abs(alpha / beta - t) <= 1e-6 * t:
            break
    return alpha, beta


def _evidence(sigma, x2, outside, n, d):
    """log p(y | alpha, beta) at the maximum-evidence alpha, beta (You et al., eq. 2)."""
    alpha, beta = _fit(sigma, x2, outside, n)
    t = alpha / beta
    m2 = float((sigma * x2 / (sigma + t) ** 2).sum())
    res2 = float((x2 * (t / (sigma + t)) ** 2).sum()) + outside
    log_det = float(np.log(alpha + beta * sigma).sum()) + (d - len(sigma)) * math.log(alpha)
    return (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - alpha / 2 * m2
            - beta / 2 * res2 - log_det / 2 - n / 2 * math.log(2 * math.pi))


def h_score(features, labels, shrinkage=1e-3):
    """H-score (Bao et al. 2019): tr(cov(f)^-1 cov(E[f | y])), f standardised;
    `shrinkage` x the mean variance is added to cov(f)'s diagonal for stability. Of
    label vectors: each label's H-score (y: present or absent), averaged over labels."""
    f = np.asarray(features, "float64")
    f = f - f.mean(axis=0)
    cov = f.T @ f / len(f)
    cov += shrinkage * max(np.trace(cov) / len(cov), 1e-12) * np.eye(len(cov))
    columns = targets(labels)
    several = _vectors(labels)
    groups = np.concatenate([columns, 1 - columns], axis=1) if several else columns
    counts = groups.sum(axis=0)
    means = groups.T @ f / np.maximum(counts, 1)[:, None]  # E[f | group], one row each
    # cov(E[f | y]) = sum over groups of (n_group / n) mean mean^T: its trace against
    # cov^-1 is one solve for every group at once.
    between = counts * np.einsum("gd,dg->g", means, np.linalg.solve(cov, means.T)) / len(f)
    return float(between.sum() / (columns.shape[1] if several else 1))


def knn_score(features, labels, k=5):
    """Leave-one-out k-NN of `features`: accuracy of class indices (`knn_accuracy`);
    of label vectors, mAP of each image's labels scored by the share of its `k` nearest
    other images holding them (`knn_map`)."""
    if _vectors(labels):
        return knn_map(features, labels, k)
    return knn_accuracy(features, labels, k)


def knn_accuracy(features, labels, k=5, chunk=1024):
    """Leave-one-out k-NN accuracy of `features` (each image classified by the majority of
    its `k` nearest other images, Euclidean; a tie goes to the lowest class): a plain,
    strong score of frozen features (arXiv 2503.18528), beside LogME and H-score."""
    labels = np.asarray(labels).reshape(-1).astype(int)
    if len(labels) < 2:
        return float("nan")
    correct = 0
    for rows, nearest in _neighbours(features, k, chunk):
        votes = np.zeros((len(nearest), labels.max() + 1))
        np.add.at(votes, (np.repeat(np.arange(len(nearest)), nearest.shape[1]),
                          labels[nearest].ravel()), 1)
        correct += int((votes.argmax(axis=1) == labels[rows]).sum())
    return correct / len(labels)


def knn_map(features, labels, k=5, chunk=1024):
    """Leave-one-out k-NN mAP of `features` for label vectors [N, classes]: each image's
    score for a label is the share of its `k` nearest other images holding it."""
    truth = np.asarray(labels) > 0.5
    if len(truth) < 2:
        return float("nan")
    shares = np.zeros(truth.shape)
    for rows, nearest in _neighbours(features, k, chunk):
        shares[rows] = truth[nearest].mean(axis=1)
    return float(mean_average_precision(shares, truth))


def _neighbours(features, k, chunk):
    """(rows, their `k` nearest other rows [len(rows), k]) over `features`, `chunk` rows
    at a time (Euclidean; a row is never its own neighbour)."""
    f = np.asarray(features, "float64")
    n = len(f)
    k = min(k, n - 1)
    squares = (f ** 2).sum(axis=1)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        distance = squares[rows, None] - 2 * f[rows] @ f.T + squares[None, :]
        distance[np.arange(distance.shape[0]), np.arange(start, rows.stop)] = np.inf  # not itself
        yield rows, np.argpartition(distance, k - 1, axis=1)[:, :k]


# --- Average precision, with sample weights --------------------------------------------

def average_precisions(scores, truth, weights=None):
    """Each label's average precision, as scikit-learn's `average_precision_score`
    computes it (the sum over score thresholds of the recall gained there times the
    precision there), of `scores` [N, classes] against 0/1 `truth` [N, classes].

    `weights` [R, N]: R weightings of the images at once (a bootstrap's resample counts);
    returns [R, classes], or [classes] without weights. NaN for a label no (weighted)
    image holds.
    """
    scores = np.asarray(scores, "float64")
    truth = np.asarray(truth) > 0.5
    w = np.ones((1, len(scores))) if weights is None else np.asarray(weights, "float64")
    out = np.full((len(w), scores.shape[1]), np.nan)
    for c in range(scores.shape[1]):
        order = np.argsort(-scores[:, c], kind="stable")
        ranked = scores[order, c]
        # Tied scores are one threshold: the last image of each run of equal scores.
        ends = np.append(np.flatnonzero(np.diff(ranked)), len(ranked) - 1)
        hits = np.cumsum(w[:, order] * truth[order, c], axis=1)[:, ends]
        seen = np.cumsum(w[:, order], axis=1)[:, ends]
        precision = np.divide(hits, seen, out=np.zeros_like(hits), where=seen > 0)
        gained = np.diff(hits, axis=1, prepend=0)
        held = hits[:, -1] > 0
        out[held, c] = (gained * precision).sum(axis=1)[held] / hits[held, -1]
    return out if weights is not None else out[0]


def mean_average_precision(scores, truth, weights=None):
    """mAP: `average_precisions` averaged over the labels the (weighted) images hold;
    [R] with `weights` [R, N], else a float."""
    ap = average_precisions(scores, truth, weights)
    return np.nanmean(ap, axis=-1) if weights is not None else float(np.nanmean(ap))
