"""jaxlrp: Layer-wise Relevance Propagation for JAX, as a function transformation.

    g = jaxlrp.lrp(f, jaxlrp.EpsilonPlusFlat())
    relevance = jax.grad(lambda x: g(x)[0, target])(x)
"""

from jaxlrp._attribute import Attribution, RuleRow, attribute, show_rules
from jaxlrp._composites import (
    AttnLRP, Composite, CPLRP, EpsilonAlpha2Beta1, EpsilonAlpha2Beta1Flat, EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat, First,
    Kind, Last, Name, OpInfo, Path, Where,
)
from jaxlrp._core import lrp
from jaxlrp._errors import LRPError, RulePlacementError, SelectorError, UnsupportedOpError
from jaxlrp._rules import (
    AlphaBeta, ConstantStd, Epsilon, Flat, Gamma, Gradient, Norm, Pass, Rule, SignalTakeAll, Uniform, WSquare, ZBox,
    Zero, ZPlus, stabilize,
)

__version__ = "0.1.0.dev0"
