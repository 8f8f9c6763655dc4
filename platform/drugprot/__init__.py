"""drugprot: DrugProt chemical–gene relation extraction, from corpus to tuned, served ensembles.

Importing the package pulls in neither torch, Ray, Optuna nor MLflow; each stage module imports what it needs.
"""

__version__ = "0.1.0"
