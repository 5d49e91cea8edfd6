"""Canary rollouts: their durable state and every change to it (``Rollouts``), and the
gateway's controller that applies weights and judges each analysis window.
"""

from serving.rollout.controller import (
    NOT_SERVING_LIMIT_S,
    Analysis,
    Peers,
    RolloutController,
    Taken,
    analyse,
)
from serving.rollout.rollouts import (
    CONTROLLER,
    LIVE_STATES,
    STATES,
    NoRollout,
    Rollout,
    RolloutError,
    Rollouts,
    RolloutSpec,
)

__all__ = [
    "CONTROLLER",
    "LIVE_STATES",
    "NOT_SERVING_LIMIT_S",
    "STATES",
    "Analysis",
    "NoRollout",
    "Peers",
    "Rollout",
    "RolloutController",
    "RolloutError",
    "RolloutSpec",
    "Rollouts",
    "Taken",
    "analyse",
]
