"""The trainer behind ``python -m distopt.train``, one job per module.

In the order a run uses them:

* ``config``: :class:`~distopt.trainer.config.TrainConfig`, the flags' ranges
  and names, and the compressor of ``--compression_args`` (no TensorFlow
  until the names: the command line checks flags before it loads).
* ``paths``: the run directory (unique, created atomically) and the checks
  of ``--model_dir`` and ``--data_dir`` (no TensorFlow either).
* ``strategy``: the strategy of a config, the chief, the XLA default.
* ``inputs``: the training feed and the test dataset.
* ``factories``: model, learning-rate schedule and optimizer from a config.
* ``step``: the compiled training and evaluation loops and their sums.
* ``evaluation``: a test pass, in chunks, on the replicas' average.
* ``checkpointing``: resume rules, restore, saves, atomic JSON files.
* ``summaries``: TensorBoard scalars, progress lines, ``metrics.json``.
* ``loop``: the training loop over chunks of steps.
* ``run``: :func:`~distopt.trainer.run.train`, set-up to the end of a run.

This package file imports nothing, so that ``config`` and ``paths`` load
without TensorFlow.
"""
