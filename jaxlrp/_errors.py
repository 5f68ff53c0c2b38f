"""Exceptions raised by jaxlrp. Each message says what went wrong, where, and how to fix it."""


class LRPError(Exception):
  """Base class of every error jaxlrp raises on purpose."""


class UnsupportedOpError(LRPError):
  """Relevance reached an operation that has no LRP rule (and `strict=True`)."""


class SelectorError(LRPError):
  """A composite's selector matched nothing, or named an unknown op kind."""


class RulePlacementError(LRPError):
  """A rule was assigned where it cannot apply (e.g. an input-layer rule deep inside the network)."""
