"""Ray in these tests is a local instance on the loopback interface only (see pagellm.engine.dp_client)."""

import os

# NOTE: before any test module imports ray, which reads it once
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.pop("RAY_ADDRESS", None)
