"""User-facing errors.

Anything a user can cause (a bad config value, a missing file, data that does not fit the model)
raises a subclass of `NanoMoEError` with a message that says what to change. The CLI prints the
message without a traceback and exits non-zero; library users can catch the class.
"""


class NanoMoEError(Exception):
    """Base class for errors caused by user input."""


class ConfigError(NanoMoEError, ValueError):
    """A configuration value is invalid or inconsistent."""


class DataError(NanoMoEError):
    """Input data is missing, malformed, or does not match the tokenizer/model."""


class CheckpointError(NanoMoEError):
    """A checkpoint is missing, incomplete, or belongs to a different model."""


def looks_out_of_space(e: BaseException) -> bool:
    """ENOSPC, or the words torch's zip writer and safetensors use for a write the disk cut short."""
    import errno

    text = str(e)
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
        words in text for words in ("unexpected pos", "file write failed", "No space left on device"))
