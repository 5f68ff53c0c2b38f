"""jaxlrp: Layer-wise Relevance Propagation for JAX, as a function transformation.

    g = jaxlrp.lrp(f, jaxlrp.EpsilonPlusFlat())
    relevance = jax.grad(lambda x: g(x)[0, target])(x)
"""

from jaxlrp._attribute import Attribution, RuleRow, attribute, normalize, show_rules
from jaxlrp._attributors import GradientXInput, IntegratedGradients, SmoothGrad, VanillaGradient
from jaxlrp._concepts import ConceptRelevance, conditional_relevance, relevance_maximization
from jaxlrp._composites import (
    AttnLRP, Composite, CPLRP, EpsilonAlpha2Beta1, EpsilonAlpha2Beta1Flat, EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat, First,
    Kind, Last, Name, OpInfo, Path, Where,
)
from jaxlrp._core import lrp, lrp_vjp
from jaxlrp._dataset import attribute_dataset
from jaxlrp._errors import LRPError, RulePlacementError, SelectorError, UnsupportedOpError
from jaxlrp._rules import (
    AlphaBeta, ConstantStd, Epsilon, Flat, Gamma, Gradient, Norm, Pass, Rule, SignalTakeAll, Uniform, WSquare, ZBox,
    Zero, ZPlus, stabilize,
)
from jaxlrp import metrics  # noqa: E402,F401  (public submodule: jaxlrp.metrics)
from jaxlrp._tune import TuneResult, tune  # noqa: E402  (after metrics: its default metric)

__version__ = "0.1.0.dev0"
