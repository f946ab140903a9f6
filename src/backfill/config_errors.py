"""Settings mistakes told as their fix: where the value came from (the file, an environment variable, an option),
the key's full path, and for an unknown key the known one it most likely meant. No pydantic internals (class
names, error-type links) reach the user."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import ErrorDetails

ENV_PREFIX = "BACKFILL_"
# Variables read elsewhere than Settings: the config file's path, the client commands', and the test suite's own.
OTHER_VARIABLES = frozenset(
    {
        "BACKFILL_CONFIG",
        "BACKFILL_BASE_URL",
        "BACKFILL_API_KEY",
        "BACKFILL_TEST_DATABASE_URL",
        "BACKFILL_REQUIRE_POSTGRES",
        "BACKFILL_REQUIRE_EVAL_TOOLS",
    }
)


@dataclass(frozen=True)
class Sources:
    """Where the values being validated came from."""

    file: Path | None
    file_values: Mapping[str, Any]
    overrides: Mapping[str, Any]  # command-line options, by setting name
    environ: Mapping[str, str]

    def of(self, key: str) -> str:
        """Where top-level setting `key` was given (highest precedence first, as Settings reads them)."""
        if key in self.overrides:
            return f"option --{key.replace('_', '-')}"
        variable = f"{ENV_PREFIX}{key.upper()}"
        if any(name.upper() == variable for name in self.environ):  # read case-insensitively
            return f"environment variable {variable}"
        if self.file is not None and key in self.file_values:
            return str(self.file)
        return "settings"


def describe(errors: Sequence[ErrorDetails], sources: Sources, models: Mapping[str, type[BaseModel]]) -> str:
    """One line per error. `models`: the model of each top-level table or array of tables (`backends`, …) and of
    those nested in them, by key, for the did-you-mean of an unknown key inside them; the root's fields under ""."""
    return "\n".join(_line(error, sources, models) for error in errors)


def _line(error: ErrorDetails, sources: Sources, models: Mapping[str, type[BaseModel]]) -> str:
    loc = error["loc"]
    where = sources.of(str(loc[0])) if loc else "settings"
    path = _path(loc)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        known = _known_keys(loc, models)
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else f" (known keys: {', '.join(sorted(known))})"
        return f"{where}: unknown key '{path}'{suggestion}"
    if error["type"] == "missing":
        return f"{where}: '{path}' is required but missing"
    if not path:
        return f"{where}: {message}"
    return f"{where}: {path} = {_shown(error.get('input'))}: {message}"


def _path(loc: Iterable[int | str]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _known_keys(loc: Sequence[int | str], models: Mapping[str, type[BaseModel]]) -> list[str]:
    """The keys allowed where the unknown key `loc[-1]` stands."""
    tables = [part for part in loc[:-1] if isinstance(part, str)]
    model = models[tables[-1]] if tables and tables[-1] in models else models[""]
    return list(model.model_fields)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def unknown_variables(environ: Mapping[str, str], settings: Iterable[str]) -> list[str]:
    """A warning for each `BACKFILL_*` environment variable that no setting reads (a misspelt one is otherwise
    silently ignored), with the variable it most likely meant."""
    known = {f"{ENV_PREFIX}{name.upper()}" for name in settings} | OTHER_VARIABLES
    warnings = []
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX) or name.upper() in known:
            continue
        hint = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.6)
        meant = f"; did you mean {hint[0]}?" if hint else ""
        warnings.append(f"environment variable {name} is not a backfill setting and is ignored{meant}")
    return warnings
