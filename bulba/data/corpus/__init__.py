"""Reading a raw mixed corpus as a stream of NFC-normalized documents, batch by batch:
sources.py (what the inputs are), readers.py (documents per format), language.py (a cheap guess)."""

from bulba.data.corpus.language import LANG_ID, LANGUAGES, guess_language
from bulba.data.corpus.readers import iter_documents, nfc
from bulba.data.corpus.sources import Input, parse_input, resolve_inputs, scan_source

__all__ = [
    "LANGUAGES",
    "LANG_ID",
    "Input",
    "guess_language",
    "iter_documents",
    "nfc",
    "parse_input",
    "resolve_inputs",
    "scan_source",
]
