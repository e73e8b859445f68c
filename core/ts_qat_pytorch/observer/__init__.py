"""Observers: MinMax, EMA-MinMax, percentile, MSE, EMA-MSE, clip-std and the LSQ initialiser.

``OBSERVERS`` is where ``w_observer`` / ``a_observer`` names are looked up."""
from .base import EPS, ObserverBase, qparams_from_minmax
from .clip_std import ClipStdObserver
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
    "ClipStdObserver": ClipStdObserver,
}

__all__ = ["EPS", "ObserverBase", "qparams_from_minmax", "OBSERVERS", *OBSERVERS]
