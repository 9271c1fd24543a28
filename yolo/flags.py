"""Config dataclasses as command lines: each field is one ``--kebab-case`` flag (booleans get
``--x/--no-x``, tuples take several values, enumerated fields list their ``choices``, a class's
``PRESETS`` add ``--preset NAME``); unknown flags are an error. Also the configs' JSON form.
Free of torch: ``--help`` imports none of it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import field
from pathlib import Path

from utils.fileio import atomic_write_text


def flag(default, help_text: str, **extra):
    """A config field that becomes the flag ``--<field-name>`` (see :func:`build_parser`);
    ``choices=...`` lists the values argparse accepts."""
    return field(default=default, metadata={"help": help_text, **extra})


def kebab(name: str) -> str:
    return name.replace("_", "-")


def _shown(value) -> str:
    """A default as a user types it: tuples space-separated, booleans as the flag to pass."""
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def _help(item: dataclasses.Field, default) -> str:
    text = item.metadata.get("help", "")
    if default is None or isinstance(default, bool) or "default" in text:
        return text
    return f"{text} (default: {_shown(default)})"


def build_parser(preset, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of ``preset``'s dataclass.

    Flags not given are absent from the parsed namespace (``default=SUPPRESS``), so
    :func:`parse_args` knows which flags the user gave; the help shows the preset's values.
    """
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a misspelt flag must fail, not match a longer one
        argument_default=argparse.SUPPRESS,
    )
    hints = typing.get_type_hints(type(preset))
    for item in dataclasses.fields(preset):
        option, default = f"--{kebab(item.name)}", getattr(preset, item.name)
        kind = hints[item.name]
        kwargs = {"dest": item.name, "help": _help(item, default)}
        if "choices" in item.metadata:
            kwargs["choices"] = item.metadata["choices"]
        if kind is bool:
            kwargs["help"] += f" (default: {'--' if default else '--no-'}{kebab(item.name)})"
            parser.add_argument(option, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(kind) is tuple:
            elem = typing.get_args(kind)[0]
            parser.add_argument(
                option, nargs="+", type=elem, metavar=elem.__name__.upper(), **kwargs
            )
        elif "const" in item.metadata:
            parser.add_argument(option, nargs="?", const=item.metadata["const"], **kwargs)
            if item.name == "pretrained":
                parser.add_argument(
                    "--no-pretrained",
                    dest=item.name,
                    action="store_const",
                    const=None,
                    help="train the backbone from random weights",
                )
        else:
            elem = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            names = (option, item.metadata["alias"]) if "alias" in item.metadata else (option,)
            parser.add_argument(*names, type=elem, **kwargs)
    presets = getattr(type(preset), "PRESETS", {})
    if presets:
        settings = "; ".join(
            f"{name} = " + " ".join(f"{k}={_shown(v)}" for k, v in values.items())
            for name, values in presets.items()
        )
        parser.add_argument(
            "--preset", choices=sorted(presets), help=f"settings under the flags given: {settings}"
        )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    return parser


def parse_args(preset, argv: list[str] | None = None, description: str | None = None):
    """Apply command-line overrides to a preset -> ``(config, given)``: ``--preset NAME``
    replaces the preset's values by its class's ``PRESETS[NAME]`` first; ``given`` is the set of
    field names the command line set, and ``config.debug`` is not a field: ``--debug`` is in
    ``given`` as "debug". Unknown flags and invalid values exit with an error."""
    args = vars(build_parser(preset, description).parse_args(argv))
    if "preset" in args:  # its settings, then the flags given over them
        preset = dataclasses.replace(preset, **type(preset).PRESETS[args.pop("preset")])
    given = frozenset(args)
    debug = args.pop("debug", False)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    try:
        config = dataclasses.replace(preset, **values)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    return config, (given - {"debug"}) | ({"debug"} if debug else set())


def parse_config(preset, argv: list[str] | None = None, description: str | None = None):
    """Apply command-line overrides to a preset; unknown flags exit with an error."""
    return parse_args(preset, argv, description)[0]


def config_to_dict(config) -> dict:
    """Plain JSON-able data: tuples become lists."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls, data: dict):
    """Inverse of :func:`config_to_dict`; keys the class no longer has are an error. A field
    added since ``data`` was written takes the value it had before it was a flag (the class's
    ``BEFORE_FLAGS``), else its default."""
    data = {**getattr(cls, "BEFORE_FLAGS", {}), **data}
    names = {item.name for item in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"config has unknown fields {unknown}; was it written by another version?")
    hints = typing.get_type_hints(cls)
    values = {k: tuple(v) if typing.get_origin(hints[k]) is tuple else v for k, v in data.items()}
    return cls(**values)


def save_config_json(config, path: str | Path) -> None:
    """Write the resolved config beside the checkpoints (atomically)."""
    atomic_write_text(path, json.dumps(config_to_dict(config), indent=2) + "\n")
