"""The training run: the loop, its run folder and data, checkpoints and interrupts, task sampling, the optimizer,
the frozen-trunk cache, sharded experts, and the run's own export and evaluation.

Nothing is imported with the package: a light command (``moebsr tasks``) that imports one of these modules does not
pay for the loop's stack.
"""
