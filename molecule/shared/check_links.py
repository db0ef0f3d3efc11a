#!/usr/bin/env python3
"""Check the relative links of every Markdown file of the repository.

For each *.md file (vendored trees and virtual environments left out), every relative link
target must exist, and every #anchor must name a heading of the target Markdown file, by
GitHub's rules: the heading's text without its markup, lower-case, punctuation removed except
'-' and '_', spaces turned into '-', a repeated heading getting -1, -2, ...

    python3 molecule/shared/check_links.py [ROOT]

Prints one line per broken link and the count; exits 1 if any is broken. Plain Python, no
dependencies.
"""

import os
import re
import sys
import unicodedata
from urllib.parse import unquote

# Directories never searched: version control, environments, caches, vendored collections.
SKIP_DIRS = {".git", ".venv", "venv", ".cache", "node_modules", "__pycache__", ".tox"}
OWN_COLLECTIONS = {"celery_stack"}  # collections/ansible_collections/<namespace> kept

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_LINK = re.compile(r"<a\s[^>]*href=\"([^\"]+)\"", re.I)
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_files(root):
    for directory, dirs, files in os.walk(root):
        rel = os.path.relpath(directory, root)
        parts = [] if rel == "." else rel.split(os.sep)
        keep = []
        for d in sorted(dirs):
            if d in SKIP_DIRS:
                continue
            if parts == ["collections", "ansible_collections"] and d not in OWN_COLLECTIONS:
                continue
            keep.append(d)
        dirs[:] = keep
        for name in sorted(files):
            if name.endswith(".md"):
                yield os.path.join(directory, name)


def prose_lines(text):
    """(line number, line) outside fenced and indented code blocks."""
    fence = None
    previous_blank = True
    in_indented = False
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
                fence = None
            continue
        if match:
            fence = match.group(1)
            continue
        blank = not line.strip()
        # An indented code block starts after a blank line (the files here indent a list
        # item's text by two spaces, so four spaces after a blank line are code).
        if line.startswith(("    ", "\t")) and (previous_blank or in_indented) and not blank:
            in_indented = True
            previous_blank = False
            continue
        if not blank:
            in_indented = False
        previous_blank = blank
        yield number, line


def slug(heading):
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    kept = []
    for char in text:
        category = unicodedata.category(char)
        if char in "-_ " or category[0] in "LN" or category[0] == "M":
            kept.append(char)
    return "".join(kept).replace(" ", "-")


_anchor_cache = {}


def anchors(path):
    if path not in _anchor_cache:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        seen = {}
        found = set()
        for _, line in prose_lines(text):
            match = HEADING.match(line)
            if not match:
                continue
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
        found.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", text))
        _anchor_cache[path] = found
    return _anchor_cache[path]


def links(text):
    for number, line in prose_lines(text):
        bare = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        for pattern in (INLINE_LINK, HTML_LINK):
            for match in pattern.finditer(bare):
                yield number, match.group(1)
        match = REF_DEF.match(bare)
        if match:
            yield number, match.group(1)


def check(root):
    broken = []
    checked = 0
    for path in markdown_files(root):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        for number, target in links(text):
            if not target or SCHEME.match(target) or target.startswith("//"):
                continue
            checked += 1
            where = f"{os.path.relpath(path, root)}:{number}"
            file_part, _, anchor = target.partition("#")
            file_part = unquote(file_part)
            if file_part.startswith("/"):
                resolved = os.path.join(root, file_part.lstrip("/"))
            elif file_part:
                resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part))
            else:
                resolved = path
            if not os.path.exists(resolved):
                broken.append(f"{where}: {target}: no such file")
                continue
            if anchor and resolved.endswith(".md") and os.path.isfile(resolved):
                if unquote(anchor).lower() not in anchors(resolved):
                    broken.append(f"{where}: {target}: no heading #{anchor} in "
                                  f"{os.path.relpath(resolved, root)}")
    return checked, broken


def main(argv):
    root = os.path.abspath(argv[1] if len(argv) > 1 else
                           os.path.join(os.path.dirname(__file__), "..", ".."))
    checked, broken = check(root)
    for line in broken:
        print(line)
    print(f"{checked} relative links checked, {len(broken)} broken")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
