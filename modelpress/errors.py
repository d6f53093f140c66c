"""User-facing errors: one line that names the field or file and the fix (safetensors style)."""


class UserError(ValueError):
    """A mistake in the user's input (file, recipe, value). The CLI prints it as one line, exit 2."""
