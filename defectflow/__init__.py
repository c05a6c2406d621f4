"""defectflow: industrial visual inspection pipelines (Prefect flows, MLflow tracking)."""

__version__ = "0.1.0"
