"""User-facing errors: one line that names the field or file and the fix (safetensors style); and the
guarded readers of user files (UTF-8 text, YAML without aliases) that raise them."""


class UserError(ValueError):
    """A mistake in the user's input (file, recipe, value). The CLI prints it as one line, exit 2."""


def excerpt(value: object, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters: errors quote user input, never all of it."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_text(path, what: str = "file") -> str:
    """A user's UTF-8 text file; missing, unreadable or non-UTF-8 input is a one-line UserError."""
    from pathlib import Path
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist: check the path") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder: pass a file") from None
    except OSError as e:
        raise UserError(f"{what} {path} cannot be read ({e.strerror}): check its permissions") from None


def yaml_load(text: str):
    """yaml.safe_load without aliases (*name): a few hundred bytes of nested aliases expand into gigabytes
    (a "billion laughs" bomb), and no modelpress input (recipe, device profile, tabular spec) needs them.
    An alias raises yaml.composer.ComposerError ("found a YAML alias"), a yaml.YAMLError."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise yaml.composer.ComposerError(None, None, "found a YAML alias", self.peek_event().start_mark)
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=NoAliasLoader)
