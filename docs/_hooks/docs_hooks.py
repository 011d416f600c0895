"""Docs build helpers, used by mkdocs.yml: an API-coverage hook and a griffe extension.

* ``on_page_markdown`` (a mkdocs hook): ``docs/api.md`` must document every name in
  ``funcreg.__all__`` with a ``::: funcreg.NAME`` block, and nothing else; otherwise the build fails.
* ``DocstringDialect`` (a griffe extension, loaded by mkdocstrings): reads funcreg's docstrings, which
  mix Google style with a little Sphinx/NumPy, as griffe's Google parser expects them:

  - Sphinx roles (``:func:`funcreg.chain```) become links to the API page when they name a public
    funcreg object, and plain code otherwise, instead of showing verbatim;
  - an ``Example:`` section is read as ``Examples:`` (griffe would render it as an admonition, and
    its ``>>>`` lines as nested block quotes);
  - an argument line naming several arguments (``b1, b2: decay rates``) becomes one line per argument.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_API_PAGE = "api.md"
_ENTRY = re.compile(r"^::: funcreg\.(\w+)\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|obj|exc|const):`(~?)([^`<]+?)(\(\))?`")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_SECTION = re.compile(r"^(\s*)(\w[\w ]*):\s*$")
_MULTI_ARG = re.compile(r"^(\s+)(\w+(?:,\s*\w+)+):(.*)$")


_TESTING_ENTRY = re.compile(r"^::: funcreg\.testing\.(\w+)\s*$", re.MULTILINE)


def _public_names() -> list[str]:
    import funcreg

    return list(funcreg.__all__)


def _testing_names() -> list[str]:
    import funcreg.testing

    return list(funcreg.testing.__all__)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Fails the build when ``api.md`` and ``funcreg.__all__`` list different names."""
    if page.file.src_uri != _API_PAGE:
        return markdown
    from mkdocs.exceptions import PluginError

    documented = _ENTRY.findall(markdown)
    public = _public_names()
    missing = [n for n in public if n not in documented]
    unknown = [n for n in documented if n not in public]
    repeated = sorted({n for n in documented if documented.count(n) > 1})
    problems = []
    if missing:
        problems.append(f"names in funcreg.__all__ with no '::: funcreg.NAME' entry: {missing}")
    if unknown:
        problems.append(f"entries for names not in funcreg.__all__: {unknown}")
    if repeated:
        problems.append(f"names documented twice: {repeated}")
    testing_documented = _TESTING_ENTRY.findall(markdown)
    testing_missing = [n for n in _testing_names() if n not in testing_documented]
    if testing_missing:
        problems.append(f"names in funcreg.testing.__all__ with no '::: funcreg.testing.NAME' entry: {testing_missing}")
    if problems:
        raise PluginError(
            f"docs/{_API_PAGE} does not match funcreg.__all__: " + "; ".join(problems)
            + f". Every public name needs one '::: funcreg.NAME' line in docs/{_API_PAGE}, in its section."
        )
    return markdown


def _split_multi_args(text: str) -> str:
    """``a, b: text`` in an ``Args:`` section becomes ``a: text`` and ``b: text``."""
    out, in_args, indent = [], False, ""
    for line in text.splitlines():
        section = _SECTION.match(line)
        if section:
            in_args = section.group(2).lower() in ("args", "arguments", "params", "parameters")
            indent = section.group(1)
        elif in_args and line.strip() and not line.startswith(indent + " "):
            in_args = False
        multi = _MULTI_ARG.match(line) if in_args else None
        if multi:
            lead, names, rest = multi.groups()
            out.extend(f"{lead}{name.strip()}:{rest}" for name in names.split(","))
        else:
            out.append(line)
    return "\n".join(out)


class DocstringDialect(griffe.Extension):
    """Normalizes funcreg's docstrings for griffe's Google parser (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._public = set(_public_names())

    def _replace(self, match: re.Match[str]) -> str:
        short, target, call = match.group(1), match.group(2).strip(), match.group(3) or ""
        name = target.removeprefix("funcreg.").removeprefix("fr.")
        shown = (target.rsplit(".", 1)[-1] if short else target) + call
        if name in self._public:
            return f"[`{shown}`][funcreg.{name}]"
        return f"`{shown}`"

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        text = _ROLE.sub(self._replace, obj.docstring.value)
        text = _EXAMPLE.sub(r"\1Examples:", text)
        obj.docstring.value = _split_multi_args(text)
