"""Ray Serve deployment of one model version: load the artifact, run batches."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any

import ray
from ray import serve

from scheduler import BatchResult, Tensors
from serving.config import ModelConfig
from serving.dataplane import ClusterSecret, ReplicaDataServer, RowsInFlight
from serving.replica.artifacts import ModelLoadError
from serving.replica.autoscaling import ROWS_METRIC, replica_count_options
from serving.replica.runner import ModelRunner

log = logging.getLogger(__name__)


def check_artifact_digest(config: ModelConfig) -> None:
    """Refuse to load an artifact whose bytes differ from the registered sha256."""
    if config.sha256 is None:
        return
    h = hashlib.sha256()
    with config.artifact.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != config.sha256:
        raise ModelLoadError(
            config.artifact,
            f"sha256 is {h.hexdigest()}, expected {config.sha256}: the bytes changed after "
            "registration",
        )


class ModelReplica:
    """One replica: the model on its device (CUDA when given GPUs and present).

    It holds no database credentials: model code runs in this process. What it
    reserves (for the cost ledger's idle capacity) it tells whoever asks
    (:meth:`reservation`); the ``gpugate serve`` driver writes the rows. Its data
    plane takes batches only from gateways that prove ``secret``. The rows it holds
    (received, not yet answered) are what Serve's autoscaler scales the version on
    (:meth:`record_autoscaling_stats`).
    """

    def __init__(self, model: dict[str, Any], secret: ClusterSecret) -> None:
        if not isinstance(secret, ClusterSecret):
            raise TypeError("a model replica needs the cluster secret")
        self.config = ModelConfig.model_validate(model)
        check_artifact_digest(self.config)
        self.runner = ModelRunner(self.config)
        self.runner.warmup()
        on_gpu = self.runner.device.type == "cuda"
        self.device_share = self.config.num_gpus if on_gpu else self.config.num_cpus
        self._secret = secret
        self._loaded_at = time.time()
        self._data_lock = threading.Lock()
        self._load = RowsInFlight()  # the data plane's batches and Serve's calls
        # One server on every address it is reached at: one fair order for all gateways.
        self._data = ReplicaDataServer(self._forward, self._secret, load=self._load)
        log.info(
            "model %s:%s ready on %s", self.config.name, self.config.version, self.runner.device
        )

    def run_batch(self, inputs: Tensors) -> BatchResult:
        """One batch over Serve's request path (``replica_transport`` grpc or actor)."""
        rows = len(next(iter(inputs.values()))) if inputs else 0
        self._load.add(rows)
        try:
            return self._forward(inputs)
        finally:
            self._load.add(-rows)

    def _forward(self, inputs: Tensors) -> BatchResult:
        outputs, device_ns = self.runner.run(inputs)
        return BatchResult(
            outputs=outputs,
            device_ns=device_ns,
            device=self.runner.device_type,
            device_share=self.device_share,
        )

    def data_endpoint(self, caller_node_id: str) -> str:
        """The address of this replica's direct data plane (serving.dataplane), opened
        on first use: on loopback for a caller on the same Ray node, else on the node's
        address (what Ray's own workers listen on)."""
        same_node = caller_node_id == ray.get_runtime_context().get_node_id()
        host = "127.0.0.1" if same_node else ray.util.get_node_ip_address()
        with self._data_lock:
            known = len(self._data.addresses)
            address = self._data.start(host)
            if len(self._data.addresses) > known:
                log.info("data plane of %s on %s", deployment_name(self.config), address)
            return address

    def reservation(self) -> dict[str, Any]:
        """What this replica reserves, from when: Serve's id of it (its actor's name
        ends with it), its device label and share, and when it had loaded (unix s)."""
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "device": self.runner.device_type,
            "device_share": self.device_share,
            "loaded_at": self._loaded_at,
        }

    def data_stats(self) -> dict[str, int]:
        """The data plane's counters: batches run, connections admitted and refused."""
        data = self._data
        return {"batches": data.batches, "admitted": data.admitted, "refused": data.refused}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom-metrics hook (autoscaled versions): the rows held on average
        since the previous call (serving.replica.autoscaling)."""
        return {ROWS_METRIC: self._load.mean()}

    def check_health(self) -> None:
        """Serve's health probe: a dead data plane makes Serve restart the replica."""
        if not self._data.healthy:
            raise RuntimeError("the data plane's thread stopped")

    def __del__(self) -> None:
        """Serve calls this on graceful shutdown: finish data-plane batches."""
        data = getattr(self, "_data", None)
        if data is not None:
            data.stop(grace_s=5.0)


def deployment_name(model: ModelConfig) -> str:
    return f"model-{model.name}-{model.version}"


def model_deployment(model: ModelConfig, secret: ClusterSecret) -> Any:
    """The bound Serve deployment for one model version. Its arguments are the model's
    config and the cluster secret, nothing else: no database URL, no state folder."""
    return (
        serve.deployment(ModelReplica)
        .options(
            name=deployment_name(model),
            **replica_count_options(model),
            # The gateway's batcher already bounds batches in flight. Serve's own cap
            # must sit above it: a replica's count drops only after its reply is sent,
            # and at the cap Serve rejects and backs off for tens of milliseconds.
            max_ongoing_requests=2 * model.batches_in_flight_per_replica + 2,
            ray_actor_options={"num_cpus": model.num_cpus, "num_gpus": model.num_gpus},
            # A log line per batch costs the replica CPU the forward needs; the
            # gateway's own metrics count every batch.
            logging_config={"enable_access_log": False, "log_level": "WARNING"},
        )
        .bind(model.model_dump(mode="json"), secret)
    )
