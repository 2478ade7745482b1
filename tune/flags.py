"""The `toxtune tune` flags and the name of a job's saved config: plain data, importing nothing,
so that the `toxtune` command parses its arguments (and `toxtune jobs`, `toxtune --help` answer)
without loading torch, RDKit and pandas, which `tune.config`'s checks need."""

from __future__ import annotations

CONFIG_FILE = "toxtune_job.yaml"  # the resolved config, saved in the job's folder for --resume

# Command-line flag -> (dotted config key, help). Flags override the config file; `toxtune tune`
# and `toxtune submit` take them, and a submitted job gets them back as `toxtune tune` flags.
TUNE_FLAGS: dict[str, tuple[str, str]] = {
    "data": ("data.source", "CSV path or URL of molecules (default: MoleculeNet Tox21)"),
    "smiles_column": ("data.smiles_column", "name of the SMILES column"),
    "num_samples": ("search.num_samples", "number of trials"),
    "max_epochs": ("search.max_epochs", "epochs per trial"),
    "searcher": ("search.searcher", "optuna (TPE) or random"),
    "scheduler": ("search.scheduler", "asha or fifo"),
    "max_concurrent": ("search.max_concurrent", "trials in flight at once"),
    "time_limit": ("search.time_limit_s", "wall-clock budget of the search in seconds"),
    "seed": ("search.seed", "seed of the sampler and of training"),
    "duplicates": (
        "data.duplicates",
        "rows repeating a molecule: keep (kept in one split part), average or drop",
    ),
    "split": ("split.method", "random, stratified or scaffold"),
    "folds": (
        "search.folds",
        "k > 1: score each trial on the mean over k folds of the non-test rows and register "
        "the best trial's k fold models (default 1: one validation split)",
    ),
    "cpus_per_trial": ("resources.cpus_per_trial", "CPUs per trial"),
    "gpus_per_trial": ("resources.gpus_per_trial", "GPU share per trial, e.g. 0.25, or auto"),
    "address": ("ray.address", "Ray cluster to join: auto or HOST:PORT (default: local)"),
    "storage_path": (
        "ray.storage_path",
        "results folder or URI, e.g. s3://bucket/toxtune (shared by every node on a cluster)",
    ),
    "num_gpus": ("ray.num_gpus", "GPUs of a local Ray (logical ones work on a CPU machine)"),
    "tracking_uri": ("tracking.tracking_uri", "MLflow tracking URI (default: SQLite)"),
    "study_storage": (
        "tracking.study_storage",
        "Optuna study database URL, e.g. postgresql://HOST/optuna (default: SQLite)",
    ),
    "experiment_name": ("tracking.experiment_name", "MLflow experiment"),
    "run_name": (
        "tracking.run_name",
        "job name (default: EXPERIMENT-TIMESTAMP); an existing name continues that job",
    ),
    "model_name": (
        "tracking.registered_model_name",
        "registered model name (default: toxtune-<data file stem>)",
    ),
}
