"""Watch an answer arrive: a live ipywidgets view with a statistics line and a Stop button.

    from helpers.stream.widget import show_stream, show_streams
    stream = show_stream(requests_chat(server, "Name three colours.", max_tokens=64))
    show_streams(lambda p: requests_chat(server, p, max_tokens=64), prompts)   # side by side

* **Batched updates.** Pieces are collected in Python and the view is redrawn at most every
  ``interval`` seconds (0.1 s by default) and once at the end, so a fast GPU stream (thousands
  of tokens/s) costs a handful of front-end updates per second, not one per token.
* **Stop really stops.** The button cancels the stream: the HTTP connection is closed and vLLM
  aborts the request (its running-request count drops). The cell keeps running while it
  streams, and the click still arrives: JupyterLab 4.4+ with ipykernel 7 (the pinned versions)
  send widget messages on a kernel *subshell*, which is served while the main shell is busy
  (see ``serve_clicks_while_busy`` for the one adjustment ipykernel 7.4 needs).
  In a front end without subshells, the kernel's interrupt button (■) stops the stream the same
  way.
* **Readable without widgets.** When the stream ends, the answer is also written as ordinary
  output (Markdown or plain text) with its statistics, so a notebook run headless (nbval,
  nbconvert) or viewed as a file still shows it; the live text in the widget is then hidden so
  a live reader does not see it twice.
"""

from __future__ import annotations

import functools
import html
import threading
import time
from typing import Callable, Sequence

import ipywidgets as widgets
from IPython.display import Markdown, display

from .chat import ChatStream, Content

INTERVAL = 0.1


def serve_clicks_while_busy(button: widgets.Button) -> None:
    """Let a click reach ``button`` while the cell that made it is still running.

    JupyterLab sends the click on a kernel subshell, which ipykernel 7 serves in its own
    thread. But ipykernel 7.4 routes an incoming widget message to the shell that last
    published on that widget's comm, overriding the subshell it came on, and for a widget the
    running cell just created that is the busy main shell: the click would wait for the cell
    to end. Forgetting that record (it serves replies to requests, which a button never makes)
    lets the subshell serve the click. tests/stream/test_widget.py checks this in a real kernel.
    """
    comm = getattr(button, "comm", None)
    if comm is not None:
        comm.__dict__.pop("_reply_subshell_id", None)


def _pre(text: str) -> str:
    return f'<pre style="white-space: pre-wrap; margin: 0; font-size: 0.95em">{html.escape(text)}</pre>'


class StreamView:
    """The widget for one stream: title, growing text, statistics line, Stop button."""

    def __init__(self, title: str = "", *, markdown: bool = True, interval: float = INTERVAL):
        self.markdown = markdown
        self.interval = interval
        self.updates = 0                        # redraws sent to the front end
        self.live_lengths: list[int] = []       # the text's length at each redraw before the end
        self.stream: ChatStream | None = None
        self._stop_requested = threading.Event()
        self.title = widgets.HTML(f"<b>{html.escape(title)}</b>" if title else "")
        self.body = widgets.Output() if markdown else widgets.HTML()
        self.status = widgets.HTML("<i>waiting for the first token …</i>")
        self.stop_button = widgets.Button(description="Stop", icon="stop", button_style="danger",
                                          tooltip="close the connection: vLLM aborts the request",
                                          layout=widgets.Layout(width="90px"))
        self.stop_button.on_click(lambda _button: self.stop())
        children = [self.title] if title else []
        self.widget = widgets.VBox(children + [self.body, widgets.HBox([self.stop_button, self.status])],
                                   layout=widgets.Layout(border="1px solid #ccc", padding="6px"))
        # Stable names for the page (a stylesheet, tests/browser): the structure may change, these do not.
        self.widget.add_class("tutorial-stream-view")
        self.body.add_class("tutorial-stream-body")
        self.status.add_class("tutorial-stream-status")
        self.stop_button.add_class("tutorial-stream-stop")

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """What the button does; safe from any thread."""
        self._stop_requested.set()
        if self.stream is not None:
            self.stream.cancel()

    # ------------------------------------------------------------------ drawing
    def _draw(self, text: str) -> None:
        if self.markdown:
            self.body.outputs = ({"output_type": "display_data", "metadata": {},
                                  "data": {"text/markdown": text, "text/plain": text}},)
        else:
            self.body.value = _pre(text)
        if self.stream is not None:
            self.status.value = html.escape(str(self.stream.stats))
        self.updates += 1

    def pump(self, stream: ChatStream) -> ChatStream:
        """Read ``stream`` to its end (or until Stop), redrawing at most every ``interval`` s."""
        self.stream = stream
        serve_clicks_while_busy(self.stop_button)
        if self._stop_requested.is_set():
            stream.cancel()
        last = 0.0
        try:
            for piece in stream:
                if isinstance(piece, Content) and piece.index == 0:
                    now = time.monotonic()
                    if now - last >= self.interval:
                        self._draw(stream.text)
                        self.live_lengths.append(len(stream.text))
                        last = now
        except KeyboardInterrupt:                    # the kernel's interrupt button: stop too
            stream.close()
        finally:
            self.stop_button.disabled = True
            self._draw(stream.text)
            self.status.value = html.escape(self.outcome()) + self._record()
        return stream

    def _record(self) -> str:
        """The view's own account of how it grew, for the page to read (tests/browser): the
        text's length at each live redraw and at the end. Invisible; it needs no page watching
        at the right moment, whatever the model's speed."""
        text = self.stream.text if self.stream is not None else ""
        live = ",".join(map(str, self.live_lengths))
        return f'<span class="tutorial-stream-record" data-live="{live}" data-final="{len(text)}" hidden></span>'

    def outcome(self) -> str:
        stream = self.stream
        if stream is None:
            return "not started"
        state = "stopped by you" if stream.cancelled else f"finished: {stream.finish_reason}"
        return f"{state} · {stream.stats}"

    def leave_plain_output(self) -> None:
        """Hide the live text and write the answer as ordinary output (survives without widgets)."""
        if self.stream is None:
            return
        self.body.layout.display = "none"
        text = self.stream.text
        if self.markdown and text.strip():
            display(Markdown(text))
        else:
            print(text)
        print(f"[{self.outcome()}]")


def show_stream(stream: ChatStream, title: str = "", *, markdown: bool = True,
                interval: float = INTERVAL) -> ChatStream:
    """Show one stream live (blocking the cell until it ends or Stop is pressed); return it."""
    view = StreamView(title, markdown=markdown, interval=interval)
    display(view.widget)
    view.pump(stream)
    view.leave_plain_output()
    return stream


class StreamGrid:
    """Several streams side by side, each read by its own thread, with one Stop-all button."""

    def __init__(self, titles: Sequence[str], *, markdown: bool = False, interval: float = INTERVAL,
                 columns: int = 2):
        self.views = [StreamView(t, markdown=markdown, interval=interval) for t in titles]
        self.summary = widgets.HTML()
        self.stop_button = widgets.Button(description="Stop all", icon="stop", button_style="danger")
        self.stop_button.on_click(lambda _button: self.stop())
        grid = widgets.GridBox([v.widget for v in self.views],
                               layout=widgets.Layout(grid_template_columns=f"repeat({columns}, 1fr)"))
        self.widget = widgets.VBox([grid, widgets.HBox([self.stop_button, self.summary])])
        self.widget.add_class("tutorial-stream-grid")
        self.started: float | None = None
        self.ended: float | None = None

    def stop(self) -> None:
        for view in self.views:
            view.stop()

    def run(self, makers: Sequence[Callable[[], ChatStream]], timeout: float = 600.0) -> list[ChatStream]:
        """Start every request at once (each thread sends its own), read them all, return them."""
        self.started = time.perf_counter()
        errors: list[BaseException] = []

        def read(view: StreamView, make: Callable[[], ChatStream]) -> None:
            try:
                view.pump(make())
            except BaseException as err:  # reported in the cell after the join
                view.status.value = html.escape(f"failed: {err}")
                errors.append(err)

        serve_clicks_while_busy(self.stop_button)
        threads = [threading.Thread(target=read, args=(v, m), daemon=True) for v, m in zip(self.views, makers)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        try:
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:
            self.stop()
        if any(t.is_alive() for t in threads):
            self.stop()
            for thread in threads:
                thread.join(10)
        self.ended = time.perf_counter()
        self.stop_button.disabled = True
        streams = [v.stream for v in self.views if v.stream is not None]
        self.summary.value = html.escape(self.describe(streams))
        if errors:
            raise errors[0]
        return streams

    def describe(self, streams: Sequence[ChatStream]) -> str:
        tokens = sum(s.stats.tokens for s in streams)
        wall = (self.ended or time.perf_counter()) - (self.started or 0.0)
        return (f"{len(streams)} streams at once: {tokens} tokens in {wall:.2f} s = "
                f"{tokens / wall:.1f} tokens/s in all")


def show_streams(make_stream: Callable[[str], ChatStream], prompts: Sequence[str], *,
                 markdown: bool = False, columns: int = 2, interval: float = INTERVAL) -> list[ChatStream]:
    """Send every prompt at once and show the answers side by side (continuous batching at
    work); block until all end. ``make_stream(prompt)`` starts one stream, e.g.
    ``lambda p: openai_chat(client, p, model=server.name)``: each thread calls it, so every
    request is sent at the same moment and read as it arrives.
    """
    grid = StreamGrid(prompts, markdown=markdown, columns=columns, interval=interval)
    display(grid.widget)
    streams = grid.run([functools.partial(make_stream, prompt) for prompt in prompts])
    for view, prompt in zip(grid.views, prompts):
        view.body.layout.display = "none"
        print(f"--- {prompt} [{view.outcome()}]\n{view.stream.text if view.stream else ''}")
    print(grid.describe(streams))
    return streams
