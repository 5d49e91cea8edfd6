"""The direct data plane: batches go gateway -> model replica over one TCP hop.

Ray Serve keeps owning the replicas (placement, CPUs/GPUs, health checks,
restarts, scaling); only the batches bypass its request path. Each replica opens
a data port on an ephemeral port the first time it is asked for its address
(:meth:`ModelReplica.data_endpoint`, a Serve handle call), and the gateway keeps
a few connections per replica. A Serve handle call per batch
costs several times this hop (docs/benchmarks.md).

Authentication: a replica takes batches only from a gateway that proves the cluster
secret in a handshake on connect, and proves it back before the gateway sends any
(:mod:`serving.dataplane.auth`). The port binds loopback when the asking gateway is on
the replica's Ray node, else the node's address.

Wire format: TCP (asyncio streams on the gateway's side, an asyncio Protocol on the
replica's), each message a 4-byte little-endian length and a
KServe v2 protobuf (the proto this project already speaks): a batch is a
``ModelInferRequest`` with one ``raw_input_contents`` entry per tensor and its
numpy dtype in ``datatype``; the answer a ``ModelInferResponse`` with the measured
device time (or the model's error) in its parameters. Raw bytes only, nothing is
pickled. Not gRPC: a unary
grpcio call between the same two processes costs several times more, and
grpc.aio's completions add thread hops under load. A connection carries one batch at a
time, so no request ids or multiplexing are needed: the gateway opens one per
batch in flight (``max_in_flight`` bounds them) and reuses it.

Order at the replica: batches run one at a time; of those that have arrived, a
latency-lane batch (``urgent`` in the request's parameters) goes before the
ordinary ones waiting, never before the one running. A batch also says whose rows
it holds (``shares``: tenant, rows, weight, priority), and the replica orders the
ordinary batches of every gateway by the same weighted counters as a gateway's
queue (:class:`scheduler.ReplicaQueue`), so tenants spread over several gateways
still share the device by weight.

Failure handling: a connection that is refused, reset or closed mid-batch means
the replica is gone: its address is forgotten, the batch is retried on
another known replica (the forward has no side effects and only an answer is
billed), else it fails with :class:`BackendUnavailableError` (a retryable 503).
The next batch asks Serve again, which answers from a live (or restarted)
replica. Addresses are also refreshed every ``refresh_s``, and every 0.2-2 s while
fewer replicas are known than the version may have, so scaled-up replicas get traffic.

Scale-down: a replica that Serve stops runs the batches it has received and answers
any later one with a "stopping" refusal (the batch did not run); the gateway forgets
it and sends the batch to another replica, asking Serve again if it knows no other.
The rows a replica holds (:class:`RowsInFlight`) are what Serve's autoscaler scales
on (serving.replica.autoscaling).
"""

from serving.dataplane.auth import (
    SECRET_FILE,
    ClusterSecret,
    HandshakeError,
    cluster_secret,
    ensure_secret_file,
    read_secret_file,
)
from serving.dataplane.client import DirectBatchBackend, open_connection
from serving.dataplane.codec import ReplicaError, ReplicaStoppingError
from serving.dataplane.load import RowsInFlight
from serving.dataplane.server import ReplicaDataServer

__all__ = [
    "SECRET_FILE",
    "ClusterSecret",
    "DirectBatchBackend",
    "HandshakeError",
    "ReplicaDataServer",
    "ReplicaError",
    "ReplicaStoppingError",
    "RowsInFlight",
    "cluster_secret",
    "ensure_secret_file",
    "open_connection",
    "read_secret_file",
]
