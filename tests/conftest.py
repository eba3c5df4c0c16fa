"""Test-suite setup: 8 simulated CPU devices, so sharding is tested on one host.

The flag must be set before jax is first imported; pytest imports this file before
any test module. A device count already in ``XLA_FLAGS`` is respected.
"""

import os

_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}=8".strip()

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run only with ``JPEFT_SLOW=1`` (they are skipped, not passed)."""
    if os.environ.get("JPEFT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow check; run with JPEFT_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
