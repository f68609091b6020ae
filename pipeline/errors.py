"""The failures a user can act on. A stage prints the message alone (no traceback) and exits 1
(pipeline/cli.py), so each message names the file, URL or params key at fault."""


class PipelineError(Exception):
    """A failure the user can act on."""


class ConfigError(PipelineError, ValueError):
    """A params.yaml key is missing, unknown, of the wrong type or out of range."""


class FetchError(PipelineError):
    """The data source cannot be fetched; the message names the URL, path or archive member."""
