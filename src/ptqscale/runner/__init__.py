"""The Hydra app: ``ptqscale-run`` (one job, or a sweep with ``--multirun``) and ``ptqscale-plan``.

Only this package imports every other one. A job's life is in :mod:`ptqscale.runner.job`;
the keys that identify jobs and shared model-level results in :mod:`ptqscale.runner.keys`;
the W&B mirror in :mod:`ptqscale.runner.tracking`.
"""
