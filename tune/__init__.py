"""tune: Ray Tune + Optuna hyperparameter search over `toxmodel`, tracked in MLflow."""
