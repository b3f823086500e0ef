"""The main job's summary: counts and FLOPs of a preset."""

from model.config import get_preset
from model.summary import describe


def test_describe_tiny():
  row = describe("tiny", get_preset("tiny"), seq_len=256)
  assert row["total"] == 1_102_336 and row["activated"] == 659_968
  assert row["flops_per_token"] == get_preset("tiny").flops_per_token(256) > 6 * 600_000
