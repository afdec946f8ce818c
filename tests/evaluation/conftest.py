"""The baselines' synthetic experiment, which the leakage audit trains its RandomForests on."""

from tests.baselines.conftest import baseline_experiment  # noqa: F401 (a fixture, registered by import)
