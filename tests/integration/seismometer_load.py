"""Load medsight's seismometer exports with seismometer's own start-up API; print what it loaded.

Runs inside seismometer's environment (not medsight's: seismometer needs pandas < 3), so it
imports nothing from medsight. ``python seismometer_load.py FOLDER...`` prints one JSON object:
``{FOLDER: {...}}`` with the merged frame's row count, the entity count, the columns, each
output's and each target's values (in the frame's row order, keyed by EncounterId) and the
cohorts seismometer built.
"""

import json
import logging
import os
import sys

import seismometer as sm
from seismometer.seismogram import Seismogram


def load(folder: str) -> dict:
    os.chdir(folder)  # config.yml's paths are relative to the folder seismometer starts in
    sm.run_startup(config_path=".", reset=True, log_level=logging.ERROR)
    sg = Seismogram()
    frame = sg.dataframe.sort_values(sg.entity_keys[-1])
    keys = frame[sg.entity_keys[-1]].tolist()
    return {
        "rows": int(sg.prediction_count),
        "entities": int(sg.entity_count),
        "columns": sorted(map(str, frame.columns)),
        "entity_keys": list(sg.entity_keys),
        "output": sg.output,
        "outputs": list(sg.output_list),
        "target": sg.target,
        "targets": list(sg.target_cols),
        "keys": keys,
        "scores": {name: frame[name].astype(float).tolist() for name in sg.output_list},
        "truth": {name: frame[f"{name}_Value"].astype(float).tolist() for name in sg.target_cols},
        "cohorts": {name: list(map(str, v)) for name, v in sg.available_cohort_groups.items()},
        "thresholds": list(sg.thresholds),
        "modelname": sg.modelname,
    }


if __name__ == "__main__":
    print(json.dumps({folder: load(os.path.abspath(folder)) for folder in sys.argv[1:]}))
