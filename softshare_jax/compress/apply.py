"""Running a model from compressed weights: :func:`compressed_apply`.

``apply_fn(dequantize(q), x)`` under ``jax.jit`` decodes every weight at the
start, because the decodes depend on the params alone and XLA schedules them
first: all decoded layers are alive at once. Here ``apply_fn`` is traced to a
jaxpr with the dense params as inputs, and an interpreter evaluates it, decoding
a weight right before each equation that consumes it together with an
activation. The decode is made to depend on that activation twice over: a
``lax.optimization_barrier`` (kept by GPU and TPU compilers, dropped by
XLA:CPU after CSE) and a data dependence that every backend keeps (the packed
indices OR-ed with a zero computed from the activation, :func:`tie_to`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
from jax import lax
from jax.custom_batching import custom_vmap
import jax.extend.core as jex
import numpy as np

from softshare_jax.compress.quantized import check_quantized
from softshare_jax.compress.quantized import is_qleaf

# Calls that carry no rule of their own for AD or batching: evaluating their
# body inline is the same computation, and lets a weight passed into a jitted
# helper be decoded at its use inside it.
INLINED_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})


def compressed_apply(apply_fn: Callable[..., Any], quantized: Any, *args: Any, **kwargs: Any) -> Any:
  """``apply_fn(params, *args, **kwargs)`` with each quantized weight decoded where it is used.

  The result is that of ``apply_fn(ss.dequantize(quantized), *args, **kwargs)``
  (the same operations in the same order, so bitwise the same), but no weight
  is decoded before the values it meets exist: under ``jax.jit`` a weight is
  decoded (``QuantizedLeaf.values()``) right before the operation that combines
  it with an activation, the decode tied to that activation (an
  ``lax.optimization_barrier``, and the packed indices OR-ed with a zero that
  XLA cannot fold, computed from one element of the activation: a data
  dependence that XLA:CPU, which drops barriers, keeps too), and the decoded
  tensor dies after that operation. A jitted MLP then holds about one decoded
  layer at a time instead of all of them: 16 MiB of temporaries instead of
  96 MiB for 6 layers of 2048 x 2048 (``benchmarks/compressed_apply.py``).

  What is decoded when. ``apply_fn`` is traced once per call with the dense
  params as abstract inputs, and the trace is replayed:

  - operations on weights alone (transpose, reshape, ``astype``, a weight
    times a constant, ``W / norm(W)``) are not run when met but replayed at
    the weight's use, so ``x @ W.T`` decodes ``W`` next to ``x``;
  - the first operation that meets a weight and an activation decodes it:
    ``@``, ``jnp.dot``, ``jnp.matmul``, ``jnp.einsum``, ``lax.dot_general``,
    convolutions (``lax.conv_general_dilated``, ``nnx.Conv``, ``nn.Conv``) and
    elementwise uses (``x + b``, ``x * scale``) alike: any primitive;
  - a weight used twice is decoded twice, once per use;
  - inside ``jax.jit``-ed helpers the body is evaluated inline, so the weight
    is decoded at its use inside; ``custom_jvp``/``custom_vjp`` functions,
    ``jax.checkpoint`` blocks and control flow (``cond``, ``scan``,
    ``while_loop``, ``nn.scan`` over stacked layers) get their weights decoded
    right before the call, tied to its other inputs, and whole: a scan over
    stacked layers decodes all of them before the loop. Still correct, only
    decoded earlier;
  - leaves that are not quantized are passed as they are; an output that is a
    weight (or computed from weights alone) is decoded at the end.

  Flax recipes (``q = ss.quantize(params, ...)`` of the same params):

  - Linen: ``compressed_apply(lambda p, x: model.apply({"params": p}, x), q, x)``;
  - NNX: ``graphdef, state = nnx.split(model, nnx.Param)``, quantize ``state``,
    then ``compressed_apply(lambda p, x: nnx.merge(graphdef, p)(x), q, x)``.

  Transformations: the whole call may be jitted with ``quantized`` a traced
  argument (``jax.jit(lambda q, x: ss.compressed_apply(f, q, x))``), vmapped
  over the inputs (the weights are still decoded once, not per example),
  and differentiated with respect to the other arguments: ``jax.grad`` w.r.t.
  ``x`` is the dequantized model's (bitwise eagerly; under ``jit`` to
  rounding, XLA fusing the two backward passes differently), and w.r.t. the
  float codebooks too (``allow_int=True`` for the integer indices). Under
  ``jax.grad`` the decoded weights are residuals for the backward pass and
  stay alive until it; the memory bound is for the forward pass. Sharded
  activations cost one scalar all-reduce per decode (the element read for the
  tie). Array leaves of
  ``args``/``kwargs`` are traced; other leaves (Python numbers, strings,
  flags) are static, as under ``jax.jit`` with ``static_argnames``. Eagerly
  (no jit), the replay runs op by op and each decoded weight is freed after
  its use.

  Args:
    apply_fn: ``apply_fn(params, *args, **kwargs)``, traceable, with params
      of the structure of ``quantized.tree``.
    quantized: a :class:`Quantized` (from :func:`quantize`,
      :func:`cluster_weights`, :func:`hash_clusters`, :func:`load_quantized`).
    *args: passed on to ``apply_fn``.
    **kwargs: passed on to ``apply_fn``.

  Returns:
    What ``apply_fn`` returns.

  Raises:
    ValueError: ``apply_fn`` is not callable, or ``quantized`` is not a
      :class:`Quantized`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import softshare_jax as ss
    >>> params = {"w": jnp.array([[0.5, -1.0], [0.5, 0.5]]), "b": jnp.array([0.25, 0.0])}
    >>> q = ss.quantize(params, None)
    >>> f = lambda p, x: jnp.maximum(x @ p["w"] + p["b"], 0.0)
    >>> x = jnp.array([[1.0, 2.0]])
    >>> jax.jit(lambda q, x: ss.compressed_apply(f, q, x))(q, x)
    Array([[1.75, 0.  ]], dtype=float32)
    >>> bool((ss.compressed_apply(f, q, x) == f(ss.dequantize(q), x)).all())
    True
  """
  if not callable(apply_fn):
    raise ValueError(f"apply_fn must be callable, got {apply_fn!r}.")
  check_quantized(quantized)
  p_leaves, p_def = jax.tree.flatten(quantized.tree, is_leaf=is_qleaf)
  a_leaves, a_def = jax.tree.flatten((args, kwargs))
  p_dyn = [i for i, x in enumerate(p_leaves) if is_qleaf(x) or is_array(x)]
  a_dyn = [i for i, x in enumerate(a_leaves) if is_array(x)]

  def flat_fn(*dyn):
    ps, rest = list(p_leaves), list(a_leaves)
    for i, v in zip(p_dyn, dyn[: len(p_dyn)]):
      ps[i] = v
    for i, v in zip(a_dyn, dyn[len(p_dyn):]):
      rest[i] = v
    call_args, call_kwargs = jax.tree.unflatten(a_def, rest)
    return apply_fn(jax.tree.unflatten(p_def, ps), *call_args, **call_kwargs)

  specs = [jax.eval_shape(p_leaves[i].values) if is_qleaf(p_leaves[i]) else p_leaves[i] for i in p_dyn]
  specs += [a_leaves[i] for i in a_dyn]
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*specs)

  qleaves: list[Any] = []
  inputs: list[Any] = []
  for i in p_dyn:
    if is_qleaf(p_leaves[i]):
      inputs.append(Lazy(Node(leaf=len(qleaves)), 0))
      qleaves.append(p_leaves[i])
    else:
      inputs.append(p_leaves[i])
  free = [True] * len(p_dyn) + [False] * len(a_dyn)  # params do not depend on the inputs
  interp = Interpreter(qleaves)
  outs, _ = interp.run(closed.jaxpr, closed.consts, inputs + [a_leaves[i] for i in a_dyn], free)
  lazy = [j for j, v in enumerate(outs) if isinstance(v, Lazy)]
  if lazy:
    decoded, _ = interp.materialize([outs[j] for j in lazy], [])
    for j, v in zip(lazy, decoded):
      outs[j] = v
  return jax.tree.unflatten(jax.tree.structure(out_shape), outs)


def is_array(x: Any) -> bool:
  """Whether ``x`` is traced as an input (a JAX or NumPy array, a tracer)."""
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


@dataclasses.dataclass(eq=False)
class Node:
  """A value computed from the weights alone and not yet computed.

  Either the decoded quantized leaf number ``leaf`` (``eqn`` None), or the
  outputs of ``eqn`` applied to ``inputs`` (each a :class:`Lazy` or a value
  that does not depend on the activations).
  """

  eqn: Any = None
  inputs: Sequence[Any] = ()
  leaf: int = -1

  @property
  def deps(self) -> frozenset[int]:
    if self.eqn is None:
      return frozenset([self.leaf])
    return frozenset().union(*(x.node.deps for x in self.inputs if isinstance(x, Lazy)))


@dataclasses.dataclass(eq=False)
class Lazy:
  """Output ``index`` of a :class:`Node`: a weight-derived value, decoded where it is used."""

  node: Node
  index: int


def opaque_zero(s: jax.Array) -> jax.Array:
  """0 as an unsigned integer computed from ``s``, which XLA cannot fold to a constant.

  The popcount of an n-bit word is at most n < 2**n.bit_length(), so shifting
  it right by n.bit_length() bits leaves 0, whatever ``s`` holds (NaN too).
  """
  if s.dtype == np.bool_:
    s = s.astype(np.uint8)
  bits = 8 * s.dtype.itemsize
  u = lax.bitcast_convert_type(s, np.dtype(f"uint{bits}"))
  return lax.shift_right_logical(lax.population_count(u), np.array(bits.bit_length(), u.dtype))


@custom_vmap
def tie_codes(codes: Any, s: jax.Array) -> Any:
  return jax.tree.map(lambda c: c | opaque_zero(s).astype(c.dtype) if is_int(c) else c, codes)


@tie_codes.def_vmap
def tie_codes_vmap(axis_size: int, in_batched: Any, codes: Any, s: jax.Array) -> tuple[Any, Any]:
  # Under vmap over the activations, one element of the first example is as
  # good a tie as any: the codes stay unbatched, decoded once, not per example.
  del axis_size
  codes_batched, s_batched = in_batched
  return tie_codes(codes, s[0] if s_batched else s), codes_batched


@jax.custom_jvp
def tied(codes: Any, s: jax.Array) -> Any:
  """:func:`tie_codes`, differentiable: the identity on ``codes``, nothing flows from ``s``."""
  return tie_codes(codes, s)


@tied.defjvp
def tied_jvp(primals: Any, tangents: Any) -> tuple[Any, Any]:
  codes, s = primals
  return tied(codes, s), tangents[0]


def is_int(x: Any) -> bool:
  return np.issubdtype(x.dtype, np.integer) and x.dtype.itemsize >= 1


def tie_to(codes: list[list[Any]], acts: Sequence[Any]) -> list[list[Any]]:
  """``codes`` unchanged, but computed from an element of the first non-empty activation in ``acts``.

  ``optimization_barrier`` alone orders the decode after ``acts`` on GPU and
  TPU, but XLA:CPU drops barriers (after CSE) without keeping the order, and
  then schedules every decode first. A data dependence survives every
  backend: each integer code array is OR-ed with a zero computed from the
  activation (:func:`opaque_zero`), fused into the decode for one pass over
  the packed bytes. Float arrays (codebooks) are left alone, so gradients with
  respect to them are unchanged.
  """
  for a in acts:
    dt = getattr(a, "dtype", None)
    # Extended dtypes (PRNG keys) and empty arrays have no element to read.
    if isinstance(dt, np.dtype) and (np.issubdtype(dt, np.number) or dt == np.bool_) and np.size(a) > 0:
      return tied(codes, lax.stop_gradient(one_element(a)))
  return codes


def one_element(a: jax.Array) -> jax.Array:
  """A scalar read from ``a``: its first element, or under explicit sharding the max over the sharded axes.

  Explicitly sharded axes cannot be sliced to one element; reducing over
  them (the other axes sliced first) costs one all-reduce of a scalar.
  """
  typeof = getattr(jax, "typeof", None)
  spec = getattr(getattr(typeof(a), "sharding", None), "spec", None) if typeof else None
  sharded = {i for i, axes in enumerate(spec or ()) if axes is not None}
  s = a[tuple(slice(None) if i in sharded else 0 for i in range(np.ndim(a)))]
  if np.issubdtype(s.dtype, np.complexfloating):
    s = s.real
  return s.max() if s.ndim else s


def bind(eqn: Any, invals: Sequence[Any]) -> list[Any]:
  """Applies ``eqn``'s primitive, with its parameters, to ``invals``; its outputs as a list."""
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns: Sequence[Any] = ()
  if isinstance(params, tuple):  # JAX before 0.7 also returns the functions a call binds.
    subfuns, params = params
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


class Interpreter:
  """Evaluates a jaxpr whose quantized params are :class:`Lazy` values."""

  def __init__(self, qleaves: Sequence[Any]):
    self.qleaves = list(qleaves)

  def materialize(self, lazies: Sequence[Lazy], acts: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """``lazies`` decoded and computed; ``acts`` returned, the float ones through the same barrier.

    The packed arrays of every leaf needed pass through one
    ``optimization_barrier`` with the floating-point ``acts`` (an integer
    operand such as a ``cond`` index must keep its zero tangent), then are
    tied to an element of ``acts`` (:func:`tie_to`): the decodes read the
    results, so XLA cannot decode before ``acts`` exist.
    """
    deps = sorted(frozenset().union(*(x.node.deps for x in lazies)))
    flat = [jax.tree.flatten(self.qleaves[d]) for d in deps]
    codes = [leaves for leaves, _ in flat]
    acts = list(acts)
    floats = [i for i, a in enumerate(acts) if np.issubdtype(getattr(a, "dtype", np.int8), np.inexact)]
    if floats:
      barred, codes = lax.optimization_barrier(([acts[i] for i in floats], codes))
      for i, a in zip(floats, barred):
        acts[i] = a
    codes = tie_to(codes, acts)
    decoded = {d: jax.tree.unflatten(treedef, c).values() for d, (_, treedef), c in zip(deps, flat, codes)}
    memo: dict[int, list[Any]] = {}

    def evaluate(node: Node) -> list[Any]:
      if id(node) not in memo:
        if node.eqn is None:
          memo[id(node)] = [decoded[node.leaf]]
        else:
          ins = [evaluate(x.node)[x.index] if isinstance(x, Lazy) else x for x in node.inputs]
          memo[id(node)] = bind(node.eqn, ins)
      return memo[id(node)]

    return [evaluate(x.node)[x.index] for x in lazies], acts

  def run(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any],
          args_free: Sequence[bool]) -> tuple[list[Any], list[bool]]:
    """Evaluates ``jaxpr``; its outputs (some :class:`Lazy`) and which do not depend on the activations.

    ``args_free[i]`` says that ``args[i]`` does not depend on the activations
    (params, constants): an operation on weights and such values alone is
    deferred to the weights' use.
    """
    env: dict[Any, Any] = {}
    free: set[Any] = set()

    def read(v: Any) -> Any:
      return v.val if isinstance(v, jex.Literal) else env[v]

    def is_free(v: Any) -> bool:
      return isinstance(v, jex.Literal) or v in free

    def write(vs: Sequence[Any], vals: Sequence[Any], are_free: Sequence[bool]) -> None:
      for v, val, f in zip(vs, vals, are_free):
        env[v] = val
        if f:
          free.add(v)

    # Concrete constants are known before the inputs; traced ones (closed over
    # from an enclosing jit) may be activations.
    write(jaxpr.constvars, consts, [not isinstance(c, jax.core.Tracer) for c in consts])
    write(jaxpr.invars, args, args_free)
    for eqn in jaxpr.eqns:
      vals = [read(v) for v in eqn.invars]
      lazy = [isinstance(x, Lazy) for x in vals]
      n_out = len(eqn.outvars)
      if not any(lazy):
        outs, out_free = bind(eqn, vals), [all(map(is_free, eqn.invars))] * n_out
      elif not eqn.effects and all(lz or is_free(v) for lz, v in zip(lazy, eqn.invars)):
        node = Node(eqn=eqn, inputs=vals)
        outs, out_free = [Lazy(node, i) for i in range(n_out)], [False] * n_out
      elif eqn.primitive.name in INLINED_CALLS and sub_jaxpr(eqn) is not None:
        sub = sub_jaxpr(eqn)
        outs, out_free = self.run(sub.jaxpr, sub.consts, vals, [is_free(v) for v in eqn.invars])
      else:
        act_pos = [i for i, (lz, v) in enumerate(zip(lazy, eqn.invars)) if not lz and not is_free(v)]
        lazy_pos = [i for i, lz in enumerate(lazy) if lz]
        decoded, acts = self.materialize([vals[i] for i in lazy_pos], [vals[i] for i in act_pos])
        for i, val in zip(lazy_pos + act_pos, decoded + acts):
          vals[i] = val
        outs, out_free = bind(eqn, vals), [not act_pos] * n_out
      write(eqn.outvars, outs, out_free)
    outvals = [read(v) for v in jaxpr.outvars]
    return outvals, [isinstance(x, Lazy) or is_free(v) for x, v in zip(outvals, jaxpr.outvars)]


def sub_jaxpr(eqn: Any) -> Any:
  """The closed jaxpr an inlined call evaluates, or None if it has none."""
  for name in ("jaxpr", "call_jaxpr"):
    sub = eqn.params.get(name)
    if isinstance(sub, jex.ClosedJaxpr):
      return sub
  return None
