"""How a model runs, decided once: `ExecutionPlan`, static and hashable, passed instead of mode flags.

    plan = ExecutionPlan(attention="pallas", experts="pallas", mesh=make_mesh("expert=8"), dispatch="all_to_all")
    logits, cache = prefill(params, cache, tokens, lengths, cfg=cfg, plan=plan)

It holds the attention implementation (xla or pallas), the routed experts' implementation (grouped, gather, dense
reference, pallas; model/moe.py), the mesh and its sharding rules, and the expert-parallel dispatch (psum,
all_to_all or auto; sharding/ep.py). Every combination is checked when the plan is built; what depends on the
phase (prefill, decode, train: set by the entry points, never by the user) in `check`, which the entry points
call before anything is traced.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import Mesh

from model.params import EXPERT_AXES, Moe
from quant.qarray import spec_for
from sharding.ep import resolve_dispatch
from sharding.rules import ShardingRules, flat_axes, mesh_size

ATTENTION = ("xla", "pallas")
EXPERTS = ("grouped", "gather", "dense", "pallas")
DISPATCH = ("psum", "all_to_all", "auto")
PHASES = ("prefill", "decode", "train")


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
    attention: str = "xla"
    experts: str = "grouped"
    mesh: Mesh | None = None
    rules: ShardingRules = ShardingRules()
    dispatch: str = "auto"
    a2a_min_tokens: int = 1  # auto: all_to_all once every batch x expert rank gets this many tokens of a step

    def __post_init__(self):
        for name, value, allowed in (("attention", self.attention, ATTENTION), ("experts", self.experts, EXPERTS),
                                     ("dispatch", self.dispatch, DISPATCH)):
            if value not in allowed:
                raise ValueError(f"ExecutionPlan: {name}={value!r}; choose from {allowed}")
        if self.a2a_min_tokens < 1:
            raise ValueError(f"ExecutionPlan: a2a_min_tokens must be >= 1, got {self.a2a_min_tokens}")
        if self.mesh is not None:
            if not isinstance(self.mesh, Mesh):
                raise ValueError(f"ExecutionPlan: mesh must be a jax.sharding.Mesh (sharding.make_mesh), got "
                                 f"{type(self.mesh).__name__}")
            self.rules.check_mesh(self.mesh)

    @classmethod
    def build(cls, plan: ExecutionPlan | None = None, *, backend: str | None = None, mesh=None) -> ExecutionPlan:
        """The entry points' convenience: a plan, or one from backend="xla" / "pallas" (attention and experts
        alike) and a mesh; not both."""
        if plan is not None:
            if backend is not None or mesh is not None:
                raise ValueError("pass either plan= or backend= / mesh=, not both")
            if not isinstance(plan, ExecutionPlan):
                raise ValueError(f"plan must be an ExecutionPlan, got {type(plan).__name__}")
            return plan
        if backend not in (None, *ATTENTION):
            raise ValueError(f"unknown backend {backend!r}; choose from {ATTENTION}")
        pallas = backend == "pallas"
        return cls(attention="pallas" if pallas else "xla", experts="pallas" if pallas else "grouped", mesh=mesh)

    def check(self, phase: str, *, tokens: int | None = None) -> None:
        """Refuse, before anything is traced, what this plan cannot run in `phase` (a step of `tokens` tokens)."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; one of {PHASES}")
        if phase == "train":
            if "pallas" in (self.attention, self.experts):
                raise ValueError("training needs gradients, which the Pallas kernels do not have: use "
                                 "attention='xla' and experts in ('grouped', 'gather', 'dense')")
            if self.mesh is not None:
                raise ValueError("training runs on one device (plan without a mesh)")
        if tokens is not None and self.expert_parallel and self.dispatch == "all_to_all":
            resolve_dispatch(self.dispatch, tokens, self.mesh, self.rules, self.a2a_min_tokens)

    # ---- what the layers ask -----------------------------------------------------------------------------------

    def axes(self, logical: str) -> tuple[str, ...]:
        """The mesh axes a logical axis maps to (empty without a mesh)."""
        return flat_axes(self.rules.axes(logical)) if self.mesh is not None else ()

    @property
    def expert_parallel(self) -> bool:
        """Whether the routed experts (or their width) are split over the mesh."""
        return self.mesh is not None and mesh_size(self.mesh, self.axes("experts") + self.axes("expert_ffn")) > 1

    def expert_specs(self, p: Moe, stacked: bool) -> tuple:
        """PartitionSpecs of the routed expert stacks as the rules place them (quantized: codes and scales)."""
        lead = ("layers",) if stacked else ()
        return tuple(spec_for(self.rules.spec(lead + EXPERT_AXES[name]), getattr(p, name))
                     for name in ("we1", "we3", "we2"))
