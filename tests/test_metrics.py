"""metrics.jsonl and TensorBoard events."""

import glob
import json
import os

from train.metrics import MetricsWriter, peak_flops, read_metrics, table_peak


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


def test_a_resumed_writer_drops_the_rows_after_its_checkpoint(tmp_path):
  """Rows past the resume step (logged before a kill) and a last line cut short go; the file
  then reads like an uninterrupted run's. A broken line elsewhere is an error naming it."""
  path = tmp_path / "metrics.jsonl"
  rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
  path.write_text("\n".join(rows) + "\n" + '{"step": 5, "lo')
  MetricsWriter(str(tmp_path), 10, resume_step=2).write(3, {"loss": 0.5})
  assert [json.loads(line) for line in path.read_text().splitlines()] == [
      {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.5}]
  path.write_text("\n".join(rows[:2]) + "\n" + rows[2])  # Whole rows, the last without "\n".
  MetricsWriter(str(tmp_path), 10, resume_step=3)
  assert path.read_text() == "\n".join(rows[:3]) + "\n"
  path.write_text(rows[0] + "\n{broken\n" + rows[1] + "\n")
  try:
    MetricsWriter(str(tmp_path), 10, resume_step=2)
    raise AssertionError("a broken middle line was accepted")
  except ValueError as e:
    assert "metrics.jsonl:2: not JSON" in str(e)
  assert read_metrics(str(tmp_path / "absent")) == []
