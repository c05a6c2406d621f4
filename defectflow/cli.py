"""defectflow: train, evaluate and track defect detectors; serve and score them.

commands:
  defectflow run [PARAMS.yaml] [--set KEY=VALUE ...]   train, evaluate and track (MLflow)
  defectflow serve PARAMS.yaml (--cron EXPR | --interval SECONDS)
                                                       run the training on a schedule
  defectflow score --model NAME@ALIAS --inbox DIR --out DIR [--every SECONDS]
                                                       score new images with a registered model

defectflow COMMAND --help describes each command. Bad input ends in one line naming the
file or setting and the problem (exit code 2).
"""

from __future__ import annotations

import argparse
import atexit
import errno
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from defectflow.tasks.results import PipelineSummary  # plain data: imports no library

# Offline and quiet defaults, set before Prefect or MLflow are imported.
_ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    # A fresh ephemeral Prefect server took ~27 s to start on 2 cores (default limit 20 s).
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # no INFO lines (database set-up) among the steps
    "GIT_PYTHON_REFRESH": "quiet",
}


def default_params_path() -> Path | None:
    """params/elpv.yaml of this checkout (or of the current folder)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        candidate = root / "params" / "elpv.yaml"
        if candidate.is_file():
            return candidate
    return None


# OSErrors caused by the environment rather than the code: reported in one line (exit 2).
_ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
# How Prefect's log messages name one ("... failed with exception: OSError(30, ...").
_ENVIRONMENT_OSERROR = re.compile(
    r"(OSError|PermissionError)\((%s)," % "|".join(map(str, sorted(_ENVIRONMENT_ERRNOS))))


def print_summary(summary: PipelineSummary) -> None:
    # Imported here, as the CLI's other project imports: pandas is not paid for by --help.
    from defectflow.tasks.evaluation import (COLUMN_TITLES, THRESHOLD_COLUMNS, THRESHOLD_NOTE,
                                             comparison_table, format_table)
    from defectflow.tasks.params import FUSION_METHOD

    detectors = [r.row() for r in summary.results if r.method != FUSION_METHOD]
    fused = [r for r in summary.results if r.method == FUSION_METHOD]
    print()
    if detectors:
        # AUROC ranks; what the deployed threshold does is what a line sees.
        columns = [c for c in THRESHOLD_COLUMNS if any(r.get(c) is not None for r in detectors)]
        print(format_table(comparison_table(detectors, columns=columns), digits=4,
                           titles=COLUMN_TITLES))
        print(THRESHOLD_NOTE)
    if fused:
        print("\nSegAD fusion: image AUROC, mean ± std over seeds (as its MLflow run and "
              "comparison.csv), on the images the fusion did not train on\n(<detector> alone: "
              "the detector's own image score on the same images; fusion: mode, setting: what "
              "the seeds chose)")
        print(format_table(comparison_table([r.row() for r in fused]), digits=4,
                           titles=COLUMN_TITLES))
    print(f"\nMLflow: experiment {summary.experiment!r}, run {summary.parent_run_id}"
          f"{'  (every step cached)' if summary.all_steps_cached else ''}")
    if summary.ui_hint:
        print(summary.ui_hint)
    for r in summary.registered:  # params.registry.enabled
        aliases = ", ".join(f"{k} -> version {v}" for k, v in r.aliases.items())
        print(f"registered {r.name} version {r.version}  ({aliases})")


class _HideInputErrors(logging.Filter):
    """Prefect logs a failed task's traceback; for bad input, or a read-only or full disk, the
    CLI's one line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        from defectflow.tasks.errors import DefectflowError

        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, DefectflowError) or (isinstance(error, OSError)
                                                  and error.errno in _ENVIRONMENT_ERRNOS):
            return False
        message = record.getMessage()
        return "DefectflowError" not in message and not _ENVIRONMENT_OSERROR.search(message)


def _quiet_prefect_input_errors() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_HideInputErrors())


def cmd_run(args) -> int:
    started = time.time()
    from defectflow import server

    # Prefect's local API server boots (one core) while we import and validate (the other).
    server.start_early()
    from defectflow.tasks.params import ParamsOrigin, load_params, parse_overrides

    path = args.params or default_params_path()
    overrides = parse_overrides(args.set or [])
    params = load_params(path, overrides)
    from defectflow.flows.preflight import preflight

    preflight(params, ParamsOrigin(path, overrides))  # data, devices, cache and store first
    print(f"defectflow: {params.dataset_name} with {params.features.label}, "
          f"methods {sorted(params.methods)}  (params: {path or 'built-in defaults'})", flush=True)
    from defectflow.flows.runners import run_pipeline
    from defectflow.tasks import tracking  # noqa: F401  (MLflow's import, while the server boots)

    server.wait_ready()
    _quiet_prefect_input_errors()
    # On params' execution.task_runner; the logged total_seconds runs from this command's start.
    summary = run_pipeline(params, verbose=not args.quiet, params_path=path, started=started)
    print_summary(summary)
    print(f"total time: {summary.total_seconds:.1f} s")
    return 0


def cmd_score(args) -> int:
    """Score the inbox's new images once, or every ``--every`` seconds as a Prefect deployment."""
    from defectflow.tasks.errors import DefectflowError

    inbox, out = Path(args.inbox), Path(args.out)
    if not inbox.is_dir():
        raise DefectflowError("inbox folder not found", inbox)
    if args.every is not None and args.every <= 0:
        raise DefectflowError(f"--every must be a positive number of seconds, got {args.every}")
    if args.every is not None and not os.environ.get("PREFECT_API_URL"):
        # Prefect's temporary server has no scheduler: interval runs would never start.
        raise DefectflowError("--every needs a Prefect server with a scheduler: run "
                              "`python3 -m defectflow.prefect_server` and set PREFECT_API_URL="
                              "http://127.0.0.1:4200/api")
    from defectflow.tasks.params import TrackingParams
    from defectflow.tasks.storage import writable_folder

    # Scored images move to done/ or quarantine/ inside the inbox; results go to --out.
    writable_folder(inbox, "--inbox")
    writable_folder(out, "--out")
    # As for `run`: --tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.
    args.tracking_uri = TrackingParams(uri=args.tracking_uri).resolved_uri()
    from defectflow.tasks.tracking.store import check_store

    # The store must already hold the model: a mistyped SQLite path is an error, not a new
    # empty database; an unreachable server fails in seconds.
    check_store(args.tracking_uri, create=False)
    parameters = dict(model=args.model, inbox=str(inbox.resolve()), out=str(out.resolve()),
                      tracking_uri=args.tracking_uri, format=args.format)
    from defectflow import server

    server.start_early()  # no-op when PREFECT_API_URL is set
    from defectflow.flows.score import serve_every, score_flow
    from defectflow.tasks.tracking import resolve_model

    resolve_model(args.model, args.tracking_uri)  # a wrong NAME@ALIAS fails here, in one line
    server.wait_ready()
    _quiet_prefect_input_errors()
    if args.every is not None:
        print(f"defectflow: scoring {inbox} with {args.model} every {args.every:g} s "
              "(Ctrl+C stops)", flush=True)
        serve_every(args.every, **parameters)
        return 0
    summary = score_flow(**parameters)
    print(f"defectflow: {summary['model']} version {summary['model_version']}: scored "
          f"{summary['n_scored']} ({summary['n_defective']} defective), quarantined "
          f"{summary['n_quarantined']}"
          + (f", {summary['n_duplicates']} sent again (already scored: moved to done/, "
             f"no new row)" if summary.get("n_duplicates") else "")
          + (f", {summary['n_recovered']} recovered" if summary.get("n_recovered") else "")
          + ("  (another batch is running: skipped)" if summary["busy"] else ""))
    if summary["n_scored"] or summary["n_quarantined"] or summary.get("n_duplicates"):
        print(f"results: {out / 'results.csv'}   MLflow run: {summary['run_id']}")
    return 0


def cmd_export(args) -> int:
    """Export a registered detector to ONNX or OpenVINO and log the files on its version's run."""
    from defectflow.tasks.params import TrackingParams

    uri = TrackingParams(uri=args.tracking_uri).resolved_uri()
    from defectflow.tasks.tracking import resolve_model

    resolved = resolve_model(args.model, uri)  # a wrong NAME@ALIAS fails here, in one line
    from defectflow.tasks.tracking.exports import export_artifact_path, export_registered

    with tempfile.TemporaryDirectory(prefix="defectflow-export-") as work:
        out = export_registered(resolved, uri, args.format, Path(args.out), work)
    print(f"defectflow: exported {resolved['name']} version {resolved['version']} as "
          f"{args.format} to {out} (logged on run {resolved['run_id']} under "
          f"{export_artifact_path(args.format)}/)")
    return 0


def cmd_serve(args) -> int:
    """Serve the training pipeline as a Prefect deployment on a cron or interval schedule."""
    from defectflow.tasks.errors import DefectflowError
    from defectflow.tasks.params import (ParamsOrigin, error_message, load_params,
                                         parse_overrides)

    if args.interval is not None and args.interval <= 0:
        raise DefectflowError(f"--interval must be a positive number of seconds, "
                              f"got {args.interval:g}")
    overrides = parse_overrides(args.set or [])
    params = load_params(args.params, overrides)  # bad params fail now, not at the first run
    from prefect.settings import Settings

    api_url = Settings().api.url  # read now from the environment and profile
    if args.cron is not None:
        from prefect.client.schemas.schedules import CronSchedule
        from pydantic import ValidationError

        try:
            CronSchedule(cron=args.cron)
        except ValidationError as exc:
            raise DefectflowError(f"--cron {args.cron!r}: {error_message(exc.errors()[0])}"
                                  ) from None
    if not api_url:
        # Prefect's temporary server has no scheduler: scheduled runs would never start.
        raise DefectflowError("serve needs a Prefect server with a scheduler: run `prefect "
                              "server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    from defectflow.flows.preflight import preflight

    # After the arguments' own checks: those need no folder or store to be touched.
    preflight(params, ParamsOrigin(args.params, overrides))
    from defectflow.flows.schedule import serve

    when = f"cron {args.cron!r}" if args.cron is not None else f"every {args.interval:g} s"
    print(f"defectflow: serving {params.dataset_name} training ({args.params}) {when} as "
          f"deployment 'defectflow-training/{args.name}' on {api_url} "
          "(Ctrl+C stops)", flush=True)
    serve(args.params, overrides, cron=args.cron, interval=args.interval, name=args.name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    # The module's text as it is (plain text, every command listed).
    parser = argparse.ArgumentParser(prog="defectflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train, evaluate and track the detectors of one dataset")
    run.add_argument("params", nargs="?", help="params YAML (default: params/elpv.yaml)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a parameter, e.g. --set features.input_size=160")
    run.add_argument("--quiet", action="store_true", help="no per-step progress")
    run.add_argument("--verbose", action="store_true", help="show Prefect's logs")
    run.set_defaults(func=cmd_run)
    score = sub.add_parser("score", help="score an inbox of new images with a registered model")
    score.add_argument("--model", required=True, metavar="NAME@ALIAS",
                       help="registered model, e.g. defectflow-elpv-mono-patchcore@champion "
                            "(or NAME/VERSION)")
    score.add_argument("--inbox", required=True, metavar="DIR", help="folder of new images")
    score.add_argument("--out", required=True, metavar="DIR",
                       help="results.csv, maps/ and overlays/ go here")
    score.add_argument("--tracking-uri", default=None, metavar="URI",
                       help="MLflow tracking and registry URI (default: MLFLOW_TRACKING_URI, "
                            "else sqlite:///mlflow.db)")
    score.add_argument("--every", type=float, metavar="SECONDS",
                       help="serve as a Prefect deployment that scores every SECONDS")
    score.add_argument("--format", choices=("onnx", "openvino"), default=None,
                       help="score through the version's exported model (exported and logged "
                            "first when it has none) instead of its pyfunc")
    score.add_argument("--verbose", action="store_true", help="show Prefect's logs")
    score.set_defaults(func=cmd_score)
    export = sub.add_parser("export", help="export a registered detector to ONNX or OpenVINO")
    export.add_argument("--model", required=True, metavar="NAME@ALIAS",
                        help="registered model (or NAME/VERSION)")
    export.add_argument("--format", required=True, choices=("onnx", "openvino"))
    export.add_argument("--out", required=True, metavar="DIR",
                        help="the model file(s), export.json and scoring.json go here")
    export.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow tracking and registry URI (default: MLFLOW_TRACKING_URI, "
                             "else sqlite:///mlflow.db)")
    export.set_defaults(func=cmd_export)
    serve = sub.add_parser("serve", help="serve the training pipeline as a Prefect deployment "
                                         "on a schedule (needs a Prefect server: prefect "
                                         "server start)")
    serve.add_argument("params", help="params YAML, read again at every scheduled run")
    when = serve.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", metavar="EXPR", help='cron schedule, e.g. "0 2 * * *"')
    when.add_argument("--interval", type=float, metavar="SECONDS",
                      help="run every SECONDS seconds")
    serve.add_argument("--name", default="scheduled",
                       help="deployment name (default: scheduled)")
    serve.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a parameter, e.g. --set execution.task_runner=dask")
    serve.add_argument("--verbose", action="store_true", help="show Prefect's logs")
    serve.set_defaults(func=cmd_serve)
    return parser


def one_line(message: str) -> str:
    """An error message on one line (a driver's message may span several)."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if getattr(args, "verbose", False):
        os.environ["PREFECT_LOGGING_LEVEL"] = "INFO"
    from defectflow.tasks.errors import DefectflowError

    try:
        return args.func(args)
    except DefectflowError as exc:
        print(f"defectflow: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        # The machine's, not the code's: a read-only or full disk, a permission. One line.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"defectflow: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("defectflow: interrupted (finished steps stay cached)", file=sys.stderr)
        return 130


def entry() -> None:
    """Console-script entry point.

    Interpreter teardown after a run (freeing torch, faiss and Prefect's
    loops) took ~2 s on 2 cores, often longer than a cached run's work. The
    exit handlers still run (Prefect drains its queues there, our server
    stops), outputs are flushed, and the process then ends at once.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


if __name__ == "__main__":
    entry()
