"""Trial: validate, early-stop on and keep an exponential moving average of the weights.

The trainer has no EMA yet; this script patches one in (timm's ``ModelEmaV3``, horizon about
``EMA_EPOCHS`` epochs of steps, with warm-up) to measure whether it closes the small-set gap of
the default recipe before the trainer and its checkpoints are changed for it. The EMA weights
are swapped into the model for every validation, so the best-weights file keeps them. Arguments
are those of ``small_sets.py``.
Usage: EMA_EPOCHS=1 python benchmarks/ema_trial.py --sets phantom,pneumoniamnist --seeds 0,1,2
       --recipes default
"""

import os

import small_sets  # this folder is on sys.path when the script runs
from timm.utils import ModelEmaV3

from medsight.training import trainer as T
from medsight.training.handlers import Handler

HORIZON_EPOCHS = float(os.environ.get("EMA_EPOCHS", "1"))


class EmaHandler(Handler):
    def on_fit_start(self, engine):
        spe = engine.plan.steps_per_epoch
        decay = 1 - 1 / max(2.0, HORIZON_EPOCHS * spe)
        engine._ema = ModelEmaV3(
            engine.model, decay=decay, use_warmup=True, stochastic_rounding=False
        )

    def on_batch_end(self, engine):
        engine._ema.update(engine.model, step=engine.state.step)


orig_handlers = T._handlers


def _handlers(*a, **k):
    hs = orig_handlers(*a, **k)
    hs.insert(1, EmaHandler())
    return hs


T._handlers = _handlers

orig_validate = T._Loop.validate


def validate(self, *, ending):
    engine = self.engine
    ema = getattr(engine, "_ema", None)
    if ema is None:
        return orig_validate(self, ending=ending)
    live = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    engine.model.load_state_dict(ema.module.state_dict())
    try:
        return orig_validate(self, ending=ending)
    finally:
        engine.model.load_state_dict(live)


T._Loop.validate = validate

if __name__ == "__main__":
    small_sets.main()
