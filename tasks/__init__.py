"""Plain-Python pipeline steps. Nothing here imports Prefect or MLflow (see tasks/tracking/)."""
