"""Error types users can catch: each message names the field or tensor at fault."""


class FlasError(Exception):
    """Base class for flas-vllm errors."""


class FlasCheckpointError(FlasError, ValueError):
    """A FLAS checkpoint is missing, malformed, or does not fit the base model."""


class SteeringParamError(FlasError, ValueError):
    """A request's steering fields are invalid; `field` names the offending key."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class FlasConfigError(FlasError, ValueError):
    """An engine setting FLAS cannot honour; raised before weights load, naming the setting and what works."""
