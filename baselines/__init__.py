"""Classical baselines (scikit-learn estimators, a small MFCC CNN)."""
