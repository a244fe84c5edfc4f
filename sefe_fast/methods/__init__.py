"""Continual-learning methods behind one small interface (`ContinualMethod`)."""

from sefe_fast.methods.base import ContinualMethod, MethodConfig
from sefe_fast.methods.registry import METHODS, build_method

__all__ = ["METHODS", "ContinualMethod", "MethodConfig", "build_method"]
