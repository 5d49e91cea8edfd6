"""The scheduler over the real Ray Serve wrapper: one handle call per batch."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from ray import serve

from scheduler import BackendError, BackendUnavailableError, BatchPolicy, BatchRecord, ModelBatcher
from serving.cluster import RayBatchBackend
from serving.demo import ensure_demo_model, load_digits_split
from serving.models import ModelRunner
from serving.replica import model_deployment

pytestmark = pytest.mark.timeout(300)


def test_batches_run_on_a_serve_replica_and_rows_come_back_in_place(
    ray_serve: None, tmp_path: Path
) -> None:
    config = ensure_demo_model(tmp_path)
    handle = serve.run(model_deployment(config), name="it-digits", route_prefix=None)
    local = ModelRunner(config, num_threads=1)
    _, x_test, _, y_test = load_digits_split()
    x_test = np.asarray(x_test, dtype=np.float32)
    records: list[BatchRecord] = []

    async def main() -> list[np.ndarray]:
        batcher = ModelBatcher(
            "digits",
            "1",
            RayBatchBackend(handle),
            BatchPolicy(max_batch_size=64, max_in_flight=2),
            observer=records.append,
        )
        batcher.start()
        sizes = [1 + i % 7 for i in range(80)]
        starts = np.cumsum([0, *sizes[:-1]])
        outs = await asyncio.gather(
            *(
                batcher.submit(f"t{i % 4}", {"pixels": x_test[s : s + n]}, n)
                for i, (s, n) in enumerate(zip(starts, sizes, strict=True))
            )
        )
        await batcher.close()
        return [o["logits"] for o in outs]

    try:
        outs = asyncio.run(main())
        together = np.concatenate(outs)
        n = together.shape[0]
        alone, _ = local.run({"pixels": x_test[:n]})
        np.testing.assert_allclose(together, alone["logits"], rtol=1e-4, atol=1e-4)
        assert (together.argmax(1) == np.asarray(y_test[:n])).mean() > 0.9
        assert sum(r.rows for r in records) == n
        assert len(records) < 80 / 2  # one Ray call per batch, not per request
        assert all(r.result is not None and r.result.device_ns > 0 for r in records)
        assert {r.result.device for r in records if r.result} == {"cpu"}

        async def bad() -> None:
            # Bypasses the router's validation: the replica's own check must surface.
            await RayBatchBackend(handle).run_batch({"pixels": np.zeros((2, 3), np.float32)})

        # The replica's own error (naming the input) stays in the log; callers get a
        # generic, non-retryable failure, not BackendUnavailableError.
        with pytest.raises(BackendError, match="the model failed to run the batch") as info:
            asyncio.run(bad())
        assert not isinstance(info.value, BackendUnavailableError)
        assert "pixels" in str(info.value.__cause__)
    finally:
        serve.delete("it-digits")
