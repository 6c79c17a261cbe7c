"""The live control plane: the scheduling core behind gRPC.

Modules, one job each:
* `registry`       — what the service knows of workers and jobs beyond the core's `Job`;
* `reservations`   — per worker, what plans reserved that its memory reports do not show yet;
* `context`        — the shared state of one control plane (scheduler, registry, clock) and the
                     few operations every handler needs (send actions, finish a job);
* `planner`        — the one task that calls `Scheduler.build_plan` when something changed;
* `worker_stream`  — `WorkerService.Connect`: registration, reports in, plans out;
* `validation`     — checks of client requests, raising `InvalidRequest` with a clear message;
* `agent_service`  — `AgentService`, the client-facing API;
* `predictor_link` — estimates from the remote predictor, with a local fallback;
* `tracing`        — the spans of each job's trace;
* `stats`          — event counts and plan latencies (for `astraea bench-service`);
* `server`         — `serve()` and the `astraea-control-plane` entry point.
"""
