# Wiki markup to WikiText-style prose (the text form of WikiText-2, Merity et al., 2016): prose and headings only.
"""``strip_wiki_markup`` and ``wiki_articles``: the cleaning of the default Wikipedia corpus.

Templates, tables, references, files and categories are dropped; links keep their text; section headings are
kept in WikiText style (`` = = Heading = = ``); redirects and other namespaces are skipped.
"""

from __future__ import annotations

import html
import io
import re
import xml.etree.ElementTree as ET
from typing import Iterator

_DROP_ELEMENTS = ("ref", "math", "gallery", "timeline", "imagemap", "score", "syntaxhighlight", "source",
                  "references", "hiero", "chem", "ce")
_DROP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography",
                  "sources", "footnotes", "notes and references", "citations", "works cited"}
_HIDDEN_NAMESPACES = {"file", "image", "media", "category"}
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(-[a-z]+)*$")
_BALANCED = (("{{{", "}}}"), ("{{", "}}"), ("{|", "|}"))

_COMMENT = re.compile(r"<!--.*?(-->|$)", re.S)
_ELEMENT = re.compile(r"<(%s)\b[^>]*?(/>|>.*?</\1\s*>)" % "|".join(_DROP_ELEMENTS), re.S | re.I)
_INNER_LINK = re.compile(r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\]))*)\]\]")  # single brackets may occur inside
_EXTERNAL = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*(?:\s+([^\]]*))?\]")
_QUOTES = re.compile(r"'{2,5}")
_BREAK = re.compile(r"<br\s*/?>", re.I)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^<>]*>")
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_MAGIC = re.compile(r"__[A-Z]+__")
_EMPTY_PARENS = re.compile(r"\([\s,;:]*\)")
_PAREN_LEAD = re.compile(r"\(\s*(?:[,;:]\s*)+")
_PAREN_TRAIL = re.compile(r"\s*(?:[,;:]\s*)+\)")
_SPACE_PUNCT = re.compile(r"\s+([,.;:])")


def _drop_balanced(text: str) -> str:
    """Remove templates ``{{...}}``, parameters ``{{{...}}}`` and tables ``{|...|}``, nested to any depth.

    A closer only matches the innermost open construct; an opener never closed drops the rest of the text."""
    out, stack, i, start = [], [], 0, 0
    n = len(text)
    while i < n:
        c = text[i]
        if c not in "{|}":
            i += 1
            continue
        if stack and text.startswith(stack[-1], i):
            i += len(stack.pop())
            if not stack:
                start = i
            continue
        for opener, closer in _BALANCED:
            if text.startswith(opener, i):
                if not stack:
                    out.append(text[start:i])
                stack.append(closer)
                i += len(opener)
                break
        else:
            i += 1
    if not stack:
        out.append(text[start:])
    return "".join(out)


def _link(match: re.Match) -> str:
    """``[[target|label]]`` -> label, ``[[target]]`` -> target; files, categories, interlanguage -> ''."""
    parts = match.group(1).split("|")
    target = parts[0].strip()
    if target.startswith(":"):  # [[:Category:X|y]] is a visible link
        return parts[-1] if len(parts) > 1 and parts[-1].strip() else target.lstrip(":")
    prefix = target.split(":", 1)[0].strip() if ":" in target else ""
    if prefix.lower() in _HIDDEN_NAMESPACES or (len(parts) == 1 and _INTERLANGUAGE.match(prefix)):
        return ""
    if len(parts) > 1:
        label = parts[-1]
        if label.strip():
            return label
        return re.sub(r"\s*\(.*\)$", "", target.split(":", 1)[-1])  # pipe trick [[a (b)|]] -> a
    return target


def _links(text: str) -> str:
    """Resolve links innermost first, so links inside an image caption go before the image itself."""
    while True:
        new = _INNER_LINK.sub(_link, text)
        if new == text:
            return new
        text = new


def _heading(level: int, title: str) -> str:
    marks = " ".join("=" * level)
    return f" {marks} {title} {marks} "


def strip_wiki_markup(wikitext: str, title: str | None = None) -> str:
    """Plain text of one article in WikiText style: paragraphs on their own lines, headings as
    `` = = Heading = = `` (the title, when given, as `` = Title = `` on the first line).

    Dropped: comments, ``<ref>``/``<math>``/``<gallery>``... elements, templates ``{{...}}`` (nested),
    tables ``{|...|}``, file/image/category/interlanguage links, external links without a label, HTML tags
    (their content is kept), bold/italic quotes, list markers, magic words, and the trailing reference
    sections (References, External links, See also, ...). ``[[a|b]]`` -> b, ``[[a]]`` -> a,
    ``[http://x y]`` -> y. HTML entities are decoded and whitespace is collapsed.
    """
    text = _COMMENT.sub("", wikitext)
    text = _ELEMENT.sub("", text)
    text = _drop_balanced(text)
    text = _links(text)
    text = _EXTERNAL.sub(lambda m: m.group(1) or "", text)
    text = _QUOTES.sub("", text)
    text = _TAG.sub("", _BREAK.sub(" ", text))
    text = _MAGIC.sub("", text)
    text = html.unescape(text)

    lines, skip_level = [], 0  # lines: (is_heading, text)
    for raw in text.splitlines():
        line = re.sub(r"\s+", " ", raw).strip()
        head = _HEADING.match(line)
        if head:
            level, name = len(head.group(1)), head.group(2).strip()
            if skip_level and level > skip_level:
                continue
            skip_level = level if name.lower() in _DROP_SECTIONS else 0
            if not skip_level and name:
                lines.append((True, _heading(level, name)))
            continue
        if skip_level:
            continue
        line = line.lstrip("*#:;").strip()
        if line.startswith(("|", "!")):  # a table fragment left by unbalanced markup
            continue
        line = _PAREN_TRAIL.sub(")", _PAREN_LEAD.sub("(", _EMPTY_PARENS.sub("", line)))
        line = _SPACE_PUNCT.sub(r"\1", line)
        line = re.sub(r" {2,}", " ", line).strip()
        if line:
            lines.append((False, line))
    while lines and lines[-1][0]:
        lines.pop()  # headings of sections left empty at the end
    if not lines:
        return ""  # no prose at all: not an article
    if title:
        lines.insert(0, (True, _heading(1, title.strip())))
    return "\n".join(text for _, text in lines)


def wiki_articles(xml_stream: io.BufferedIOBase) -> Iterator[tuple[str, str]]:
    """``(title, wikitext)`` of every main-namespace, non-redirect page of a MediaWiki XML export."""
    for _, elem in ET.iterparse(xml_stream, events=("end",)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        ns = elem.findtext("{*}ns")
        redirect = elem.find("{*}redirect") is not None
        text = elem.findtext("{*}revision/{*}text") or ""
        title = elem.findtext("{*}title") or ""
        elem.clear()
        if ns == "0" and not redirect and not text.lstrip().upper().startswith("#REDIRECT"):
            yield title, text


# ----------------------------------------------------------------------------------------------------
# Corpora and sources
