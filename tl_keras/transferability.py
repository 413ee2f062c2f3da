"""How well a frozen feature set predicts the labels, without training: LogME,
H-score and leave-one-out k-NN accuracy. Pure numpy; the regime advisor's scores
(advise.py).

LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for
Transfer Learning", ICML 2021) is the evidence (marginal likelihood per example)
of a Bayesian linear model from the features to the one-hot labels: one
eigendecomposition per feature set. H-score (Bao et al., ICIP 2019) is the cheap
cross-check; k-NN accuracy a plain, strong score of frozen features.

Example:
    logme(features, labels), h_score(features, labels), knn_accuracy(features, labels)
"""

import math

import numpy as np


def logme(features, labels):
    """LogME of `features` [N, D] for integer `labels` [N]: the log evidence per example.

    For each class c, the evidence of y_c (1 where the label is c, else 0)
    under y = F w + noise, w ~ N(0, 1/alpha), noise ~ N(0, 1/beta), with
    alpha and beta set to their maximum-evidence values by MacKay's
    fixed-point updates; the mean over classes, divided by N. Higher is
    better; comparable across feature sets of different dimension.
    """
    f = np.asarray(features, "float64")
    labels = np.asarray(labels).reshape(-1)
    n, d = f.shape
    sigma, project = _spectrum(f)
    evidences = []
    for c in np.unique(labels):
        y = (labels == c).astype("float64")
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
    `shrinkage` x the mean variance is added to cov(f)'s diagonal for stability."""
    f = np.asarray(features, "float64")
    labels = np.asarray(labels).reshape(-1)
    f = f - f.mean(axis=0)
    cov = f.T @ f / len(f)
    cov += shrinkage * max(np.trace(cov) / len(cov), 1e-12) * np.eye(len(cov))
    means = np.zeros_like(f)
    for c in np.unique(labels):
        means[labels == c] = f[labels == c].mean(axis=0)
    between = means.T @ means / len(f)
    return float(np.trace(np.linalg.solve(cov, between)))


def knn_accuracy(features, labels, k=5, chunk=1024):
    """Leave-one-out k-NN accuracy of `features` (each image classified by the majority of
    its `k` nearest other images, Euclidean; a tie goes to the lowest class): a plain,
    strong score of frozen features (arXiv 2503.18528), beside LogME and H-score."""
    f = np.asarray(features, "float64")
    labels = np.asarray(labels).reshape(-1).astype(int)
    n = len(f)
    if n < 2:
        return float("nan")
    k = min(k, n - 1)
    squares = (f ** 2).sum(axis=1)
    correct = 0
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        distance = squares[rows, None] - 2 * f[rows] @ f.T + squares[None, :]
        distance[np.arange(distance.shape[0]), np.arange(start, rows.stop)] = np.inf  # not itself
        nearest = np.argpartition(distance, k - 1, axis=1)[:, :k]
        votes = np.zeros((distance.shape[0], labels.max() + 1))
        np.add.at(votes, (np.repeat(np.arange(distance.shape[0]), k), labels[nearest].ravel()), 1)
        correct += int((votes.argmax(axis=1) == labels[rows]).sum())
    return correct / n

