"""Observers: MinMax, EMA-MinMax, percentile, MSE, EMA-MSE and the LSQ initialiser."""
from .base import EPS, ObserverBase, qparams_from_minmax
from .lsq import LSQObserver
from .minmax import EMAMinMaxObserver, MinMaxObserver
from .mse import EMAMSEObserver, MSEObserver
from .percentile import PercentileObserver

OBSERVERS = {
    "MinMaxObserver": MinMaxObserver,
    "EMAMinMaxObserver": EMAMinMaxObserver,
    "PercentileObserver": PercentileObserver,
    "MSEObserver": MSEObserver,
    "EMAMSEObserver": EMAMSEObserver,
    "LSQObserver": LSQObserver,
}

__all__ = ["EPS", "ObserverBase", "qparams_from_minmax", "OBSERVERS", *OBSERVERS]
