"""The errors a user of hovle-edge can meet. Each names the file or input and what was wrong."""


class HoVLEError(Exception):
    """Base of every error hovle-edge raises on purpose. `setting` names the library setting at fault,
    if one is (a parameter or field name, never a command-line flag): the CLI turns it into its option."""

    def __init__(self, *args, setting: str | None = None):
        super().__init__(*args)
        self.setting = setting


class ConfigError(HoVLEError):
    """A config.json that is missing, unreadable or asks for something this code does not do."""


class CheckpointError(HoVLEError):
    """Weights that are missing, unexpected, mis-shaped, or in files that cannot be read."""


class InputError(HoVLEError):
    """An image, prompt or tokenizer file that cannot be used as given."""


class ModelFolderError(HoVLEError):
    """An exported model folder that is missing, from another version, or altered since export."""


class ExportError(HoVLEError):
    """An export whose graph failed a check (ops, parity, shapes)."""


class OutputFolderError(HoVLEError):
    """A folder to write that exists and may not be replaced, or that is, holds or sits inside an input."""


class EngineBuildError(HoVLEError):
    """A TensorRT engine that cannot be built: a graph the parser refuses, a target GPU the builder
    cannot compile for, a build that fails."""
