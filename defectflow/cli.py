"""``defectflow`` command line: ``defectflow run [PARAMS.yaml]``.

Bad input ends in one line naming the file and the problem (exit code 2).
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
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
    "GIT_PYTHON_REFRESH": "quiet",
}


def default_params_path() -> Path | None:
    """params/elpv.yaml of this checkout (or of the current folder)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        candidate = root / "params" / "elpv.yaml"
        if candidate.is_file():
            return candidate
    return None


def _parse_overrides(items: list[str]) -> dict:
    import yaml

    from defectflow.tasks.errors import DefectflowError

    overrides = {}
    for item in items:
        if "=" not in item:
            raise DefectflowError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


# The detectors' columns of the run summary, after category and method.
SUMMARY_COLUMNS = ("image_auroc", "pixel_auroc", "f1_max", "accuracy")


def print_summary(summary: PipelineSummary) -> None:
    # Imported here, as the CLI's other project imports: pandas is not paid for by --help.
    from defectflow.tasks.evaluation import COLUMN_TITLES, comparison_table, format_table
    from defectflow.tasks.params import FUSION_METHOD

    detectors = [r.row() for r in summary.results if r.method != FUSION_METHOD]
    fused = [r for r in summary.results if r.method == FUSION_METHOD]
    print()
    if detectors:
        print(format_table(comparison_table(detectors, columns=SUMMARY_COLUMNS), digits=4,
                           titles=COLUMN_TITLES))
    if fused:
        print("\nSegAD fusion: image AUROC, mean ± std over seeds (as its MLflow run and "
              "comparison.csv), on the images the fusion did not train on\n(<detector> alone: "
              "the detector's own image score on the same images; fusion: mode, setting: what "
              "the seeds chose)")
        print(format_table(comparison_table([r.row() for r in fused]), digits=4,
                           titles=COLUMN_TITLES))
    print(f"\nMLflow: experiment {summary.experiment!r}, run {summary.parent_run_id}"
          f"{'  (every step cached)' if summary.all_steps_cached else ''}")
    for r in summary.registered:  # params.registry.enabled
        aliases = ", ".join(f"{k} -> version {v}" for k, v in r.aliases.items())
        print(f"registered {r.name} version {r.version}  ({aliases})")


class _HideInputErrors(logging.Filter):
    """Prefect logs a failed task's traceback; for bad input the CLI's one line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        from defectflow.tasks.errors import DefectflowError

        if record.exc_info and isinstance(record.exc_info[1], DefectflowError):
            return False
        return "DefectflowError" not in record.getMessage()


def _quiet_prefect_input_errors() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_HideInputErrors())


def cmd_run(args) -> int:
    started = time.perf_counter()
    from defectflow import server

    # Prefect's local API server boots (one core) while we import and validate (the other).
    server.start_early()
    from defectflow.tasks.params import load_params

    path = args.params or default_params_path()
    params = load_params(path, _parse_overrides(args.set or []))
    from defectflow.flows.preflight import preflight

    preflight(params)
    print(f"defectflow: {params.dataset_name} with {params.features.backbone}, "
          f"methods {sorted(params.methods)}  (params: {path or 'built-in defaults'})", flush=True)
    from defectflow.flows.runners import run_pipeline
    from defectflow.tasks import tracking  # noqa: F401  (MLflow's import, while the server boots)

    server.wait_ready()
    _quiet_prefect_input_errors()
    summary = run_pipeline(params, verbose=not args.quiet)  # on params' execution.task_runner
    print_summary(summary)
    print(f"total time: {time.perf_counter() - started:.1f} s")
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
    out.mkdir(parents=True, exist_ok=True)
    from defectflow.tasks.params import TrackingParams

    # As for `run`: --tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.
    args.tracking_uri = TrackingParams(uri=args.tracking_uri).resolved_uri()
    parameters = dict(model=args.model, inbox=str(inbox.resolve()), out=str(out.resolve()),
                      tracking_uri=args.tracking_uri)
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
          f"{summary['n_quarantined']}" + ("  (another batch is running: skipped)"
                                           if summary["busy"] else ""))
    if summary["n_scored"] or summary["n_quarantined"]:
        print(f"results: {out / 'results.csv'}   MLflow run: {summary['run_id']}")
    return 0


def cmd_serve(args) -> int:
    """Serve the training pipeline as a Prefect deployment on a cron or interval schedule."""
    from defectflow.tasks.errors import DefectflowError
    from defectflow.tasks.params import load_params

    if args.interval is not None and args.interval <= 0:
        raise DefectflowError(f"--interval must be a positive number of seconds, "
                              f"got {args.interval:g}")
    overrides = _parse_overrides(args.set or [])
    params = load_params(args.params, overrides)  # bad params fail now, not at the first run
    from defectflow.flows.preflight import preflight

    preflight(params)
    from prefect.settings import Settings

    api_url = Settings().api.url  # read now from the environment and profile
    if args.cron is not None:
        from prefect.client.schemas.schedules import CronSchedule
        from pydantic import ValidationError

        try:
            CronSchedule(cron=args.cron)
        except ValidationError as exc:
            raise DefectflowError(f"--cron {args.cron!r}: {exc.errors()[0]['msg']}") from None
    if not api_url:
        # Prefect's temporary server has no scheduler: scheduled runs would never start.
        raise DefectflowError("serve needs a Prefect server with a scheduler: run `prefect "
                              "server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    from defectflow.flows.schedule import serve

    when = f"cron {args.cron!r}" if args.cron is not None else f"every {args.interval:g} s"
    print(f"defectflow: serving {params.dataset_name} training ({args.params}) {when} as "
          f"deployment 'defectflow-training/{args.name}' on {api_url} "
          "(Ctrl+C stops)", flush=True)
    serve(args.params, overrides, cron=args.cron, interval=args.interval, name=args.name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="defectflow", description=__doc__.splitlines()[0])
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
    score.add_argument("--verbose", action="store_true", help="show Prefect's logs")
    score.set_defaults(func=cmd_score)
    serve = sub.add_parser("serve", help="serve the training pipeline as a Prefect deployment "
                                         "on a schedule (needs `prefect server start`)")
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
        print(f"defectflow: error: {exc}", file=sys.stderr)
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
