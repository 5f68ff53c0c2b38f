"""A griffe extension for the API reference: jaxlrp's docstrings as mkdocstrings can render them.

The docstrings are Google style, but title their examples "Example:" (griffe's Google parser knows "Examples:";
it would render the `>>>` lines as Markdown block quotes), write maths the Sphinx way (`.. math::` blocks and
`:math:` roles) and name other objects with `:func:` / `:meth:` / `:class:` / `:data:` roles (jaxlrp.image).
Maths blocks become `$$ ... $$` and roles `$...$` or code, which pymdownx.arithmatex (mkdocs.yml) typesets with
MathJax. The extension also gives the rule and attributor classes, which jaxlrp's own decorators make dataclasses,
their signatures. Loaded by mkdocs.yml's mkdocstrings options.
"""

from __future__ import annotations

import re

import griffe

_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_NAME_ROLE = re.compile(r":(?:func|meth|class|data|attr|mod|obj):`~?([^`]+)`")
_MATH_BLOCK = re.compile(r"^(\s*)\.\. math::\s*(.*)$")
# jaxlrp's decorators that make a class a frozen dataclass and a pytree (`_rules._rule`, `_attributors._attributor`).
_DATACLASS_DECORATORS = {"_rule", "_attributor"}
_EXAMPLE_TITLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def convert(text: str) -> str:
  """The docstring `text` with reST maths blocks and roles in Markdown / arithmatex form.

  Example:
    >>> print(convert("Ratio :math:`a/b`, see :func:`f`.\\n\\n.. math:: x = 1\\n           + y\\n\\nEnd."))
    Ratio $a/b$, see `f`.
    <BLANKLINE>
    $$
    x = 1 + y
    $$
    <BLANKLINE>
    End.
  """
  lines = text.splitlines()
  out: list[str] = []
  i = 0
  while i < len(lines):
    m = _MATH_BLOCK.match(lines[i])
    if not m:
      out.append(lines[i])
      i += 1
      continue
    lead, first = m.group(1), m.group(2).strip()
    body = [first] if first else []
    i += 1
    # The block continues on lines indented deeper than the directive (after blank lines only while still empty).
    while i < len(lines):
      line = lines[i]
      if not line.strip():
        if body:
          break
        i += 1
        continue
      if _indent(line) <= len(lead):
        break
      body.append(line.strip())
      i += 1
    if out and out[-1].strip():
      out.append("")
    out.extend([f"{lead}$$", f"{lead}{' '.join(body)}", f"{lead}$$"])
    if i < len(lines) and lines[i].strip():  # Markdown needs a blank line after the block
      out.append("")
  text = "\n".join(out)
  # Google style's section is "Examples:"; griffe reads the singular as an admonition of Markdown text, where the
  # `>>>` lines would become nested block quotes.
  text = _EXAMPLE_TITLE.sub(r"\1Examples:", text)
  text = _MATH_ROLE.sub(lambda mm: f"${mm.group(1)}$", text)
  return _NAME_ROLE.sub(lambda mm: f"`{mm.group(1)}`", text)


def _dataclass_fields(cls: griffe.Class) -> list[griffe.Parameter]:
  """The `__init__` parameters of a dataclass: its annotated instance attributes (not ClassVars), in order."""
  return [
      griffe.Parameter(name, annotation=member.annotation, kind=griffe.ParameterKind.positional_or_keyword,
                       default=member.value)
      for name, member in cls.members.items()
      if member.is_attribute and member.annotation is not None and "instance-attribute" in member.labels
  ]


def _add_dataclass_inits(module: griffe.Module) -> None:
  """Gives the classes made dataclasses by jaxlrp's own decorators (griffe only recognises `@dataclass`) their
  `__init__`, so the reference shows signatures such as `Epsilon(epsilon=1e-06, zero_params=())`."""
  for member in module.members.values():
    if member.is_alias:
      continue
    if member.is_module:
      _add_dataclass_inits(member)
    elif member.is_class and "__init__" not in member.members:
      names = {str(d.value).split("(")[0] for d in member.decorators}
      if names & _DATACLASS_DECORATORS:
        init = griffe.Function("__init__", lineno=0, endlineno=0, parent=member, returns="None",
                               parameters=griffe.Parameters(griffe.Parameter("self"), *_dataclass_fields(member)))
        member.set_member("__init__", init)


class JaxlrpDocstrings(griffe.Extension):
  """Converts every docstring once the object tree is built (before mkdocstrings parses the sections), and adds
  the `__init__` of jaxlrp's decorator-made dataclasses."""

  def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
    if obj.docstring is not None:
      obj.docstring.value = convert(obj.docstring.value)
      obj.docstring.__dict__.pop("parsed", None)  # a cached parse of the old text

  def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
    _add_dataclass_inits(pkg)
