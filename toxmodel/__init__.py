"""toxmodel: molecular toxicity models from SMILES (data, features, splits, MLP, training).

The library imports no Ray, Optuna or MLflow; the `tune` package orchestrates it.
"""

__version__ = "0.1.0"
