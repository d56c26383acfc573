"""Multi-process runs: 2 processes x 4 CPU devices give what 1 process x 8 gives.

docs/design.md §6: every transform must give the same weights on 2 processes
x 4 devices as on 1 x 8, with the params sharded over a device mesh. Checked
here for ``mixture_prior`` (gradient and EM updates of the mixture, before
Adam), ``weight_sharing_prox`` (``axis=0`` and ``axis=None``, after SGD),
``soft_tie``, ``hard_tie`` and ``keep_clusters`` (before SGD):

- ``tests/multiprocess_worker.py`` runs as two subprocesses joined by
  ``jax.distributed`` (Gloo CPU collectives, 127.0.0.1 only), each with 4 CPU
  devices; the params are FSDP-sharded over a mesh of the 8 global devices and
  trained a few steps on a fixed loss; the final params and optimizer states
  are gathered to the host and written with ``np.savez``.
- This process (8 devices, the root conftest's) runs the same computation,
  and the results must agree: bit for bit where every op is elementwise (the
  ties), within float32 rounding where a transform adds up across devices
  (the mixture's statistics, the prox's groups, the clusters' sums; see
  ``PARAMS_TOL``).
- Orbax: params and optimizer state (``MixturePriorState`` included) saved by
  the 2 processes and restored here, on the training sharding and on another
  one, and saved here and restored by the 2 processes. The restored values
  must equal the saved ones exactly, and training continued from them must
  equal, bit for bit, training continued from the saved values themselves.

The two processes run while this one computes its references. Where
cross-process CPU collectives do not work, the tests skip with the error.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

import multiprocess_worker as w

pytest.importorskip("orbax.checkpoint")

WORKER = Path(__file__).with_name("multiprocess_worker.py")
REPO = Path(__file__).resolve().parents[1]
# A guard against a hung run (a collective waiting for a process that died), not
# a timing: the two processes take ~15 s when the machine is idle.
CHILD_TIMEOUT_S = 240

# The cases that add up across devices: XLA's in-process all-reduce and Gloo's
# sum the per-device partials of a statistic in different orders, which changes
# it by a few float32 ulps of the sum of its terms' magnitudes. A leaf then
# agrees up to TOL times its largest value: for the params, 1e-6 (8 ulps of the
# largest weight; measured ≤ 5e-8); for the optimizer state, 1e-3 (measured
# ≤ 3e-5): the mixture's gradients, e.g. Σ_i (π_j − r_ij) for a logit, are sums
# of ~2000 terms that nearly cancel, so their rounding, and Adam's moments of
# them, are large next to their values. A real divergence (a shard counted
# twice or missed, a process with other data) moves the weights far more.
PARAMS_TOL, STATE_TOL = 1e-6, 1e-3


def free_port() -> int:
  """A free TCP port on 127.0.0.1 (bound to port 0, then released for the coordinator)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class Run:
  """The two processes' results: ``out`` holds their ``.npz`` files and checkpoint."""

  out: Path


@functools.cache
def reference(case: str) -> tuple[w.Trainer, Any, Any]:
  """This process's run of ``case`` on 8 devices: the trainer, final params and state."""
  trainer = w.Trainer(case, w.make_mesh())
  params, state = trainer.run()
  return trainer, params, state


def reference_host(case: str) -> Any:
  _, params, state = reference(case)
  return w.to_host((params, state))


def _tail(path: Path, n: int = 4000) -> str:
  """The end of a process's output, without Gloo's connection lines and XLA's
  resharding warnings (both many, neither an error)."""
  if not path.exists():
    return "(no output)"
  noise = ("[Gloo]", "Involuntary full rematerialization")
  lines = [line for line in path.read_text(errors="replace").splitlines() if not any(s in line for s in noise)]
  return "\n".join(lines)[-n:]


def _wait(procs: list[subprocess.Popen], logs: list[Path], deadline: float) -> None:
  """Waits for both processes until ``deadline`` (``time.monotonic``); fails,
  showing their output, if one fails or hangs.

  When one process fails, the other would wait in a collective until its
  heartbeat times out: it is killed at once.
  """
  while any(p.poll() is None for p in procs):
    failed = [p for p in procs if p.returncode not in (None, 0)]
    if failed or time.monotonic() > deadline:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
      break
    time.sleep(0.1)
  if all(p.returncode == 0 for p in procs):
    return
  unavailable = sorted(logs[0].parent.glob("collectives_unavailable_*.txt"))
  if unavailable:
    pytest.skip("cross-process CPU collectives (Gloo) do not work here:\n" + unavailable[0].read_text()[-2000:])
  report = "\n".join(f"--- process {i}: exit code {p.returncode} (-9: killed; hung or timed out after "
                     f"{CHILD_TIMEOUT_S} s, or its peer failed)\n{_tail(log)}"
                     for i, (p, log) in enumerate(zip(procs, logs)))
  pytest.fail(f"the 2-process run failed:\n{report}", pytrace=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
  """Launches the 2 processes, and meanwhile writes the checkpoint they restore."""
  if jax.device_count() != 8 or jax.process_count() != 1:
    pytest.skip("needs the root conftest's 1 process x 8 CPU devices")
  out = tmp_path_factory.mktemp("multiprocess")
  ckpt = out / "ckpt_1proc"
  port = free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  procs, logs = [], []
  deadline = time.monotonic() + CHILD_TIMEOUT_S
  try:
    for i in range(w.NUM_PROCESSES):
      logs.append(out / f"process{i}.log")
      with open(logs[-1], "wb") as log:
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), "--process-id", str(i), "--port", str(port), "--out", str(out),
             "--ckpt-in", str(ckpt), "--saved-npz", str(out / "saved_1proc.npz")],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    _, params, state = reference(w.CKPT_CASE)
    w.save_checkpoint(str(ckpt), (params, state))
    np.savez(out / "saved_1proc.npz", **w.flat_arrays(w.to_host((params, state))))
    (out / "ckpt_1proc.ready").touch()
    for case in w.CASES:
      try:
        reference(case)
      except Exception:  # noqa: BLE001 - raised again, in that case's test.
        pass
    _wait(procs, logs, deadline)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return Run(out)


def load(path: Path, like: Any) -> Any:
  """An ``.npz`` written by ``flat_arrays``, in ``like``'s tree structure."""
  with np.load(path, allow_pickle=False) as f:
    return w.unflat_arrays({k: f[k] for k in f.files}, like)


def assert_trees_equal(actual: Any, expected: Any, tol: float = 0.0) -> None:
  """Leaf by leaf, with the leaf's path in the message: exact for ``tol`` 0,
  else ``|actual − expected| ≤ tol · max|expected|`` over each leaf."""
  expected_leaves = jax.tree_util.tree_flatten_with_path(expected)[0]
  actual_leaves = jax.tree.leaves(actual)
  assert len(actual_leaves) == len(expected_leaves)
  for (path, e), a in zip(expected_leaves, actual_leaves):
    a, e, where = np.asarray(a), np.asarray(e), jax.tree_util.keystr(path)
    assert (a.shape, a.dtype) == (e.shape, e.dtype), where
    if tol == 0.0:
      np.testing.assert_array_equal(a, e, err_msg=where)
    else:
      scale = float(np.abs(e).max(initial=0.0))
      np.testing.assert_allclose(a, e, rtol=0.0, atol=tol * scale, err_msg=f"{where} (largest |value| {scale:.3g})")


def assert_runs_agree(actual: tuple[Any, Any], expected: tuple[Any, Any], exact: bool) -> None:
  """(params, state) of two runs: exact, or within ``PARAMS_TOL`` and ``STATE_TOL``."""
  assert_trees_equal(actual[0], expected[0], 0.0 if exact else PARAMS_TOL)
  assert_trees_equal(actual[1], expected[1], 0.0 if exact else STATE_TOL)


@pytest.mark.parametrize("case", list(w.CASES))
def test_two_processes_give_the_weights_of_one(run, case):
  error = run.out / f"error_{case}.txt"
  if error.exists():
    pytest.fail(f"{case} failed on 2 processes x 4 devices:\n{error.read_text()}", pytrace=False)
  expected = reference_host(case)
  actual = load(run.out / f"final_{case}.npz", expected)
  # Guard: the params moved, so the comparison is not of the initial values.
  trainer = reference(case)[0]
  moved = [np.abs(a - np.asarray(p)).max() for a, p in zip(jax.tree.leaves(actual[0]), jax.tree.leaves(trainer.params))]
  assert min(moved) > 1e-2, moved
  assert_runs_agree(actual, expected, exact=case in w.ELEMENTWISE)


def test_checkpoint_of_two_processes_restores_on_one(run):
  """Saved by 2 processes, restored by this one on the training sharding and on another."""
  trainer, params, state = reference(w.CKPT_CASE)
  saved = load(run.out / f"final_{w.CKPT_CASE}.npz", (params, state))
  for specs in (w.SPECS, w.OTHER_SPECS):
    tr = trainer if specs is w.SPECS else w.Trainer(w.CKPT_CASE, trainer.mesh, specs)
    shardings = (tr.param_shardings, tr.state_shardings)
    restored = w.restore_checkpoint(str(run.out / "ckpt_2proc"), (params, state), shardings)
    assert jax.tree.structure(restored) == jax.tree.structure((params, state))
    assert_trees_equal(w.to_host(restored), saved)
    continued = w.to_host(tr.train(*restored, w.CONTINUE_STEPS))
    from_saved = w.to_host(tr.train(*w.to_global(saved, shardings), w.CONTINUE_STEPS))
    assert_trees_equal(continued, from_saved)


def test_checkpoint_of_one_process_restores_on_two(run):
  """Saved by this process, restored by the 2 processes (see ``restore_one_process_checkpoint``)."""
  trainer, params, state = reference(w.CKPT_CASE)
  saved = load(run.out / "saved_1proc.npz", (params, state))
  for name in ("restored_same", "restored_other"):
    assert_trees_equal(load(run.out / f"{name}.npz", saved), saved)
  continued = load(run.out / "continued_restored.npz", saved)
  assert_trees_equal(continued, load(run.out / "continued_saved.npz", saved))
  # And the 2 processes continue as this one does, up to the rounding of the sums.
  assert_runs_agree(continued, w.to_host(trainer.train(params, state, w.CONTINUE_STEPS)), exact=False)
