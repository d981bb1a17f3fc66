"""The operating commands: the local Prefect server, the nightly run, serve."""

from __future__ import annotations

import argparse
import json
import os
import sys

from flows.commands.common import prefect_api


def cmd_server(args: argparse.Namespace) -> int:
    """The local Prefect server, and beside it the warm runner that lets later commands in this
    environment start without imports (:mod:`flows.warm`; ``--no-warm``: the server alone)."""
    from flows import runtime, warm

    if args.action == "start":
        api = runtime.start_local_server(port=args.port)
        print(f"Prefect server {'started' if api.started_here else 'already running'}: UI {api.ui_url}")
        print(f"export PREFECT_API_URL={api.api_url}")
        if not args.no_warm:
            pid = warm.start()
            print(f"warm runner: pid {pid}" if pid else
                  f"warm runner did not start (commands run as before); see {warm.runner_home() / warm.LOG_NAME}",
                  file=sys.stderr if pid is None else sys.stdout)
    elif args.action == "stop":
        warm.stop()
        print("stopped" if runtime.stop_local_server() else "no local server was running")
    else:
        state = runtime.local_server_status()
        print(json.dumps(state) if state else "no local server running")
        runner = warm.status()
        print(json.dumps({"warm_runner": runner}) if runner else "no warm runner")
    return 0


def _nightly_config(args: argparse.Namespace):
    from flows.nightly_config import NightlyConfig

    overrides = {k: v for k, v in (("store", args.store), ("sources", args.source)) if v}
    return NightlyConfig.from_file(args.config, **overrides)


def cmd_nightly(args: argparse.Namespace) -> int:
    """One nightly run now: ingest -> labels -> preprocess -> train -> infer."""
    config = _nightly_config(args)
    api = prefect_api()
    from flows.nightly import run_nightly

    summary = run_nightly(config, dask_address=args.dask_address, n_workers=args.workers, api_url=api.api_url)
    for stage in summary["stages"]:
        print(f"{stage['stage']:<24} {stage.get('detail', '')}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the deployments on this machine until interrupted (Ctrl-C / SIGTERM): a local
    Prefect server if none is configured, schedules, and a runner that executes the runs."""
    from flows.deployments import runner_deployments
    from flows.serve import serve, served_config_file

    config = _nightly_config(args)  # checked now: a broken file stops serve before it starts
    config_file = served_config_file(config, args.config, overridden=bool(args.store or args.source))
    api = prefect_api()
    if args.dask_address:
        os.environ["VOXELFLOW_DASK_ADDRESS"] = args.dask_address  # the runs' subprocesses inherit it
    deps = runner_deployments(config_file, args.timezone, args.cron)
    scheduled = "; ".join(f"{d.name} at {s.schedule.cron!r} {s.schedule.timezone}" for d in deps for s in d.schedules)
    print(f"serving {len(deps)} deployments of deployment/prefect.yaml ({', '.join(d.name for d in deps)}); "
          f"{scheduled or 'none scheduled'}; UI {api.ui_url}/deployments", flush=True)
    serve(deps, api, limit=args.limit, keep_server=args.keep_server,
          stop_after_s=float(os.environ.get("VOXELFLOW_SERVE_STOP_S", 60)))
    print("stopped", flush=True)
    return 0
