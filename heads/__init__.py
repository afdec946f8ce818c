"""Small classification heads over frozen frame-level features: training and prediction."""
