"""
The Hypothesis profiles of the fuzz tests: C{ci} (the default, 200 examples
a test) and C{long} (20,000), chosen with HYPOTHESIS_PROFILE.
"""

import os

from hypothesis import HealthCheck, settings

#: What both profiles share.  The machine is shared: slow generation is not a
#: finding.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)

settings.register_profile("ci", max_examples=200, **_COMMON)
settings.register_profile("long", max_examples=20_000, **_COMMON)

FUZZ = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
