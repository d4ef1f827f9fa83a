"""Reference outputs of transformers shared by every test module here (one subprocess per
distinct spec per session): the round-trip tests reuse the parity tests' folders."""

import json

import parity
import pytest


@pytest.fixture(scope="session")
def shared_references(tmp_path_factory):
    """(kind, spec, options) -> reference.py's output dir, built on first use only."""
    parity.python()  # skips without the interpreter
    built: dict[str, str] = {}

    def get(kind: str, spec: dict, options: list[str]) -> str:
        key = json.dumps([kind, spec, options], sort_keys=True)
        if key not in built:
            out = str(tmp_path_factory.mktemp(f"reference_{kind}"))
            built[key] = parity.run_reference(kind, spec, out, *options)
        return built[key]

    return get
