"""One fixed load under one log preset: what the log said, and what ``/metrics`` said.

Notebook 05 runs the same thing for each preset::

    from helpers.lessons.log_experiment import run_preset, run_presets
    run = run_preset("quiet")        # start a server, load it, count its log lines, stop it
    run.counts["stats"]              # 0: the periodic line is gone
    run.final_metrics.value("vllm:generation_tokens_total")   # the numbers are not

The load is deterministic in content (fixed prompts, ``temperature=0``, a fixed
``max_tokens``) and includes two requests that make vLLM write to its log on purpose: one for a
model the server does not serve (an ERROR line, 404) and one with a field vLLM removed
(``guided_choice``: a WARNING line). A preset that hid those would hide real problems.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from ..errors import TutorialError
from ..logs import presets as log_presets
from ..logs.metrics import Metrics, Sampler, timeseries
from ..server import hardware
from ..server import registry
from ..server.config import from_settings
from ..server.guard import ProcessGroup
from ..server.lifecycle import VLLMServer
from ..settings import Settings, load_settings

PROMPTS = (
    "Name three colours of the rainbow.",
    "What is two plus two? Answer in one sentence.",
    "Write one sentence about the sea.",
    "List the first five even numbers.",
    "What is the capital of Italy? One sentence.",
    "Give one tip for learning a language.",
    "Name a planet in the solar system.",
    "What do bees make? One sentence.",
)
MAX_TOKENS = 48
CONCURRENCY = 4
# The demo's stats interval (vLLM's default is 10 s): a short load still shows several lines.
STATS_INTERVAL = 1.0
SIDE_BY_SIDE = 2          # CPU servers alive at once in run_presets
UNSERVED_MODEL = "no-such-model"      # 404, and vLLM logs "ERROR ... Error with model"
REMOVED_FIELD = {"guided_choice": ["yes", "no"]}   # 200, and vLLM logs a WARNING (once)


@dataclass(frozen=True)
class LoadReport:
    ok: int
    failed: dict            # what each deliberately failing request got back
    completion_tokens: int
    seconds: float


def fixed_load(server: VLLMServer, prompts=PROMPTS, max_tokens: int = MAX_TOKENS,
               concurrency: int = CONCURRENCY) -> LoadReport:
    """The fixed load: ``prompts`` (``concurrency`` at a time), then the two log-provoking requests."""
    import openai

    client = server.client()

    def ask(prompt: str):
        return client.chat.completions.create(
            model=server.name, messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens, temperature=0)

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        replies = list(pool.map(ask, prompts))
    failed = {}
    try:
        client.chat.completions.create(model=UNSERVED_MODEL, max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])
        failed["unserved model"] = "answered (unexpected)"
    except openai.NotFoundError as err:
        failed["unserved model"] = f"{err.status_code} Not Found"
    reply = client.chat.completions.create(model=server.name, max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "yes or no?"}],
                                           extra_body=REMOVED_FIELD)
    failed["removed field"] = f"200, field ignored ({reply.usage.completion_tokens} tokens)"
    tokens = sum(r.usage.completion_tokens for r in replies)
    return LoadReport(len(replies), failed, tokens, time.monotonic() - started)


@dataclass(frozen=True)
class PresetRun:
    """What one preset's server wrote and exported during the fixed load."""

    preset: str
    command: str
    counts: dict                      # log lines per kind written during the load
    startup_counts: dict              # log lines per kind written while starting
    load: LoadReport
    log_excerpt: str                  # the lines written during the load, classified
    final_metrics: Metrics
    samples: list = field(default_factory=list, repr=False)
    group: ProcessGroup | None = None  # the stopped server's processes

    def processes_left(self) -> list[int]:
        """Processes of this run's server still alive (always none: it was stopped)."""
        return self.group.members() if self.group else []

    @property
    def metrics_kept(self) -> bool:
        """Whether ``/metrics`` still carries vLLM's numbers under this preset."""
        return self.final_metrics.value("vllm:generation_tokens_total") > 0


def preset_config(preset: str, settings: Settings | None = None, stats_interval: float = STATS_INTERVAL,
                  progress=print):
    """The server configuration of ``settings`` with log preset ``preset`` and the demo's interval."""
    settings = settings or load_settings()
    config = from_settings(replace(settings, log_preset=preset), log=progress)
    env = {**config.env, "VLLM_LOG_STATS_INTERVAL": f"{stats_interval:g}"}
    return replace(config, env=env, reasons=config.reasons + (
        (f"VLLM_LOG_STATS_INTERVAL={stats_interval:g}", "the demo's stats interval (vLLM's default: 10 s)"),))


def run_presets(presets: list[str], *, settings: Settings | None = None,
                stats_interval: float = STATS_INTERVAL, sample: tuple[str, ...] = (),
                sample_every: float = 0.5, gpus: tuple | None = None, progress=print) -> list[PresetRun]:
    """For each preset: a fresh server, the fixed load, the log lines it caused; then stop it.

    Nothing is shared between presets. On the CPU the next server starts while one takes the
    load, two alive at a time (each holds about 3 GiB of RAM); on a GPU each needs the card, so
    they run one at a time, and a
    server already running is named before anything starts. For the presets in ``sample``,
    ``/metrics`` is scraped every ``sample_every`` seconds during the load (under a preset that
    keeps access lines, each scrape writes one).
    """
    gpus = hardware.gpus() if gpus is None else gpus
    configs = [preset_config(preset, settings, stats_interval, progress=lambda *a: None) for preset in presets]
    others = [record.describe() for record in registry.live(log=progress)]
    if others and gpus:
        # On the CPU small servers share the RAM; on a GPU the running one holds most of
        # the card (--gpu-memory-utilization), and this one would fail its start for memory.
        raise TutorialError(
            "this experiment starts a server of its own for each preset, and on a GPU it needs the "
            f"memory that the running server holds: {'; '.join(others)}. Stop it first: shut down "
            "the kernels of the notebooks that use it (Kernel > Shut Down Kernel), or run "
            "./tutorial.sh stop for a detached one.")
    servers = [VLLMServer(config) for config in configs]
    runs: list[PresetRun] = []
    # On the CPU the next server starts while one is measured (two at most at a time: each CPU
    # server holds ~3 GB, and a start is mostly Python importing vLLM on one core). On a GPU one
    # at a time: each takes its share of the card's memory.
    ahead = 0 if gpus else SIDE_BY_SIDE - 1
    try:
        for i, (preset, server) in enumerate(zip(presets, servers)):
            for later, (p, other) in enumerate(zip(presets, servers)):
                if i <= later <= i + ahead and not other.alive and later >= len(runs):
                    other.launch(lambda message, p=p: progress(f"[{p}] {message}"))
            say = lambda message, p=preset: progress(f"[{p}] {message}")  # noqa: E731
            server.wait_ready(progress=say) if server.alive else server.start(progress=say)
            runs.append(_measure(preset, server, stats_interval, sample_every if preset in sample else None))
            server.stop()
            progress(f"[{preset}] measured and stopped")
    finally:
        for server in servers:
            if server.alive:
                server.stop()
    return runs


def run_preset(preset: str, **kwargs) -> PresetRun:
    """``run_presets`` for one preset (``sample_every`` set: sample ``/metrics`` that often)."""
    every = kwargs.pop("sample_every", None)
    if every:
        kwargs.update(sample=(preset,), sample_every=every)
    return run_presets([preset], **kwargs)[0]


def _measure(preset: str, server: VLLMServer, stats_interval: float, sample_every: float | None) -> PresetRun:
    startup = server.log_text()
    sampler = Sampler(server.url, every=sample_every).start() if sample_every else None
    load = fixed_load(server)
    # Let the last busy interval end, so its stats line (if any) is written.
    time.sleep(2 * stats_interval + 1.0)
    samples = sampler.stop() if sampler else []
    text = server.log_text()[len(startup):]  # before the scrape below adds an access line
    final = samples[-1] if samples else _scrape_quietly(server)
    excerpt = "\n".join(f"{log_presets.classify(line):>7} | {line[:150]}" for line in text.splitlines()
                        if log_presets.classify(line) not in (None, "other"))
    return PresetRun(preset, server.config.command_line(), dict(log_presets.count(text)),
                     dict(log_presets.count(startup)), load, excerpt, final, samples, server.record.group())


def _scrape_quietly(server: VLLMServer) -> Metrics:
    from ..logs.metrics import scrape
    return scrape(server.url)


TABLE_KINDS = ("stats", "access", "info", "warning", "error")


def table(runs: list[PresetRun]) -> str:
    """A plain-text table: log lines per kind during the same load, per preset."""
    head = f"{'preset':<10}" + "".join(f"{k:>9}" for k in TABLE_KINDS) + f"{'start-up':>10}  /metrics"
    rows = [head, "-" * len(head)]
    for run in runs:
        startup = sum(v for k, v in run.startup_counts.items() if k != "other")
        rows.append(f"{run.preset:<10}" + "".join(f"{run.counts[k]:>9}" for k in TABLE_KINDS)
                    + f"{startup:>10}  {'numbers kept' if run.metrics_kept else 'EMPTY'}")
    return "\n".join(rows)


def plot_counts(runs: list[PresetRun], ax=None):
    """A grouped bar chart of ``table``'s counts."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(8, 3.5))[1]
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        xs = [j + i * width for j in range(len(TABLE_KINDS))]
        bars = ax.bar(xs, [run.counts[k] for k in TABLE_KINDS], width, label=run.preset)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(TABLE_KINDS))], TABLE_KINDS)
    ax.set_ylabel("log lines during the load")
    ax.set_title("The same load under each log preset")
    ax.legend()
    return ax


def plot_series(samples: list[Metrics]):
    """Throughput, running/waiting requests and time to first token from ``/metrics`` samples."""
    import matplotlib.pyplot as plt

    s = timeseries(samples)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(s["t"], s["generation_tps"], label="generation")
    axes[0].plot(s["t"], s["prompt_tps"], label="prompt")
    axes[0].set_title("throughput (tokens/s)")
    axes[0].legend()
    axes[1].step(s["t"], s["running"], where="post", label="running")
    axes[1].step(s["t"], s["waiting"], where="post", label="waiting")
    axes[1].set_title("requests")
    axes[1].legend()
    ttft = [(t, v) for t, v in zip(s["t"], s["ttft"]) if v is not None]
    axes[2].plot([t for t, _ in ttft], [v for _, v in ttft], "o-")
    axes[2].set_title("mean time to first token (s)")
    for ax in axes:
        ax.set_xlabel("seconds")
    fig.tight_layout()
    return fig
