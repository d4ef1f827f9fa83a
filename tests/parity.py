"""Runs tests/convert/reference.py, the transformers side of the parity tests.

The reference needs torch and transformers: the interpreter named by
$VLMJAX_PARITY_PYTHON (tests/convert/make_parity_env.sh builds one; .ci/run does), else this
one if it has them (the `parity` extra). Without either, the parity tests are skipped.
"""

import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "convert", "reference.py")


def python() -> str:
    """The interpreter to run the reference with; skips the calling test if there is none."""
    if found := os.environ.get("VLMJAX_PARITY_PYTHON"):
        assert os.access(found, os.X_OK), f"VLMJAX_PARITY_PYTHON={found!r} is not executable"
        return found
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        pytest.skip(
            "torch/transformers not available: set VLMJAX_PARITY_PYTHON to a Python that has "
            "them (tests/convert/make_parity_env.sh builds one)"
        )
    return sys.executable


def run_reference(kind: str, spec: dict, out: str, *options: str) -> str:
    """`reference.py kind spec out options...` (it writes its files into `out`); returns `out`.
    Fails with the reference's stderr if it fails."""
    command = [python(), REFERENCE, kind, json.dumps(spec), out, *options]
    env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"reference.py {kind} failed:\n{done.stderr[-3000:]}"
    return out


def cached_references(
    tmp_path_factory, kind: str, arguments: Callable[[str], tuple[dict, list[str]]]
) -> Callable[[str], str]:
    """case -> the reference's output dir, run on a case's first use only (for a module-scoped
    fixture); `arguments(case)` gives its (spec, options). Skips without the interpreter."""
    python()
    built: dict[str, str] = {}

    def get(case: str) -> str:
        if case not in built:
            spec, options = arguments(case)
            out = str(tmp_path_factory.mktemp(f"reference_{kind}_{case}"))
            built[case] = run_reference(kind, spec, out, *options)
        return built[case]

    return get
