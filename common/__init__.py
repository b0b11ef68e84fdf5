"""What every fedpriv role shares. Imports no role package."""

import os

# fedpriv talks to nothing but its own federation: no usage telemetry from
# Flower or Ray, whichever process imports us first.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
# Models and data come from local paths only; progress bars of weight loading
# would interleave with fedpriv's own.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
