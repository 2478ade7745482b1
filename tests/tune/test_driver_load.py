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
