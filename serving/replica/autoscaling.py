"""Autoscaling a model version on the rows its replicas hold, through Ray Serve.

Batches bypass Serve's request path (serving.dataplane), so Serve's own autoscaler,
which counts the requests routed through it, would see an idle deployment. Instead
each replica reports a custom metric, :data:`ROWS_METRIC`: the rows of the batches it
has received and not yet answered (queued and running), averaged over time
(``ModelReplica.record_autoscaling_stats``). Serve's controller averages each
replica's reports over :data:`LOOK_BACK_S` and runs :class:`QueuedRowsPolicy`, which
asks for ``ceil(total rows / target rows per replica)`` replicas; Serve applies the
config's delays and bounds and adds or stops replicas.

Serve pickles the policy class by value into its controller, so it refers only to
the standard library and this module's constants.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from serving.config import ModelConfig

if TYPE_CHECKING:
    from ray.serve.config import AutoscalingContext

ROWS_METRIC = "gpugate_rows_in_flight"
# How often replicas push their reports to Serve's controller. Serve reads this from
# the config's ``metrics_interval_s``, which it marks deprecated in favour of
# RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S, an environment variable Ray
# 2.60 defines but never reads; its default of 10 s would delay every decision by up
# to that long.
REPORT_INTERVAL_S = 1.0
# The window Serve averages a replica's reports over; a replica records one every
# LOOK_BACK_S * 0.2 s (RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR). It must
# exceed REPORT_INTERVAL_S (else Serve warns).
LOOK_BACK_S = 2.0


class QueuedRowsPolicy:
    """Serve's autoscaling policy (``AutoscalingPolicy.policy_function``): as many
    replicas as the rows held need at ``target_rows_per_replica`` each. Serve bounds the
    answer by min/max_replicas and applies the up/downscale delays."""

    def __init__(self, target_rows_per_replica: float) -> None:
        if not target_rows_per_replica > 0:
            raise ValueError("target_rows_per_replica must be > 0")
        self.target = float(target_rows_per_replica)

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        reports = (ctx.aggregated_metrics or {}).get(ROWS_METRIC) or {}
        if not reports:
            # No replica has reported yet (just started): keep what is asked for now.
            return ctx.target_num_replicas, {}
        rows = sum(reports.values())
        # A residue of averaging (1e-12 rows) must not keep a replica.
        return math.ceil(rows / self.target - 1e-9), {}


def replica_count_options(model: ModelConfig) -> dict[str, Any]:
    """Serve deployment options for ``model``'s replica count: a fixed ``num_replicas``,
    or an autoscaling config on :data:`ROWS_METRIC`."""
    scaling = model.autoscaling
    if scaling is None:
        return {"num_replicas": model.replicas}
    return {
        "autoscaling_config": {
            "min_replicas": scaling.min_replicas,
            "initial_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
            "metrics_interval_s": REPORT_INTERVAL_S,
            "look_back_period_s": LOOK_BACK_S,
            "policy": {
                "policy_function": f"{__name__}:{QueuedRowsPolicy.__name__}",
                "policy_kwargs": {"target_rows_per_replica": model.target_rows_per_replica},
            },
        }
    }
