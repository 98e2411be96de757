"""Put on PYTHONPATH with SLOW_STEP=SECONDS: every training step of every rank first sleeps
that long, as on a slower machine, so that a test can signal a job that runs the real
`mpitrain` (started by Slurm, a job script, a launcher) while it is still training. The
weights are those of an unslowed run. Patches `mpitrain.engine.loop.make_train_step` as
the module is imported (nothing else is imported early: the launcher stays light)."""

import importlib.machinery
import os
import sys
import time

DELAY = float(os.environ.get("SLOW_STEP") or 0)


class _SlowSteps:
    def find_spec(self, name, path, target=None):
        if name != "mpitrain.engine.loop":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        real = spec.loader.exec_module

        def exec_module(module):
            real(module)
            make = module.make_train_step

            def slow_make(*args, **kwargs):
                step = make(*args, **kwargs)

                def slow(*a, **k):
                    time.sleep(DELAY)
                    return step(*a, **k)

                return slow

            module.make_train_step = slow_make

        spec.loader.exec_module = exec_module
        return spec


if DELAY > 0:
    sys.meta_path.insert(0, _SlowSteps())
