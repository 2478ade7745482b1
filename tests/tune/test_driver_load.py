"""The driver at many trials in flight: the console stays a line per interval and per trial end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from tune.search import ProgressLine


@dataclass
class _Trial:
    trial_id: str
    status: str = "RUNNING"
    last_result: dict[str, Any] = field(default_factory=dict)


def test_sixty_four_trials_print_a_line_per_interval_and_per_ended_trial(
    capsys: pytest.CaptureFixture[str],
) -> None:
    trials = [_Trial(f"t{i:02d}") for i in range(64)]
    progress = ProgressLine(every_s=3600)
    for epoch in range(1, 11):
        for i, trial in enumerate(trials):
            result = {"training_iteration": epoch, "epoch": epoch, "best_val_roc_auc": i / 100}
            progress.on_trial_result(epoch, trials, trial, result)
            trial.last_result = result
        progress.on_step_end(epoch, trials)
    assert capsys.readouterr().out == ""  # 640 results, no interval over: nothing printed
    for trial in trials[:2]:
        trial.status = "TERMINATED"
        progress.on_trial_complete(10, trials, trial)
    trials[2].status = "ERROR"
    progress.on_experiment_end(trials)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [
        "trial t00 ended after 10 epochs: epoch 10  best_val_roc_auc 0.0000",
        "trial t01 ended after 10 epochs: epoch 10  best_val_roc_auc 0.0100",
    ]
    assert len(lines) == 3
    assert "61 running, 0 pending, 2 done, 1 failed | 640 results" in lines[2]
    assert "best best_val_roc_auc 0.6300 (trial t63)" in lines[2]


def test_trials_ending_by_the_dozen_print_ten_lines_the_best_and_a_count(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Under ASHA at 64 in flight trials end several a second: an interval shows ten of them,
    every trial that ends as the best so far, and counts the others on its summary line."""
    trials = [_Trial(f"t{i:02d}") for i in range(64)]
    progress = ProgressLine(every_s=3600, ended_lines=10)
    scores = [0.5] * 64
    scores[40] = 0.9  # ends as the best so far, after the first ten lines
    for i, trial in enumerate(trials):
        result = {"training_iteration": 3, "epoch": 3, "best_val_roc_auc": scores[i]}
        progress.on_trial_result(3, trials, trial, result)
        trial.last_result = result
        trial.status = "TERMINATED"
        progress.on_trial_complete(3, trials, trial)
    progress.on_experiment_end(trials)
    lines = capsys.readouterr().out.splitlines()
    ended = [line.split()[1] for line in lines if line.startswith("trial ")]
    assert ended == [f"t{i:02d}" for i in range(10)] + ["t40"]
    assert lines[-1].endswith("| 53 more trials ended")
    assert "64 done" in lines[-1]
    # The next interval starts afresh: its first ended trials are shown again.
    trials.append(_Trial("t64", "TERMINATED", {"training_iteration": 3, "epoch": 3}))
    progress.on_trial_complete(3, trials, trials[-1])
    assert capsys.readouterr().out.startswith("trial t64 ended after 3 epochs")
