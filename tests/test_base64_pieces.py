"""The base64 of a JSON image is decoded piece by piece (serving/limits.decode_base64), and decodes exactly as
one whole-string decode would: the same bytes for every valid text, a 400 for every text that one refuses,
wherever the pieces' edges fall (inside the padding, between whitespace and data, inside a quad)."""
from __future__ import annotations

import base64
import binascii

import pytest
from hypothesis import given, settings, strategies as st

import medlego.serving.limits as limits
from medlego.runtime.errors import BadInputError


def _whole_string_decode(text: str) -> bytes | None:
    """The rule, stated on the whole string: whitespace ignored, URL-safe or standard alphabet, missing
    padding added, '=' only in the last two places of the padded text."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    text = "".join(text.split())
    text += "=" * (-len(text) % 4)
    if "=" in text[:-2]:
        return None
    try:
        return base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except binascii.Error:
        return None


def _pieces(text: str) -> bytes | None:
    try:
        return limits.decode_base64(text)
    except BadInputError as e:
        assert str(e).endswith("is not valid base64") and "\n" not in str(e)
        return None


_encoded = st.binary(max_size=40).flatmap(lambda raw: st.sampled_from([
    base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode(),
    base64.b64encode(raw).decode().rstrip("="), "data:image/png;base64," + base64.b64encode(raw).decode()]))
_edited = st.tuples(_encoded, st.integers(0, 80), st.sampled_from(["", " ", "\n", "\t ", "=", "==", "A", "-", "*"]))
_texts = st.one_of(_edited.map(lambda e: e[0][:e[1]] + e[2] + e[0][e[1]:]),
                   st.text(alphabet="AZaz09+/-_= \n", min_size=1, max_size=30)).filter(bool)


@pytest.mark.parametrize("piece", [4, 5, 7, 8, 1 << 20])
@settings(max_examples=400, deadline=None)
@given(text=_texts)
def test_pieces_decode_as_the_whole_string_would(piece, text):
    old = limits._B64_PIECE
    limits._B64_PIECE = piece
    try:
        assert _pieces(text) == _whole_string_decode(text)
    finally:
        limits._B64_PIECE = old


def test_no_pass_covers_more_than_one_piece(monkeypatch):
    """A 6 MB base64 image with line breaks: every whitespace/alphabet pass and every decode call sees at most
    one piece (plus < 4 carried characters), so no single step holds the interpreter lock for the whole body."""
    raw = bytes(range(256)) * (4_500_000 // 256)
    text = base64.encodebytes(raw).decode()  # 76-character lines
    seen: list[int] = []
    canonical, b64decode = limits._canonical, base64.b64decode
    monkeypatch.setattr(limits, "_canonical", lambda s: seen.append(len(s)) or canonical(s))
    monkeypatch.setattr(limits.base64, "b64decode", lambda s, **kw: seen.append(len(s)) or b64decode(s, **kw))
    assert limits.decode_base64(text) == raw
    assert len(seen) > 10 and max(seen) <= limits._B64_PIECE + 3
