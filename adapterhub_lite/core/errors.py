"""Typed errors. Every one subclasses ValueError (as peft's do) and reads as one line:
what is wrong, the value seen, and how to fix it. The CLI prints it and exits with 2."""


class AdapterHubError(ValueError):
    """Base class of every error this package raises on bad input."""


class SpecError(AdapterHubError):
    """The task spec (YAML or command-line overrides) is invalid; lists every problem at once."""

    def __init__(self, problems: list[str], source: str = "task spec"):
        self.problems = list(problems)
        super().__init__(f"invalid {source}: " + "; ".join(self.problems))


class DataError(AdapterHubError):
    """A data file is missing, empty, or does not fit the task spec."""


class BackboneError(AdapterHubError):
    """The backbone cannot be resolved, fetched or loaded."""


class AdapterMethodError(AdapterHubError):
    """The adapter method cannot be applied to this backbone's architecture."""


class OutputExistsError(AdapterHubError):
    """The output folder exists and neither --overwrite nor --resume was given."""


class AdapterLoadError(AdapterHubError):
    """An adapter folder is incomplete or does not match the backbone it is loaded on."""


class ContextLengthError(DataError):
    """A prompt and the tokens asked for do not fit the model's context (or a server's input limit)."""


# what a classification's need counts, in over_context's words: its longest label's tokens but the last, which is scored, not run
LABEL_NEED = "for the longest label's tokens but its last"


def over_context(prompt: int, virtual: int, need: int, what: str, context: int, adapter: str) -> str:
    """The one wording of a prompt that does not fit the context, whichever entry point refuses it (serve, infer,
    Router.run, predict): every number, so a user can compare them; the caller adds what it lets the user change.
    "this model's maximum context length is N tokens" are vLLM's and OpenAI's words, which clients match (LiteLLM raises
    ContextWindowExceededError, which its context-window fallbacks act on, only when it finds them)."""
    held = f", {virtual} virtual tokens of adapter {adapter!r}" if virtual else ""
    return (f"the request needs {prompt + virtual + need} tokens ({prompt} in the prompt{held}, {need} {what}) "
            f"but this model's maximum context length is {context} tokens")
