"""The live control plane: the scheduling core behind gRPC (issue #3, item 2).

Modules, one job each:
* `registry`       — what the service knows of workers and jobs beyond the core's `Job`;
* `context`        — the shared state of one control plane (scheduler, registry, clock) and the
                     few operations every handler needs (send actions, finish a job);
* `planner`        — the one task that calls `Scheduler.build_plan` when something changed;
* `worker_stream`  — `WorkerService.Connect`: registration, reports in, plans out;
* `validation`     — checks of client requests, raising `InvalidRequest` with a clear message;
* `agent_service`  — `AgentService`, the client-facing API;
* `server`         — `serve()` and the `astraea-control-plane` entry point.
"""
