"""Hyper-parameter sweeps of the training CLI on one machine or a SLURM cluster (docs/sweeps.md).

- `spec`: the runs of a sweep from a config's `get_sweep()` (list, grid, random samples) and `--sweep` flags; names.
- `launch`: validation of every run's config, workdirs, submission with submitit (local executor or SLURM arrays).
- `state`: each run's state (pending, running, done, failed with its error line) from the files of its workdir.
- `report`: the runs ranked by an evaluation metric, as Markdown, CSV and a PNG plot.
"""
