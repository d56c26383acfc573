"""Test setup: an 8-device CPU platform for the sharding tests.

The device count must be fixed before JAX creates its backends, so it is set
here, when pytest imports this file, before any test module imports JAX code.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import hypothesis  # noqa: E402

hypothesis.settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True)
hypothesis.settings.load_profile("ci")
