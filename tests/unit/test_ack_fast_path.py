"""The gateway's fast path for acks takes exactly what the general parse would take."""

from __future__ import annotations

import json

import orjson
from hypothesis import given
from hypothesis import strategies as st

from tocsin.gateway.handler import ACK_FRAME
from tocsin.schemas import Ack, client_frame_adapter

seqs = st.integers(min_value=-5, max_value=2**63 - 1)
texts = st.one_of(
    seqs.map(lambda n: orjson.dumps({"type": "ack", "seq": n}).decode()),
    seqs.map(lambda n: json.dumps({"type": "ack", "seq": n})),  # with spaces: general path
    seqs.map(lambda n: f'{{"type":"ack","seq":"{n}"}}'),  # a string seq: general path
    st.text(max_size=40),
)


@given(texts)
def test_fast_path_agrees_with_the_general_parse(text: str) -> None:
    fast = ACK_FRAME.fullmatch(text)
    if fast is None:
        return  # the general path answers as before
    frame = client_frame_adapter.validate_json(text)
    assert isinstance(frame, Ack) and frame.seq == int(fast[1])


def test_compact_acks_take_the_fast_path_and_odd_ones_do_not() -> None:
    assert ACK_FRAME.fullmatch('{"type":"ack","seq":42}')
    for odd in ('{"type":"ack","seq":0}', '{"type":"ack","seq":-1}', '{"seq":1,"type":"ack"}'):
        assert ACK_FRAME.fullmatch(odd) is None  # the general path answers these as before
