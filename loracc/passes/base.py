"""The pass contract: a pass takes an adapter and returns a new one, what changed, what it skipped.

Passes are frozen dataclasses whose fields are their options, so a pipeline string such as
``fold-scaling,truncate-rank{rank=8}`` names them (see :func:`loracc.passes.parse_pipeline`).
A pass never mutates its input; ``modified`` is ``result.adapter is not adapter``. Passes that
need base weights read them through :class:`PassContext`, one tensor at a time.

Most passes rewrite sites one at a time: they subclass :class:`SitePass` and write only
``rewrite(site, adapter, ctx) -> Rewritten | Skip`` (onnxscript's rule shape: declining is a
value with a reason); the base owns the loop and builds the :class:`PassResult`. The pipeline
(:func:`loracc.pipeline.run_pipeline`) verifies the IR around every pass.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, ClassVar

from loracc.errors import LoraccError, PassError
from loracc.ir import Adapter, Site

if TYPE_CHECKING:
    from loracc.weights import BaseWeights

__all__ = ["Pass", "PassContext", "PassResult", "Rewritten", "SitePass", "Skip"]


@dataclass(frozen=True, slots=True)
class Skip:
    """A site a pass left alone, and why."""

    site: str
    reason: str


@dataclass(frozen=True, slots=True)
class Rewritten:
    """A site a pass changed, and an optional line for the report (what was computed)."""

    site: Site
    detail: str = ""


@dataclass(frozen=True, slots=True)
class PassResult:
    """The adapter after a pass, the modules it changed, and the ones it skipped with reasons."""

    adapter: Adapter
    changed: tuple[str, ...] = ()
    skipped: tuple[Skip, ...] = ()
    details: tuple[str, ...] = ()

    @property
    def modified(self) -> bool:
        return bool(self.changed)


@dataclass(frozen=True, slots=True)
class PassContext:
    """What passes may consult besides the adapter: the base weights and the compute device."""

    base: BaseWeights | None = None
    device: str = "cpu"
    history: tuple[str, ...] = field(default=())


class Pass(abc.ABC):
    """Base of every pass; subclasses are frozen dataclasses with a kebab-case ``name``."""

    name: ClassVar[str]

    def requires(self, adapter: Adapter, ctx: PassContext) -> None:  # noqa: B027 (optional hook)
        """Raise if the pass cannot run on ``adapter`` (a missing base, a wrong order)."""

    @abc.abstractmethod
    def run(self, adapter: Adapter, ctx: PassContext) -> PassResult:
        """Return the rewritten adapter; never mutate ``adapter``."""

    def __call__(self, adapter: Adapter, ctx: PassContext) -> PassResult:
        try:
            self.requires(adapter, ctx)
            return self.run(adapter, ctx)
        except LoraccError:
            raise
        except Exception as e:  # a bug in the pass: name it and what ran before
            before = ", ".join(ctx.history) or "nothing"
            raise PassError(f"pass '{self.name}' failed after [{before}]: {e!r}") from e

    def spec(self) -> str:
        """This pass as a pipeline-string item, options included."""
        opts = [
            f"{f.name}={getattr(self, f.name)}"
            for f in fields(self)  # type: ignore[arg-type]
            if getattr(self, f.name) != f.default
        ]
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


class SitePass(Pass):
    """A pass that rewrites each site on its own; subclasses write :meth:`rewrite`.

    Whole-adapter preconditions (a missing base, tensors shared between sites) go in
    :meth:`Pass.requires`, which runs before the first site.
    """

    @abc.abstractmethod
    def rewrite(self, site: Site, adapter: Adapter, ctx: PassContext) -> Rewritten | Skip:
        """The new site, or why this one is left alone; raise only when the input is broken."""

    def run(self, adapter: Adapter, ctx: PassContext) -> PassResult:
        sites: list[Site] = []
        changed: list[str] = []
        skipped: list[Skip] = []
        details: list[str] = []
        for site in adapter.sites:
            outcome = self.rewrite(site, adapter, ctx)
            if isinstance(outcome, Skip):
                sites.append(site)
                skipped.append(outcome)
                continue
            sites.append(outcome.site)
            changed.append(site.module)
            if outcome.detail:
                details.append(outcome.detail)
        if not changed:
            return PassResult(adapter, (), tuple(skipped))
        return PassResult(
            replace(adapter, sites=tuple(sites)), tuple(changed), tuple(skipped), tuple(details)
        )
