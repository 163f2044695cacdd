"""Clustered mean prompts: k-means fixed by its seed, one search per
cluster, each row given its model output's cluster's mean prompt by
predict and compare alike."""

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import InputError
from pipeline.run.run_dir import RunDir
from pipeline.stages.compare import run_compare_stage
from pipeline.stages.data import run_data_stage
from pipeline.stages.mean_prompt import run_mean_prompt_stage
from pipeline.stages.predict import run_predict_stage
from pipeline.text.clusters import MeanPromptClusters, kmeans
from pipeline.text.encoder import load_sentence_encoder


def three_groups(seed=0):
    """30 unit vectors, 10 near each of three axes of 8 dimensions."""
    rng = np.random.default_rng(seed)
    vectors = np.repeat(np.eye(8)[:3], 10, axis=0) + 0.1 * rng.normal(size=(30, 8))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_kmeans_finds_separated_groups_the_same_for_a_seed():
    vectors = three_groups()
    labels, centroids = kmeans(vectors, 3, seed=7)
    assert all(len(set(labels[g * 10 : (g + 1) * 10])) == 1 for g in range(3))
    assert len(set(labels)) == 3
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-6)
    again, same = kmeans(vectors, 3, seed=7)
    assert np.array_equal(again, labels) and np.array_equal(same, centroids)
    with pytest.raises(InputError, match="mean_prompt.clusters=31: give 1 to 30"):
        kmeans(vectors, 31, seed=0)


def test_each_row_gets_its_nearest_clusters_prompt_and_an_empty_output_the_fallback(tmp_path):
    clusters = MeanPromptClusters(np.eye(3), ["first", "second", "third"], fallback="global")
    vectors = np.array([[0.1, 0.9, 0.0], [0.0, 0.2, 0.8], [1.0, 0.0, 0.0]])
    assert clusters.nearest(vectors, ["a", "b", " "]) == ["second", "third", "global"]
    clusters.save(tmp_path / "clusters.json", [{"targets": 1}, {"targets": 2}, {"targets": 3}])
    loaded = MeanPromptClusters.load(tmp_path / "clusters.json")
    assert loaded.nearest(vectors) == ["second", "third", "first"]
    saved = json.loads((tmp_path / "clusters.json").read_text())
    assert [c["targets"] for c in saved["clusters"]] == [1, 2, 3]


@pytest.mark.slow
def test_predict_and_compare_pick_each_rows_cluster_by_its_model_output(tiny_cfg):
    cfg = tiny_cfg
    cfg.data.max_rows, cfg.mean_prompt.steps, cfg.mean_prompt.clusters = 64, 3, 3
    cfg.predict.adapter, cfg.predict.max_new_tokens = "none", 6
    cfg.predict.combine = ["model", "clustered_mean_prompt"]
    quiet = dict(log=lambda *_: None)
    run_data_stage(cfg, **quiet)
    run = RunDir(cfg)
    cfg.mean_prompt.clusters = 0
    run_mean_prompt_stage(cfg, **quiet)  # the global mean prompt only
    cfg.mean_prompt.clusters = 3
    with pytest.raises(FileNotFoundError, match="mean-prompt stage with mean_prompt.clusters=k"):
        run_predict_stage(cfg, **quiet)
    logs = []
    run_mean_prompt_stage(cfg, log=logs.append)
    assert sum("mean-prompt: cluster " in line for line in logs) == 3
    clusters = MeanPromptClusters.load(run.mean_prompt_clusters)
    assert len(clusters.prompts) == 3 and all(clusters.prompts)
    run_predict_stage(cfg, **quiet)
    outputs = list(pd.read_csv(run.raw_outputs, keep_default_na=False)["rewrite_prompt"])
    chosen = clusters.for_outputs(load_sentence_encoder(cfg.score.encoder), outputs, 64)
    submitted = pd.read_csv(run.submission, keep_default_na=False)["rewrite_prompt"]
    for output, prompt, text in zip(outputs, chosen, submitted, strict=True):
        assert text == f"{output} {prompt}".strip(), (text, output, prompt)
    scores = run_compare_stage(cfg, **quiet)
    assert {"clustered mean prompt", "model + clustered mean prompt"} <= set(scores)
    cfg.mean_prompt.clusters = 0
    run_mean_prompt_stage(cfg, **quiet)  # the global mean prompt again: no stale clusters
    assert not run.mean_prompt_clusters.exists()
