"""Which language a document is in (be, ru, en, code, other), from its letters: cheap, for the
per-language statistics in meta.json and MLflow, never for filtering."""

from __future__ import annotations

import re

_BE = re.compile("[ўЎіІ]")
_RU = re.compile("[иИщЩъЪ]")
_DECISIVE = re.compile("[ўЎіІиИщЩъЪ]")
_CYR = re.compile("[\u0400-\u04ff]")
_LAT = re.compile("[A-Za-z]")
LANGUAGES = ["be", "ru", "en", "code", "other"]
LANG_ID = {lang: i for i, lang in enumerate(LANGUAGES)}


def guess_language(text: str, default: str | None) -> str:
    """be / ru / en / other from letters only inside one alphabet: ў,і are Belarusian and
    и,щ,ъ Russian; Cyrillic without either is ambiguous and takes `default` (the source's)."""
    if len(text) > 4096:  # sources: count rather than search
        nbe, nru = len(_BE.findall(text)), len(_RU.findall(text))
        ncyr, nlat = len(_CYR.findall(text)), len(_LAT.findall(text))
        if ncyr == 0 and nlat == 0:
            return "other"
        if ncyr >= nlat:
            return "be" if nbe > nru else "ru"
        return "en"
    m = _DECISIVE.search(text)  # one scan settles most documents
    if m:
        return "be" if m.group() in "ўЎіІ" else "ru"
    if _CYR.search(text):
        return default if default in ("be", "ru") else "ru"
    if _LAT.search(text):
        return "en"
    return default or "other"
