"""Fit a curve to noisy points and predict new ones: the file the agent edits.

Input (stdin, JSON): {"x": [...], "y": [...], "query": [...]} - the training points and the
x values to predict. Output: the last line printed is a JSON list, one prediction per query.

The model is a polynomial (in the Legendre basis, which behaves well on [-1, 1]) fitted by
gradient descent on the mean squared error plus a ridge penalty on the weights.
"""

import json
import sys

import numpy as np
from numpy.polynomial import legendre

DEGREE = 16  # the highest power: more can follow the curve, and the noise too
RIDGE = 0.3  # penalty on the squared weights: more gives a smoother, flatter curve
LEARNING_RATE = 0.01  # gradient-descent step size
STEPS = 300  # gradient-descent steps


def features(x) -> np.ndarray:
    """One row per point: the Legendre polynomials P0(x) ... P_DEGREE(x)."""
    return legendre.legvander(np.asarray(x, dtype=float), DEGREE)


def fit(x, y) -> np.ndarray:
    """The weights, by gradient descent on mean((X w - y)^2) / 2 + RIDGE * |w|^2 / 2."""
    X, y = features(x), np.asarray(y, dtype=float)
    w = np.zeros(X.shape[1])
    for _ in range(STEPS):
        gradient = X.T @ (X @ w - y) / len(y) + RIDGE * w
        w -= LEARNING_RATE * gradient
    return w


def main() -> None:
    data = json.load(sys.stdin)
    w = fit(data["x"], data["y"])
    print(json.dumps((features(data["query"]) @ w).tolist()))


if __name__ == "__main__":
    main()
