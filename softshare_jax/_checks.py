"""Argument checks shared by the transforms: errors that name the argument."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def check_nonnegative(name: str, value: Any) -> None:
  """Rejects a negative, NaN or infinite concrete value; schedules and traced values pass."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return
  arr = np.asarray(value)
  if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
    raise ValueError(f"{name} must be a number or a schedule, got {value!r}.")
  if not np.all(np.isfinite(arr)) or np.any(arr < 0):
    raise ValueError(f"{name} must be finite and >= 0, got {value!r}.")
