"""Argument checks and small helpers every transform shares.

Each check raises a ``ValueError`` that names the argument and shows its
value. Traced values and schedules pass the construction-time checks: they
are only known at run time, where :func:`check_schedule_value` checks them
(eagerly when concrete, under ``checkify`` when traced).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.experimental import checkify
import jax.numpy as jnp
import numpy as np
import optax


def is_traced(value: Any) -> bool:
  """Whether ``value`` is a tracer (a hyperparameter under jit or inject_hyperparams)."""
  return isinstance(value, jax.core.Tracer)


def check_nonnegative(name: str, value: Any) -> None:
  """Rejects a negative, NaN or infinite concrete value; schedules and traced values pass."""
  if callable(value) or is_traced(value):
    return
  arr = np.asarray(value)
  # jnp.issubdtype knows bfloat16 (an injected hyperparameter in bf16 params' dtype).
  if arr.dtype == object or not jnp.issubdtype(arr.dtype, jnp.number):
    raise ValueError(f"{name} must be a number or a schedule, got {value!r}.")
  arr = arr.astype(np.float64)
  if not np.all(np.isfinite(arr)) or np.any(arr < 0):
    raise ValueError(f"{name} must be finite and >= 0, got {value!r}.")


def check_int(name: str, value: Any, *, low: int = 1, high: int | None = None) -> int:
  """``value`` as an int in [low, high]; bools and floats are rejected."""
  ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
  if not ok or value < low or (high is not None and value > high):
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise ValueError(f"{name} must be an int {bound}, got {value!r}.")
  return int(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
  """``value`` if it is one of ``choices``."""
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")
  return value


def check_open_unit(name: str, value: Any) -> None:
  """Rejects a concrete value outside the open interval (0, 1)."""
  if is_traced(value):
    return
  try:
    x = float(value)
  except (TypeError, ValueError):
    x = float("nan")
  if not 0.0 < x < 1.0:
    raise ValueError(f"{name} must be in (0, 1), got {value!r}.")


def require_key(owner: str, key: Any) -> jax.Array:
  """``key``, or an error saying that ``owner`` needs a PRNG key."""
  if key is None:
    raise ValueError(f"key is required for {owner} (a jax.random key, e.g. jax.random.key(0)).")
  return key


def require_params(transform: str, params: Any) -> None:
  """The error an ``update`` that reads the weights raises when called without them."""
  if params is None:
    raise ValueError(f"{transform} needs params: call update(updates, state, params).")


def value_at(value: optax.ScalarOrSchedule, count: jax.Array) -> Any:
  """A hyperparameter at step ``count``: a schedule is called, a number is returned."""
  return value(count) if callable(value) else value


def check_schedule_value(name: str, value: Any) -> Any:
  """``value`` (a hyperparameter at this step, e.g. a schedule's output), checked finite and >= 0.

  A concrete value is checked now (``ValueError`` naming ``name``). A traced
  one (under ``jit`` or ``optax.inject_hyperparams``) cannot be: it gets a
  ``checkify.debug_check``, which reports a failing step when the caller
  wraps the step in ``jax.experimental.checkify.checkify`` and is dropped
  otherwise (then a NaN value makes the updates NaN and a negative one
  reverses the transform's pull).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.experimental import checkify
    >>> def step(s):
    ...   return 2.0 * check_schedule_value("strength", s)
    >>> float(jax.jit(step)(-1.0))  # not checkified: no check
    -2.0
    >>> err, _ = checkify.checkify(jax.jit(step))(jnp.float32(jnp.nan))
    >>> err.get()
    'strength must be finite and >= 0 at every step, got nan (`check` failed)'
  """
  if is_traced(value):
    ok = jnp.all(jnp.isfinite(value) & (value >= 0))
    checkify.debug_check(ok, f"{name} must be finite and >= 0 at every step, got {{}}", value)
  else:
    check_nonnegative(name, value)
  return value
