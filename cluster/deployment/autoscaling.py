"""Serve autoscaling for the workers. Requests reach target and draft workers over their own gRPC
servers, not through Serve handles, so Serve's default policy (ongoing handle requests) would see
no load. Each worker reports `active_requests` through `record_autoscaling_stats()` instead, and this
policy sizes the deployment from it. In a Serve config:

    autoscaling_config:
      min_replicas: 1
      max_replicas: 4
      target_ongoing_requests: 3        # active requests per replica to aim for
      policy: {policy_function: drafthorse.cluster.deployment.autoscaling:active_requests_policy}

Serve applies min/max_replicas, the up/downscale delays and factors around it; new replicas that do
not fit the Ray cluster make the Ray autoscaler add a worker pod of the group offering their resources."""
from __future__ import annotations

METRIC = "active_requests"


def active_requests_policy(ctx) -> tuple[float, dict]:
    """Desired replicas = active requests over all replicas / target_ongoing_requests."""
    per_replica = (ctx.aggregated_metrics or {}).get(METRIC) or {}
    if not per_replica or ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    return sum(per_replica.values()) / ctx.config.get_target_ongoing_requests(), {}
