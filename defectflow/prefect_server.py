"""``python -m defectflow.prefect_server [OPTIONS]``: ``prefect server start [OPTIONS]`` whose
scheduler also works with SQLAlchemy 2.1.

Prefect 3.8.8's scheduler inserts a deployment's upcoming flow runs in one bulk INSERT whose
rows carry a ``state`` key, which the ``FlowRun.state`` hybrid property stands for; Prefect
writes those states itself right after. SQLAlchemy 2.0 ignored the key; 2.1 refuses it
("Can't evaluate bulk DML statement; please supply a bulk_dml decorated function"), so no
scheduled run is ever created and ``defectflow serve`` waits forever. Registering a bulk
handler that drops the key restores 2.0's behaviour. With SQLAlchemy 2.0, plain
``prefect server start`` works as well; this command then changes nothing.

The server runs in the foreground, in this process (Prefect's default), so the fix applies.
"""

from __future__ import annotations

import sys


def allow_scheduled_runs_with_sqlalchemy_21() -> bool:
    """Let Prefect's scheduler bulk-insert flow runs on SQLAlchemy 2.1; True if patched."""
    from prefect.server.database.orm_models import FlowRun

    state = FlowRun.__dict__["state"]  # the hybrid_property object itself
    if not hasattr(state, "bulk_dml") or getattr(state, "bulk_dml_setter", None) is not None:
        return False  # SQLAlchemy 2.0 (no bulk hooks), or already handled

    def drop_state(cls, mapping, value) -> None:
        # The mapping is SQLAlchemy's own copy; Prefect inserts the Scheduled states next.
        mapping.pop("state", None)

    state.inplace.bulk_dml(drop_state)
    return True


def main(argv: list[str] | None = None) -> None:
    allow_scheduled_runs_with_sqlalchemy_21()
    from prefect.cli import app

    sys.argv = ["prefect", "server", "start", *(sys.argv[1:] if argv is None else argv)]
    app()


if __name__ == "__main__":
    main()
