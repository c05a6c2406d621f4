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


def preflight(params) -> None:
    """Check what can be checked before any work starts: data path, backbone and layers."""
    from defectflow.tasks.backbones import available_layers
    from defectflow.tasks.errors import DefectflowError
    from defectflow.tasks.steps import source_fingerprint

    layers = available_layers(params.features.backbone)  # raises for an unknown backbone
    unknown = [layer for layer in params.features.layers if layer not in layers]
    if unknown:
        raise DefectflowError(f"unknown layer(s) {unknown} for backbone "
                              f"{params.features.backbone!r} (valid: {layers})")
    if params.dataset.layout != "elpv":
        source_fingerprint(params.dataset.layout, params.dataset.path)


def print_summary(summary: dict) -> None:
    print()
    print(f"{'category':<16} {'method':<12} {'image AUROC':>11} {'pixel AUROC':>11} "
          f"{'F1-max':>7} {'accuracy':>8}")
    fused = [r for r in summary["results"] if r["method"] == "segad_fusion"]
    for r in summary["results"]:
        if r["method"] == "segad_fusion":
            continue
        pixel = r.get("pixel_auroc")
        pixel_text = f"{pixel:11.4f}" if pixel is not None and pixel == pixel else f"{'-':>11}"
        print(f"{r['category']:<16} {r['method']:<12} {r['image_auroc']:11.4f} {pixel_text} "
              f"{r['f1_max']:7.4f} {r.get('accuracy', float('nan')):8.4f}")
    if fused:
        print("\nSegAD fusion: image AUROC, mean ± std over seeds, on the images the fusion did "
              "not train on\n(in brackets: each detector's anomaly-map maximum alone, "
              "on the same images)")
        for r in fused:
            alone = ", ".join(f"{k.split('.')[0]} {v:.4f}" for k, v in sorted(r.items())
                              if k.endswith("image_score_auroc_mean"))
            print(f"{r['category']:<16} fusion {r['image_auroc']:.4f} ± "
                  f"{r.get('image_auroc_std') or 0:.4f}   ({alone})")
    print(f"\nMLflow: experiment {summary['experiment']!r}, run {summary['parent_run_id']}"
          f"{'  (every step cached)' if summary['all_steps_cached'] else ''}")


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
    preflight(params)
    print(f"defectflow: {params.dataset_name} with {params.features.backbone}, "
          f"methods {sorted(params.methods)}  (params: {path or 'built-in defaults'})", flush=True)
    from defectflow.flows.pipeline import pipeline
    from defectflow.tasks import tracking  # noqa: F401  (MLflow's import, while the server boots)

    server.wait_ready()
    _quiet_prefect_input_errors()
    summary = pipeline(params, verbose=not args.quiet)
    print_summary(summary)
    print(f"total time: {time.perf_counter() - started:.1f} s")
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
