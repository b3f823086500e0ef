"""metrics.jsonl and TensorBoard events."""

import glob
import json
import os

from train.metrics import MetricsWriter, peak_flops, table_peak


def test_metrics_rows_and_tensorboard_events(tmp_path):
  writer = MetricsWriter(str(tmp_path), total_steps=20)
  writer.write(10, {"loss": 2.5, "lr": 1e-3, "note": "x"})
  writer.write(20, {"loss": 2.0, "lr": 5e-4})
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows == [{"step": 10, "loss": 2.5, "lr": 1e-3, "note": "x"},
                  {"step": 20, "loss": 2.0, "lr": 5e-4}]
  events = glob.glob(os.path.join(tmp_path, "tb", "events.out.tfevents.*"))
  assert events and os.path.getsize(events[0]) > 0


def test_peak_flops_sources():
  assert peak_flops(1e12) == (1e12, "flag")
  assert table_peak("TPU v5") == ("TPU v5", 459e12)  # v5p's device_kind.
  assert table_peak("TPU v5 lite") == ("TPU v5 lite", 197e12)
  assert table_peak("NVIDIA H100 80GB HBM3") == ("NVIDIA H100", 989e12)
  assert table_peak("TPU v7x") is None and table_peak("cpu") is None
  flops, source = peak_flops()
  assert source == "measured_matmul" and flops > 1e8
