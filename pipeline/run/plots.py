"""PNG charts the stages write for a person to look at."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def loss_curve(step_losses, epoch_val_losses, steps_per_epoch, path, evaluations=(), best=None):
    """The losses by step; beside them, on an axis of its own, the
    validation score by the metric ({"step", "score"} each), `best` (one of
    them) marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    lines = ax.plot(range(1, len(step_losses) + 1), step_losses, label="train loss (per step)")
    if epoch_val_losses:
        val_steps = [steps_per_epoch * (e + 1) for e in range(len(epoch_val_losses))]
        lines += ax.plot(val_steps, epoch_val_losses, "o-", label="validation loss (per epoch)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title("LoRA fine-tuning")
    if evaluations:
        score_ax = ax.twinx()
        steps, scores = [e["step"] for e in evaluations], [e["score"] for e in evaluations]
        lines += score_ax.plot(steps, scores, "s-", color="tab:green", label="validation score")
        lines += score_ax.plot(
            best["step"], best["score"], "*", color="tab:red", markersize=14, label="best adapter"
        )
        score_ax.set_ylabel("mean sharpened cosine similarity")
    # Below the axes: the curves fill the corners a legend would cover.
    ax.legend(
        lines,
        [line.get_label() for line in lines],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.15),
        ncol=2,
    )
    _save(fig, path)


def score_histogram(scores, mean, path):
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(scores, bins=40, range=(min(-0.1, min(scores)), 1.0))
    ax.axvline(mean, color="red", label=f"mean {mean:.4f}")
    ax.set_xlabel("sharpened cosine similarity (cos^3)")
    ax.set_ylabel("rows")
    ax.legend()
    _save(fig, path)


def search_curve(history, path):
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["train"] for h in history], "o-", label="train targets")
    if history and "holdout" in history[0]:
        ax.plot(steps, [h["holdout"] for h in history], "s-", label="holdout targets")
    ax.set_xlabel("beam search step (words in the prompt)")
    ax.set_ylabel("mean sharpened cosine similarity")
    ax.set_title("Mean prompt search")
    ax.legend()
    _save(fig, path)


def sweep_curves(curves, path):
    """The validation score by step of each setting ({setting: [{"step",
    "score"}, ...]}), each setting's best marked."""
    fig, ax = plt.subplots(figsize=(8, 4.5 + 0.25 * len(curves)))
    for setting, evaluations in curves.items():
        steps, scores = [e["step"] for e in evaluations], [e["score"] for e in evaluations]
        (line,) = ax.plot(steps, scores, "o-", label=setting)
        best = scores.index(max(scores))
        ax.plot(steps[best], scores[best], "*", color=line.get_color(), markersize=14)
    ax.set_xlabel("step")
    ax.set_ylabel("validation score (mean sharpened cosine similarity)")
    ax.set_title("Sweep: validation score by setting (* its best)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1)
    _save(fig, path)


def variant_bars(scores, path):
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(scores) + 1.5))
    names = list(scores)
    ax.barh(names, [scores[n] for n in names])
    for i, name in enumerate(names):
        ax.text(scores[name], i, f" {scores[name]:.4f}", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("score (mean sharpened cosine similarity)")
    ax.set_title("Prediction variants")
    _save(fig, path)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
