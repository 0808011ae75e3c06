"""Code that exists for one lesson's demonstration, not for reuse: ``stream_loss`` (what the
origin's per-chunk decoding drops, notebook 03) and ``log_experiment`` (one fixed load under
each log preset, notebook 05)."""
