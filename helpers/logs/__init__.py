"""What a server says: ``presets`` (how loud its log is, from vLLM's supported switches only)
and ``metrics`` (the numbers at ``/metrics``, read and sampled over time)."""
