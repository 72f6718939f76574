"""Griffe extensions for the API reference (loaded by mkdocs.yml).

This project's docstrings end with a doctest-style example under `Example:`, not
indented (the style guide's form). Griffe's Google parser wants `Examples:` with
its content indented, and would otherwise render the `>>>` lines as plain text.
This extension rewrites such a section into that form, so that the examples render
as code; the docstrings themselves stay as they are.
"""

import re

import griffe

_EXAMPLE = re.compile(r"^Examples?:\s*$")
_HEADER = re.compile(
    r"^(Args|Arguments|Parameters|Returns|Yields|Raises|References|Attributes|"
    r"Note|Notes|Warning|Warnings|See Also|Examples?):\s*$"
)


def indent_examples(text):
    """`Example:` + unindented lines -> `Examples:` + the lines indented."""
    lines = text.splitlines()
    out = []
    i = 0
    while i < len(lines):
        if not _EXAMPLE.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        out.append("Examples:")
        i += 1
        while i < len(lines) and not lines[i].strip():
            i += 1
        if i < len(lines) and lines[i][:1] in (" ", "\t"):
            continue  # already a Google-style section
        while i < len(lines) and not _HEADER.match(lines[i]):
            out.append("    " + lines[i] if lines[i].strip() else "")
            i += 1
    return "\n".join(out)


class ExampleSections(griffe.Extension):
    def on_object(self, *, obj, **kwargs):
        docstring = obj.docstring
        if docstring is not None and "Example" in docstring.value:
            docstring.value = indent_examples(docstring.value)


class PublicReexports(griffe.Extension):
    """Names a package re-exports (`from m import x as x`, the project's form of a
    public list) are public: render them in the package's reference."""

    def on_alias(self, *, alias, **kwargs):
        parent = alias.parent
        if (
            parent is not None
            and (parent.is_package or parent.is_subpackage)
            and not alias.name.startswith("_")
            and alias.target_path.startswith("keras_custom.")
        ):
            alias.public = True
