"""Every use of Opacus' internals, in one place, for the pinned opacus 1.6.*.

fedpriv drives Opacus through its public API (`PrivacyEngine.make_private`,
`DPDataLoader`, `BatchMemoryManager`, the accountants, the optimizer's step
hook). One thing has no public form: Opacus leaves per-sample state on every
parameter it hooked (grad samples, ghost clipping's norms, a forward
counter), and removing its hooks does not remove that state. A site's worker
keeps one resident model across rounds, so the state must go with the hooks,
or the next round's clipping reads stale per-sample norms.

`check()` says, in one message, what the installed Opacus no longer has;
`tests/test_compat.py` runs it, so moving the pin fails there first.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

from torch import nn

from fedpriv.common.errors import FedprivError

PINNED = "1.6."
# Set on parameters by GradSampleModule (grad_sample, _forward_counter), ghost
# clipping (_norm_sample) and DPOptimizer (summed_grad).
PER_SAMPLE_STATE = ("grad_sample", "_forward_counter", "summed_grad", "_norm_sample")


class OpacusCompatError(FedprivError):
    """The installed Opacus lacks an internal fedpriv relies on."""


def check() -> None:
    """Raises an `OpacusCompatError` listing what the installed Opacus lacks."""
    from opacus.grad_sample import grad_sample_module, grad_sample_module_fast_gradient_clipping
    from opacus.optimizers import DPOptimizer, optimizer

    problems: list[str] = []
    if not version("opacus").startswith(PINNED):
        problems.append("the pinned version")
    if not callable(getattr(DPOptimizer, "attach_step_hook", None)):
        problems.append("DPOptimizer.attach_step_hook")
    if "step_hook" not in inspect.getsource(DPOptimizer.__init__):
        problems.append("DPOptimizer.step_hook")
    sources = "".join(
        inspect.getsource(m) for m in (grad_sample_module, grad_sample_module_fast_gradient_clipping, optimizer)
    )
    problems += [f"the per-parameter attribute {name}" for name in PER_SAMPLE_STATE if f".{name}" not in sources]
    if problems:
        raise OpacusCompatError(
            f"fedpriv needs opacus {PINNED}* (installed: {version('opacus')}); this Opacus lacks: "
            + "; ".join(problems)
        )


def clear_per_sample_state(module: nn.Module) -> None:
    """Removes what Opacus left on the parameters, and their gradients."""
    for p in module.parameters():
        for name in PER_SAMPLE_STATE:
            if hasattr(p, name):
                delattr(p, name)
        p.grad = None
