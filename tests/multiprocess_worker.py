"""One process of the multi-process runs of ``tests/test_multiprocess.py``.

Launched twice by that test (``python tests/multiprocess_worker.py
--process-id I --port P --out DIR --ckpt-in CKPT --saved-npz NPZ``, each child
with 4 CPU devices), it joins a ``jax.distributed`` run of 2 processes and 8
global devices, all on 127.0.0.1, and checks that a sum over the 8 devices
works (if not, it writes ``DIR/collectives_unavailable_<I>.txt`` and exits
with 3; the test skips). Then, for every case in :data:`CASES`, it trains the
same params from the same data as the test's single process (8 devices), with
the params FSDP-sharded over a mesh of all 8 devices, and process 0 writes the
final params and optimizer state, gathered to the host, to
``DIR/final_<case>.npz`` (a failing case writes ``DIR/error_<case>.txt``
instead). With Orbax it writes the ``mixture_gradient`` case's params and state
to ``DIR/ckpt_2proc``; then it waits for ``CKPT.ready`` and restores ``CKPT``,
the checkpoint the test's single process wrote, onto this run's mesh (see
:func:`restore_one_process_checkpoint`).

The setup (params, data, shardings, transforms, the training loop) lives here
and the test imports it, so both runs do the same computation and differ only
in the number of processes. Importing this module has no side effects; the
distributed run starts in :func:`main`."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import softshare_jax as ss

STEPS = 4  # training steps of every case
CONTINUE_STEPS = 2  # steps after a checkpoint is restored
NUM_PROCESSES = 2
CKPT_CASE = "mixture_gradient"  # the case whose params and state go through Orbax
READY_TIMEOUT_S = 300  # waiting for the test's checkpoint (the test kills a hung run sooner)

# FSDP: each kernel sharded over all 8 devices along one axis; "b" along its
# second axis and "c" along its first, so that the tie b ~ c.T needs a
# transpose across devices. Every shape is distinct, so an optimizer state leaf
# gets its param's spec by its shape (see ``spec_for``).
SHAPES = {"a": (64, 32), "b": (32, 16), "c": (16, 32)}
SPECS = {"a": P("d", None), "b": P(None, "d"), "c": P("d", None)}
# Another sharding for restoring a checkpoint: every kernel sharded along its other axis.
OTHER_SPECS = {"a": P(None, "d"), "b": P("d", None), "c": P(None, "d")}

TIE = [["b", ss.transposed("c")]]


def host_params(seed: int = 0) -> dict[str, np.ndarray]:
  """The initial params, the same on every process (NumPy, float32)."""
  rng = np.random.default_rng(seed)
  return {k: rng.normal(0.0, 1.0, shape).astype(np.float32) for k, shape in SHAPES.items()}


def host_data(seed: int = 1) -> dict[str, dict[str, np.ndarray]]:
  """Fixed data of the loss: targets ``t`` and positive curvatures ``c`` per kernel."""
  rng = np.random.default_rng(seed)
  return {k: {"t": rng.normal(0.0, 1.0, shape).astype(np.float32),
              "c": rng.uniform(0.5, 2.0, shape).astype(np.float32)} for k, shape in SHAPES.items()}


def loss(params: dict, data: dict) -> jax.Array:
  """½ Σ c (w − t)²: its gradient c (w − t) is elementwise, so every difference
  between the runs comes from the transforms, none from the loss."""
  return sum(0.5 * jnp.sum(data[k]["c"] * (w - data[k]["t"]) ** 2) for k, w in params.items())


def _mixture(update: str) -> Callable[[dict], tuple[optax.GradientTransformation, dict]]:
  def build(params):
    extra = dict(precision_prior=(2.0, 0.5)) if update == "em" else {}
    prior = ss.mixture_prior(num_components=4, strength=0.05, mixture_update=update, **extra)
    return optax.chain(prior, optax.adam(1e-2)), params
  return build


def _prox(axis: int | None) -> Callable[[dict], tuple[optax.GradientTransformation, dict]]:
  def build(params):
    return optax.chain(optax.sgd(0.1), ss.weight_sharing_prox(0.5, 0.1, axis=axis)), params
  return build


def _soft_tie(params):
  return optax.chain(ss.soft_tie(TIE, 0.5), optax.sgd(0.1)), params


def _hard_tie(params):
  # The members must start equal (hard_tie's init checks it).
  synced = ss.sync({k: jnp.asarray(v) for k, v in params.items()}, TIE)
  return optax.chain(ss.hard_tie(TIE), optax.sgd(0.1)), jax.tree.map(np.asarray, synced)


def _keep_clusters(params):
  # Fine-tuning starts from quantized weights: the params rounded to a grid of
  # step 0.5 (zero among the values, so the zero cluster is exercised), whose
  # distinct values ``quantize(..., None)`` takes as the codebook.
  grid = {k: np.round(v * 2.0) / 2.0 for k, v in params.items()}
  q = ss.quantize(grid, None)
  return optax.chain(ss.keep_clusters(q), optax.sgd(0.1)), jax.tree.map(np.asarray, ss.dequantize(q))


# name -> host params -> (transform, the params it starts from). ELEMENTWISE
# lists the cases whose every op is elementwise (a transposed view moves data
# but adds nothing up), so both runs must agree bit for bit. Tying goes before
# the optimizer, the prox after it, as their docstrings place them.
CASES: dict[str, Callable[[dict], tuple[optax.GradientTransformation, dict]]] = {
    "mixture_gradient": _mixture("gradient"),
    "mixture_em": _mixture("em"),
    "prox_axis0": _prox(0),
    "prox_axis_none": _prox(None),
    "soft_tie": _soft_tie,
    "hard_tie": _hard_tie,
    "keep_clusters": _keep_clusters,
}
ELEMENTWISE = ("soft_tie", "hard_tie")


def make_mesh() -> Mesh:
  """A 1-D mesh ``"d"`` over all global devices, in id order (the same layout
  for 1 process x 8 devices and 2 processes x 4)."""
  devices = sorted(jax.devices(), key=lambda d: d.id)
  assert len(devices) == 8, f"expected 8 global devices, got {len(devices)}"
  return Mesh(np.array(devices), ("d",))


def spec_for(shape: tuple[int, ...], specs: dict[str, P]) -> P:
  """A param's spec for a leaf of its shape (params, Adam moments); others replicated."""
  by_shape = {SHAPES[k]: spec for k, spec in specs.items()}
  return by_shape.get(tuple(shape), P())


def shardings_like(tree: Any, mesh: Mesh, specs: dict[str, P] = SPECS) -> Any:
  """A ``NamedSharding`` on ``mesh`` for every leaf of ``tree``, by :func:`spec_for`."""
  return jax.tree.map(lambda x: NamedSharding(mesh, spec_for(np.shape(x), specs)), tree)


def to_global(host_tree: Any, shardings: Any) -> Any:
  """Global arrays from host values that every process holds in full; each
  process fills only its own devices' shards."""
  def one(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(one, host_tree, shardings)


def to_host(tree: Any) -> Any:
  """The full values on every process, as NumPy arrays."""
  from jax.experimental import multihost_utils

  def one(x):
    if x.is_fully_addressable:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)


class Trainer:
  """One case: its transform, global params and data, jitted init and step.

  The state's shardings are fixed (``shardings_like``), not left to the
  partitioner, so that both runs hold it the same way and a checkpoint's
  target can name them.
  """

  def __init__(self, case: str, mesh: Mesh, specs: dict[str, P] = SPECS):
    self.tx, params = CASES[case](host_params())
    self.mesh = mesh
    self.param_shardings = shardings_like(params, mesh, specs)
    self.params = to_global(params, self.param_shardings)
    data = host_data()
    self.data = to_global(data, {k: {"t": s, "c": s} for k, s in self.param_shardings.items()})
    abstract_state = jax.eval_shape(self.tx.init, params)
    self.state_shardings = shardings_like(abstract_state, mesh, specs)
    self._init = jax.jit(self.tx.init, out_shardings=self.state_shardings)
    self._step = jax.jit(self._step_fn, out_shardings=(self.param_shardings, self.state_shardings))

  def _step_fn(self, params, state, data):
    grads = jax.grad(loss)(params, data)
    updates, state = self.tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def init(self) -> Any:
    return self._init(self.params)

  def train(self, params: Any, state: Any, steps: int) -> tuple[Any, Any]:
    for _ in range(steps):
      params, state = self._step(params, state, self.data)
    return params, state

  def run(self) -> tuple[Any, Any]:
    """``STEPS`` steps from the initial params."""
    return self.train(self.params, self.init(), STEPS)


def flat_arrays(tree: Any) -> dict[str, np.ndarray]:
  """A tree's leaves as ``{"000": ..., "001": ...}`` in flattening order (for ``np.savez``)."""
  return {f"{i:03d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def unflat_arrays(arrays: Any, like: Any) -> Any:
  """The inverse of :func:`flat_arrays`, with ``like``'s tree structure."""
  leaves = [arrays[f"{i:03d}"] for i in range(len(jax.tree.leaves(like)))]
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


def save_checkpoint(path: str, tree: Any) -> None:
  """An Orbax checkpoint of ``tree``; with several processes, each writes its own shards."""
  import orbax.checkpoint as ocp
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.abspath(path), tree)
  ckpt.wait_until_finished()
  ckpt.close()


def restore_checkpoint(path: str, like: Any, shardings: Any) -> Any:
  """Restores onto ``shardings``; ``like`` gives the tree, shapes and dtypes."""
  import orbax.checkpoint as ocp
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), like, shardings)
  ckpt = ocp.StandardCheckpointer()
  restored = ckpt.restore(os.path.abspath(path), target)
  ckpt.close()
  for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
    assert x.sharding.is_equivalent_to(s, x.ndim), f"restored onto {x.sharding}, asked for {s}"
  return restored


def _save_npz(path: str, tree: Any) -> None:
  """Process 0 writes the host values of ``tree`` (every process holds them all)."""
  if jax.process_index() == 0:
    np.savez(path, **flat_arrays(tree))


def restore_one_process_checkpoint(trainer: Trainer, ckpt_in: str, saved_npz: str, out: str) -> None:
  """Restores the single process's checkpoint onto this run's mesh.

  Writes (process 0) the restored values on the training sharding
  (``restored_same``) and on ``OTHER_SPECS`` (``restored_other``), and the
  training continued for ``CONTINUE_STEPS`` both from the restored tree
  (``continued_restored``) and from the values the single process saved,
  read from ``saved_npz`` and laid out the same way (``continued_saved``).
  The test checks that both restored trees equal the saved values and that
  both continuations are equal, bit for bit.
  """
  params, state = trainer.params, trainer.init()
  shardings = (trainer.param_shardings, trainer.state_shardings)
  restored = restore_checkpoint(ckpt_in, (params, state), shardings)
  _save_npz(os.path.join(out, "restored_same.npz"), to_host(restored))
  other = shardings_like((params, state), trainer.mesh, OTHER_SPECS)
  _save_npz(os.path.join(out, "restored_other.npz"), to_host(restore_checkpoint(ckpt_in, (params, state), other)))
  with np.load(saved_npz, allow_pickle=False) as f:
    saved = to_global(unflat_arrays(f, (params, state)), shardings)
  _save_npz(os.path.join(out, "continued_restored.npz"), to_host(trainer.train(*restored, CONTINUE_STEPS)))
  _save_npz(os.path.join(out, "continued_saved.npz"), to_host(trainer.train(*saved, CONTINUE_STEPS)))


def _use_loopback_for_gloo() -> None:
  """Makes Gloo listen on 127.0.0.1 rather than on the address the host name
  resolves to. JAX has no public setting for it, so this replaces the CPU
  backend's factory (private JAX API; skipped if it has moved, and then Gloo
  keeps its default, which is 127.0.0.1 wherever the host name resolves there)."""
  if jax.config.jax_cpu_collectives_implementation != "gloo":
    return
  try:
    from jax._src import distributed
    from jax._src import xla_bridge
    from jax._src.lib import _jax
  except ImportError:  # pragma: no cover - depends on the JAX version.
    return

  def make_client():
    collectives = _jax.make_gloo_tcp_collectives(
        distributed_client=distributed.global_state.client, hostname="127.0.0.1")
    return xla_bridge.make_cpu_client(collectives=collectives)

  xla_bridge.register_backend_factory("cpu", make_client, priority=0, fail_quietly=False)


def check_collectives(mesh: Mesh) -> None:
  """A sum over the 8 devices of both processes: where cross-process CPU
  collectives do not work, this is where it shows."""
  assert jax.process_count() == NUM_PROCESSES and jax.local_device_count() == 4, (
      jax.process_count(), jax.local_device_count())
  x = to_global(np.arange(8, dtype=np.float32), NamedSharding(mesh, P("d")))
  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
  assert float(to_host(total)) == 28.0, to_host(total)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--out", required=True, help="directory for the results (process 0 writes)")
  parser.add_argument("--ckpt-in", required=True, help="the single process's Orbax checkpoint")
  parser.add_argument("--saved-npz", required=True, help="the values in --ckpt-in, flattened")
  args = parser.parse_args(argv)

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  address = f"127.0.0.1:{args.port}"
  jax.distributed.initialize(coordinator_address=address, coordinator_bind_address=address,
                             num_processes=NUM_PROCESSES, process_id=args.process_id,
                             initialization_timeout=60, heartbeat_timeout_seconds=30,
                             shutdown_timeout_seconds=30)
  _use_loopback_for_gloo()
  try:
    mesh = make_mesh()
    check_collectives(mesh)
  except Exception:  # noqa: BLE001 - the test skips with this reason.
    with open(os.path.join(args.out, f"collectives_unavailable_{args.process_id}.txt"), "w") as f:
      f.write(traceback.format_exc())
    return 3
  ckpt_trainer = None
  for case in CASES:
    try:
      trainer = Trainer(case, mesh)
      params, state = trainer.run()
      result = to_host((params, state))
    except Exception:  # noqa: BLE001 - reported to the test, which fails that case.
      # A trace-time error happens alike on both processes, so both get here
      # and the run goes on with the next case.
      if jax.process_index() == 0:
        with open(os.path.join(args.out, f"error_{case}.txt"), "w") as f:
          f.write(traceback.format_exc())
      continue
    _save_npz(os.path.join(args.out, f"final_{case}.npz"), result)
    if case == CKPT_CASE:
      save_checkpoint(os.path.join(args.out, "ckpt_2proc"), (params, state))
      ckpt_trainer = trainer
  if ckpt_trainer is None:  # its error is in error_<CKPT_CASE>.txt
    jax.distributed.shutdown()
    return 0
  # The test writes its checkpoint while this run trains (so the two overlap):
  # wait for its marker, written after the checkpoint and its values.
  deadline = time.monotonic() + READY_TIMEOUT_S
  while not os.path.exists(args.ckpt_in + ".ready"):
    if time.monotonic() > deadline:
      raise TimeoutError(f"no {args.ckpt_in}.ready after {READY_TIMEOUT_S} s")
    time.sleep(0.05)
  restore_one_process_checkpoint(ckpt_trainer, args.ckpt_in, args.saved_npz, args.out)
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
