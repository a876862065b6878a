"""Test-suite configuration: the hypothesis profiles and the shipped-model fixture.

``default`` (used by ``make test``) runs a bounded number of examples per property; ``slow`` runs
many more. ``HYPOTHESIS_PROFILE=slow`` selects it for every property test; the tests marked
``slow`` (``make test-slow``) use it whatever the environment says.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,  # the machine running the suite may be loaded: time is not a property
    "database": None,  # no .hypothesis/ directory in the working tree
    "suppress_health_check": [HealthCheck.too_slow],
}
settings.register_profile("default", max_examples=25, **_COMMON)
settings.register_profile("slow", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def shipped_toy_model() -> None:
    """Require the shipped toy model and its language-model file.

    Outside CI a missing piece skips the test with the command that provides it. Under
    ``CI=true`` (``.ci/run`` via ``make test``, which fetches the file) it fails instead, so that
    a checkout without the committed weights cannot pass by skipping.
    """
    from tokenprune.toy import lm as toy_lm
    from tokenprune.toy import model as toy_model

    missing = None
    if not (toy_model.ASSETS / "vlm" / toy_model.TRAINED_FILE).is_file():
        missing = (
            f"no shipped toy model under {toy_model.ASSETS} "
            "(train it: python -m tokenprune.toy.train --run-dir DIR --export)"
        )
    else:
        try:
            toy_lm.gguf_path()
        except toy_lm.LMFileMissingError as err:
            missing = f"LM file absent ({err})"
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)
