"""Test-suite configuration: the hypothesis profiles.

``default`` (used by ``make test``) runs a bounded number of examples per property; ``slow`` runs
many more. ``HYPOTHESIS_PROFILE=slow`` selects it for every property test; the tests marked
``slow`` (``make test-slow``) use it whatever the environment says.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,  # the machine running the suite may be loaded: time is not a property
    "database": None,  # no .hypothesis/ directory in the working tree
    "suppress_health_check": [HealthCheck.too_slow],
}
settings.register_profile("default", max_examples=25, **_COMMON)
settings.register_profile("slow", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
