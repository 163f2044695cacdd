"""Clustered mean prompts: one mean prompt per kind of prompt.

3rd place of the competition clustered the training prompts' sentence
embeddings into 12 groups with k-means, searched a mean prompt for each,
and gave each row the mean prompt of the cluster nearest its model output.
The mean-prompt stage clusters (`kmeans`) and writes `clusters.json`
(`MeanPromptClusters.save`); predict and compare embed the model outputs
and pick (`MeanPromptClusters.nearest`).

Example:
```python
labels, centroids = kmeans(unit_vectors, k=12, seed=0)
clusters = MeanPromptClusters(centroids, ["Rewrite as a poem.", ...], fallback="Improve it.")
clusters.nearest(embedded_outputs)  # one mean prompt per row
clusters.for_outputs(encoder, model_outputs, batch_size=64)  # the same, embedding them
```
"""

import json

import numpy as np

from pipeline.errors import InputError
from pipeline.text.encoder import embed


def kmeans(vectors, k, seed, iterations=100):
    """Spherical k-means of unit vectors (cosine, as the metric): k-means++
    starts drawn with `seed`, then Lloyd's steps until no label changes.
    Returns (labels, unit centroids); the same for the same seed."""
    if not 1 <= k <= len(vectors):
        raise InputError(
            f"mean_prompt.clusters={k}: give 1 to {len(vectors)} (the training target prompts)"
        )
    rng = np.random.default_rng(seed)
    centroids = [vectors[rng.integers(len(vectors))]]
    for _ in range(1, k):
        distance = 1.0 - np.max(vectors @ np.stack(centroids).T, axis=1)
        weights = np.clip(distance, 0.0, None) ** 2
        total = weights.sum()
        chosen = (
            rng.choice(len(vectors), p=weights / total) if total > 0 else rng.integers(len(vectors))
        )
        centroids.append(vectors[chosen])
    centroids = np.stack(centroids)
    labels = None
    for _ in range(iterations):
        new_labels = np.argmax(vectors @ centroids.T, axis=1)
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        for c in range(k):
            members = vectors[labels == c]
            if len(members):  # an emptied cluster keeps its centroid
                mean = members.sum(axis=0)
                centroids[c] = mean / np.linalg.norm(mean)
    return labels, centroids


class MeanPromptClusters:
    """Centroids (unit vectors) with the mean prompt of each; `fallback`
    (the global mean prompt) for a row with no model output to place."""

    def __init__(self, centroids, prompts, fallback):
        self.centroids = np.asarray(centroids, dtype=np.float32)
        self.prompts = list(prompts)
        self.fallback = fallback

    def nearest(self, vectors, texts=None):
        """The mean prompt of each row's nearest centroid; the fallback
        where the row's text (when given) is empty."""
        chosen = np.argmax(np.asarray(vectors) @ self.centroids.T, axis=1)
        return [
            self.fallback if texts is not None and not texts[i].strip() else self.prompts[c]
            for i, c in enumerate(chosen)
        ]

    def save(self, path, details=()):
        """`clusters.json`: each cluster's centroid and mean prompt, and
        any `details` per cluster (dicts: its targets, its score)."""
        details = list(details) or [{}] * len(self.prompts)
        clusters = [
            {"mean_prompt": prompt, **detail, "centroid": [float(x) for x in centroid]}
            for prompt, detail, centroid in zip(self.prompts, details, self.centroids, strict=True)
        ]
        path.write_text(json.dumps({"fallback": self.fallback, "clusters": clusters}, indent=2))

    def for_outputs(self, encoder, outputs, batch_size):
        """The mean prompt of each model output's cluster."""
        return self.nearest(embed(encoder, outputs, batch_size), outputs)

    @classmethod
    def load(cls, path):
        data = json.loads(path.read_text())
        clusters = data["clusters"]
        return cls(
            [c["centroid"] for c in clusters],
            [c["mean_prompt"] for c in clusters],
            data["fallback"],
        )
