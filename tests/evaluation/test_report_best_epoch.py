"""The report names the epoch whose weights the trainer kept."""

from __future__ import annotations

import pandas as pd

from medsight.evaluation.report import _best_row


def test_a_tied_best_score_is_the_row_with_the_lower_validation_loss():
    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3, 4],
            "val_auroc": [1.0, 0.9, 1.0, 1.0],
            "val_loss": [0.69, 0.5, 0.29, 0.31],
        }
    )
    assert _best_row(history, "auroc") == 2  # epoch 3, as EarlyStopping keeps it
    assert _best_row(history.assign(val_auroc=[0.8, 0.9, 1.0, 0.7]), "auroc") == 2
    assert _best_row(history.drop(columns="val_loss"), "auroc") == 0
