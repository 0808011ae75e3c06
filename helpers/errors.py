"""Every error the helpers raise, each naming its cause in words a learner can act on.

They all derive from ``TutorialError``, so a notebook can catch the family in one clause.
Errors about a value the learner gave (a setting, a preset name, a GPU too old) are also
``ValueError``s.

* settings and machine: ``SettingsError``, ``LogPresetError``, ``UnsupportedGpuError``,
  ``UnsafeHostError``;
* the model: ``ModelNotFoundError``, ``EmbeddedModelError``;
* the server's life: ``PortInUseError``, ``ServerStartError`` (``StartupTimeoutError``),
  ``ServerDiedError``, ``ApiKeyError``, ``NotOwnerError``; a server elsewhere:
  ``ServerUnreachableError``, ``ModelNotServedError``;
* streams: ``StreamError`` (``StreamHTTPError``, ``StreamErrorEvent``,
  ``StreamInterruptedError``), ``IncompleteEventError``;
* a class and its load: ``KeysError``, ``GatewayError``, ``LoadTestError``.
"""

from __future__ import annotations


class TutorialError(RuntimeError):
    """Base class of the helpers' errors."""


class SettingsError(TutorialError, ValueError):
    """A setting is missing, unknown or has a value of the wrong kind."""


class LogPresetError(TutorialError, ValueError):
    """An unknown log preset, or one that needs a vLLM that is not installed."""


class UnsupportedGpuError(TutorialError, ValueError):
    """A GPU that vLLM cannot use (compute capability below 7.0)."""


class EmbeddedModelError(TutorialError):
    """The package holding the embedded model is missing or its file cannot be converted."""


class ModelNotFoundError(TutorialError):
    """The model path does not exist, is not a model folder, or the hub id cannot be fetched."""


class UnsafeHostError(TutorialError, ValueError):
    """A vLLM server asked to listen on a network address: vLLM's own key guards only the
    routes under /v1, /v2 and /inference (0.32.0: and /cohere; /invocations generates without
    it), so only a gateway with per-student keys may face the network."""


class PortInUseError(TutorialError):
    """Something already listens on the port the server was asked to use."""


class ServerStartError(TutorialError):
    """The server process exited (or timed out) before it was ready.

    ``cause`` is the diagnosis found in the log, ``log_tail`` its last lines, ``log_path``
    the whole log.
    """

    def __init__(self, message: str, *, cause: str | None = None, log_tail: str = "",
                 log_path: str | None = None, exit_code: int | None = None):
        self.cause = cause
        self.log_tail = log_tail
        self.log_path = log_path
        self.exit_code = exit_code
        text = message
        if log_tail:
            text += f"\n--- last lines of {log_path} ---\n{log_tail}"
        super().__init__(text)


class StartupTimeoutError(ServerStartError):
    """The server stayed alive but did not become ready in time."""


class ServerDiedError(TutorialError):
    """A server that was ready has gone away."""


class ApiKeyError(TutorialError):
    """The server wants an API key and none (or a wrong one) was given."""


class ServerUnreachableError(TutorialError):
    """Nothing answers at the server URL a student was given (or it is not ready)."""


class ModelNotServedError(TutorialError):
    """The server answers, but does not serve the model the settings ask for."""


class NotOwnerError(TutorialError):
    """This process did not start the server it was asked to stop."""


class StreamError(TutorialError):
    """A streamed answer did not arrive whole."""


class StreamHTTPError(StreamError):
    """The server refused the request (not 200); ``status`` and the server's own ``message``."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message
        super().__init__(f"the server answered {status}: {message}")


class StreamErrorEvent(StreamError):
    """The server sent an ``{"error": ...}`` event in the middle of the stream."""

    def __init__(self, message: str, *, type: str | None = None, code: int | str | None = None):
        self.message, self.type, self.code = message, type, code
        super().__init__(f"the server reported an error mid-stream ({type or 'error'}"
                         f"{f', code {code}' if code is not None else ''}): {message}")


class StreamInterruptedError(StreamError):
    """The connection ended before the answer did (no finish reason, no ``[DONE]``)."""


class IncompleteEventError(TutorialError):
    """The byte stream ended inside a Server-Sent Event (no blank line after its last field)."""


class KeysError(TutorialError):
    """The students' keys file cannot be read or changed as asked (the message says why and what to do)."""


class GatewayError(TutorialError):
    """The class gateway could not start, or was asked to do something unsafe (the message says which)."""


class NoStudentKeysError(GatewayError):
    """A class server asked for with no student key to let anyone in: it is not started."""


class LoadTestError(TutorialError, ValueError):
    """A load that cannot be run as asked (no users, a limit that is not positive ...)."""
