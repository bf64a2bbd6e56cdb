#!/usr/bin/env python3
"""Count what a town transcript's lines hold besides speech.

Reads `ai_town --headless` output on stdin (lines `[  12.3s] Mira → Bram: text`)
and prints, over the NPC lines: lines, lines with stage directions ("(smiling)",
"*waves*"), lines with speaker labels inside ("Q: ...", "Bram: ..."), and lines
echoing the prompt's instructions. Used for issue #18's before/after figures.
"""
import re
import sys

LINE = re.compile(r"^\[\s*[\d.]+s\] (?P<who>[^→]+) → (?P<to>[^:]+): (?P<text>.*)$")
STAGE = re.compile(r"\([^)]*\)|\*[^*]+\*|\[[^\]]*\]")
LABEL = re.compile(r"(^|[\s\"'])[A-Z][\w' ]{0,20}:\s")
ECHO = re.compile(r"one or two short sentences|in one (short )?sentence|reply as |never write lines|the conversation is ending", re.I)

lines = stage = label = echo = 0
for raw in sys.stdin:
    m = LINE.match(raw.rstrip("\n"))
    if not m:
        continue
    text = m.group("text")
    lines += 1
    stage += bool(STAGE.search(text))
    label += bool(LABEL.search(text))
    echo += bool(ECHO.search(text))
print(f"lines {lines}; stage directions {stage}; speaker labels {label}; prompt echoes {echo}")
